"""The one place where quantlab silences torch's deprecation warnings, on purpose.

quantlab implements the eager-mode recipe of the PyTorch tutorial "Static Quantization with
Eager Mode": `torch.ao.quantization` (prepare, convert, observers) and `torch.jit.script`.
torch 2.14 marks both as deprecated but they work, and that recipe is what we ship. Their
warnings fire hundreds of times per run (one per observer) and would bury real messages, so
we filter exactly those messages, and nothing else.
"""

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


def silence_deprecations() -> None:
    """Install the warning filters for torch.ao.quantization and torch.jit (idempotent)."""
    for category, message in SILENCED:
        warnings.filterwarnings("ignore", message=message, category=category)
