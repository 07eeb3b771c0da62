"""The one place where quantlab silences torch's deprecation warnings, on purpose.

quantlab implements the eager-mode recipe of the PyTorch tutorial "Static Quantization with
Eager Mode": `torch.ao.quantization` (prepare, convert, observers) and `torch.jit.script`.
torch 2.14 marks both as deprecated but they work, and that recipe is what we ship. Their
warnings fire hundreds of times per run (one per observer) and would bury real messages, so
we filter exactly those messages, and nothing else.

The PT2E backend (quantlab.pt2e) uses torchao, whose import makes torch log (not warn) that
its enum registration is deprecated; that log record is filtered here too, by its message.

OpenVINO's and NNCF's usage telemetry is declined elsewhere, before anything imports openvino
(quantlab.runtimes.decline_openvino_telemetry), because the timing child cannot import this.
"""

import logging
import re
import warnings

# (category, regex matched against the start of the message)
SILENCED = [
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (FutureWarning, r"`torch\.jit\.\w+` is deprecated"),
    (UserWarning, r"Please use quant_min and quant_max to specify the range for observers"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor"),
    # torchvision's quantizable blocks own a FloatFunctional that is unused when a block has no
    # residual connection; convert() asks its never-run observer for qparams and warns.
    (UserWarning, r"must run observer before calling calculate_qparams"),
    # quantlab.onnx_export uses the TorchScript-based ONNX exporter on purpose (docs/export.md:
    # it is the one that maps fake quantization to QuantizeLinear/DequantizeLinear).
    (DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export"),
    # ...and its setup_onnx_logging, called by every torch.onnx.export(dynamo=False):
    (DeprecationWarning, r"The feature will be removed\. Please remove usage of this function"),
]


# (category, message regex, module regex): warnings that only a library's own code may issue
SILENCED_IN_MODULE = [
    # inductor's oneDNN int8 lowering (AOTInductor packages of PT2E models, quantlab.pt2e)
    # copy-constructs a tensor itself; nothing a quantlab user can act on.
    (UserWarning, r"To copy construct from a tensor", r"torch\._inductor\.mkldnn_lowerings"),
]

# (logger name, regex matched against the start of the formatted message)
SILENCED_LOGS = [
    # torchao 0.18 registers its KernelPreference enum as a pytree constant; torch 2.14 now
    # supports enums natively and logs that the call is deprecated, once per process.
    ("torch.utils._pytree", r"<enum '\w+'> is an Enum subclass and is now natively supported"),
    # inductor's C++ compile of an AOTInductor package (quantlab.pt2e) asks cpp_extension for
    # build flags; torch's CUDA wheel then logs that this CPU-only machine has no CUDA runtime.
    ("torch.utils.cpp_extension", r"No CUDA runtime is found"),
]


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence_deprecations() -> None:
    """Install the warning filters for torch.ao.quantization, torch.jit and torchao (idempotent)."""
    for category, message in SILENCED:
        warnings.filterwarnings("ignore", message=message, category=category)
    for category, message, module in SILENCED_IN_MODULE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, message in SILENCED_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern.pattern == message
                   for f in logger.filters):
            logger.addFilter(_DropMessages(message))

