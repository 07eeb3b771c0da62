"""ONNX (QDQ) and OpenVINO IR export of quantlab's int8 variants, with their own qparams.

    data = to_onnx(int8_model, input_size=224)           # bytes of model.onnx (QDQ, opset 17)
    files = to_openvino(data)                            # {"model.xml": ..., "model.bin": ...}
    files = float_to_openvino(to_onnx_float(fused, 224)) # the float model, for the baselines

Method (docs/export.md has the reasons and the limits). The source is the *converted* eager
int8 model, the same module the TorchScript artifact is scripted from, so the exported graph
carries exactly the scales and zero points that run there (PTQ calibration, QAT training, the
float fallback's requantizing QuantStubs): not the observers' quant_min/quant_max, which
differ for reduce_range activations (observed over 0..127, run over 0..255). The int8 model is
mirrored as a float model with fake quantization:

- each quantized conv/linear becomes the float layer with its int8 weights dequantized, a
  fake-quant of those weights (per tensor or per channel, as the variant quantized them), a
  fake-quant of its input (with the qparams its input has in the int8 model, recorded by
  running one batch) and of its output (the layer's own scale and zero point);
- QuantStub's Quantize, quantized adds/muls/cats and activations become the float op followed
  by a fake-quant with the module's output qparams; DeQuantize becomes the identity;
- float layers (the fallback's FloatIsland) stay float.

torch.onnx.export (the TorchScript-based exporter, dynamo=False) turns each
fake_quantize_per_{tensor,channel}_affine into QuantizeLinear -> DequantizeLinear. A small
pass over the ONNX graph then stores weights as int8 initializers (QuantizeLinear of a constant
folded away: the file is about 4x smaller than float). Biases stay float (see qdq_initializers).
"""

from __future__ import annotations

import copy
import os
import tempfile
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.intrinsic import quantized as nniq

from quantlab import runtimes
from quantlab.errors import ConfigError
from quantlab.registry import FORMAT_FILES

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
_Q_RANGES = {torch.quint8: (0, 255), torch.qint8: (-128, 127)}


class ExportError(ConfigError):
    """A model quantlab cannot export to ONNX (a module kind without a QDQ form)."""


# -- the fake-quantized mirror of a converted int8 model -------------------------------------
class _QParams(nn.Module):
    """Per-tensor fake quantization with fixed qparams (exports as QuantizeLinear/Dequantize).

    A tensor that already carries these qparams (the output of the previous fake-quant) passes
    through untouched, so consecutive layers do not stack identical Q/DQ pairs in the graph.
    """

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype):
        super().__init__()
        if dtype not in _Q_RANGES:
            raise ExportError(f"activation dtype {dtype} has no ONNX QDQ form; valid: "
                              f"{', '.join(map(str, _Q_RANGES))}")
        self.scale, self.zero_point = float(scale), int(zero_point)
        self.quant_min, self.quant_max = _Q_RANGES[dtype]
        self.key = (self.scale, self.zero_point, self.quant_min)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(x, "_quantlab_qparams", None) == self.key:
            return x
        y = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point,
                                                   self.quant_min, self.quant_max)
        y._quantlab_qparams = self.key
        return y


def _weight_fake_quant(w: torch.Tensor) -> tuple[torch.Tensor, callable]:
    """The dequantized float weight and a function applying its fake quantization."""
    qmin, qmax = _Q_RANGES[w.dtype]
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales = w.q_per_channel_scales().float()
        zps = w.q_per_channel_zero_points().int()
        axis = w.q_per_channel_axis()
        return w.dequantize(), lambda t: torch.fake_quantize_per_channel_affine(
            t, scales, zps, axis, qmin, qmax)
    scale, zp = float(w.q_scale()), int(w.q_zero_point())
    return w.dequantize(), lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp, qmin, qmax)


class _QDQWeighted(nn.Module):
    """A quantized conv/linear as float: fq(input) -> layer(fq(weight)) [-> relu] -> fq(output)."""

    def __init__(self, layer: nn.Module, qweight: torch.Tensor, relu: bool,
                 input_q: _QParams, output_q: _QParams):
        super().__init__()
        weight, self._fq_weight = _weight_fake_quant(qweight)
        self.layer = layer
        self.layer.weight = nn.Parameter(weight, requires_grad=False)
        self.relu = relu
        self.input_q, self.output_q = input_q, output_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_q(x)
        w = self._fq_weight(self.layer.weight)
        if isinstance(self.layer, nn.Linear):
            y = nn.functional.linear(x, w, self.layer.bias)
        else:
            y = self.layer._conv_forward(x, w, self.layer.bias)
        if self.relu:
            y = torch.relu(y)
        return self.output_q(y)


class _QDQFunctional(nn.Module):
    """quantized QFunctional (adds of residual blocks, muls, cats) as float op -> fake-quant."""

    def __init__(self, out: _QParams):
        super().__init__()
        self.out = out

    def add(self, a, b):
        return self.out(a + b)

    def add_relu(self, a, b):
        return self.out(torch.relu(a + b))

    def mul(self, a, b):
        return self.out(a * b)

    def add_scalar(self, a, b: float):
        return self.out(a + b)

    def mul_scalar(self, a, b: float):
        return self.out(a * b)

    def cat(self, xs, dim: int = 0):
        return self.out(torch.cat(xs, dim=dim))

    def matmul(self, a, b):
        return self.out(torch.matmul(a, b))


class _QDQActivation(nn.Module):
    """A quantized activation module (ReLU6, Hardswish, ...) as float op -> fake-quant."""

    def __init__(self, op: nn.Module, out: _QParams):
        super().__init__()
        self.op, self.out = op, out

    def forward(self, x):
        return self.out(self.op(x))


_CONVS = {nnq.Conv1d: (nn.Conv1d, False), nnq.Conv2d: (nn.Conv2d, False),
          nnq.Conv3d: (nn.Conv3d, False), nniq.ConvReLU1d: (nn.Conv1d, True),
          nniq.ConvReLU2d: (nn.Conv2d, True), nniq.ConvReLU3d: (nn.Conv3d, True)}
_LINEARS = {nnq.Linear: False, nniq.LinearReLU: True}
_ACTIVATIONS = {nnq.ReLU6: lambda m: nn.ReLU6(), nnq.Hardswish: lambda m: nn.Hardswish(),
                nnq.ELU: lambda m: nn.ELU(m.alpha),
                nnq.LeakyReLU: lambda m: nn.LeakyReLU(m.negative_slope),
                nnq.Sigmoid: lambda m: nn.Sigmoid()}
_QUANTIZED_NAMESPACES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def _record_input_qparams(int8: nn.Module, example: torch.Tensor) -> dict[str, _QParams]:
    """The qparams of each quantized conv/linear's input in the int8 model (one forward)."""
    seen: dict[str, _QParams] = {}
    hooks = []
    for name, module in int8.named_modules():
        if type(module) in _CONVS or type(module) in _LINEARS:
            def hook(mod, args, name=name):
                x = args[0]
                if x.qscheme() != torch.per_tensor_affine:
                    raise ExportError(f"{name}: input quantized {x.qscheme()}; only per-tensor "
                                      "activations have a QDQ form here")
                seen[name] = _QParams(x.q_scale(), x.q_zero_point(), x.dtype)
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            int8(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def fake_quantized(int8: nn.Module, example: torch.Tensor, engine: str | None = None) -> nn.Module:
    """A float module computing what the converted eager int8 model `int8` computes, with
    fake quantization where it quantizes (its own scales and zero points); `int8` is untouched.

    `example` is one input batch (any values: only the qparams of layer inputs are recorded).
    Raises ExportError naming a quantized module kind that has no QDQ form here.
    """
    from quantlab.backend import engine_context

    with engine_context(engine) if engine else _nullcontext():
        inputs = _record_input_qparams(int8, example)
    mirror = copy.deepcopy(int8).cpu().eval()
    replaced: list[str] = []
    for name, module in list(mirror.named_modules()):
        if not name or any(name.startswith(f"{r}.") for r in replaced):
            continue  # inside a module replaced above (named_modules is depth first)
        kind = type(module)
        if kind in _CONVS:
            cls, relu = _CONVS[kind]
            layer = cls(module.in_channels, module.out_channels, module.kernel_size,
                        module.stride, module.padding, module.dilation, module.groups,
                        bias=module.bias() is not None, padding_mode=module.padding_mode)
            if module.bias() is not None:
                layer.bias = nn.Parameter(module.bias().detach().clone(), requires_grad=False)
            new = _QDQWeighted(layer, module.weight(), relu, inputs[name],
                               _QParams(module.scale, module.zero_point, torch.quint8))
        elif kind in _LINEARS:
            w = module.weight()
            bias = module.bias()
            layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            new = _QDQWeighted(layer, w, _LINEARS[kind], inputs[name],
                               _QParams(module.scale, module.zero_point, torch.quint8))
        elif kind is nnq.Quantize:
            new = _QParams(float(module.scale), int(module.zero_point), module.dtype)
        elif kind is nnq.DeQuantize:
            new = nn.Identity()
        elif kind is nnq.QFunctional:
            new = _QDQFunctional(_QParams(module.scale, module.zero_point, torch.quint8))
        elif kind in _ACTIVATIONS:
            new = _QDQActivation(_ACTIVATIONS[kind](module),
                                 _QParams(module.scale, module.zero_point, torch.quint8))
        elif kind is nnq.Dropout:
            new = nn.Identity()
        elif kind.__module__.startswith(_QUANTIZED_NAMESPACES):
            raise ExportError(f"{name}: {kind.__module__}.{kind.__name__} has no ONNX QDQ form in "
                              "quantlab; exportable: " + ", ".join(sorted(
                                  k.__name__ for k in [*_CONVS, *_LINEARS, *_ACTIVATIONS,
                                                       nnq.Quantize, nnq.DeQuantize,
                                                       nnq.QFunctional, nnq.Dropout])))
        else:
            continue
        mirror.set_submodule(name, new)
        replaced.append(name)
    return mirror


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- ONNX ------------------------------------------------------------------------------------
# torch.onnx.export keeps its state in process globals (GLOBALS.in_onnx_export): two exports at
# once (PTQ variants run on the flow's threads) fail. One at a time, then.
_EXPORT_LOCK = threading.Lock()


def _export(module: nn.Module, input_size: int, channels: int = 3) -> bytes:
    """torch.onnx.export (TorchScript-based, dynamo=False) with a dynamic batch dimension."""
    example = torch.zeros(1, channels, input_size, input_size)
    with _EXPORT_LOCK, tempfile.TemporaryDirectory(prefix="quantlab-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(module.eval(), (example,), path, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
        with open(path, "rb") as f:
            return f.read()


def to_onnx(int8: nn.Module, input_size: int, engine: str | None = None,
            channels: int = 3) -> bytes:
    """model.onnx bytes (QDQ) of a converted eager int8 model, with its own qparams."""
    example = torch.rand(1, channels, input_size, input_size)
    mirror = fake_quantized(int8, example, engine)
    return qdq_initializers(_export(mirror, input_size, channels))


def to_onnx_float(model: nn.Module, input_size: int, channels: int = 3) -> bytes:
    """model.onnx bytes of an eval-mode float model (the float baselines)."""
    return _export(copy.deepcopy(model).eval(), input_size, channels)


def qdq_initializers(data: bytes) -> bytes:
    """Store weights as int8 initializers: fold QuantizeLinear of constant weights away.

    Biases stay float, as the int8 TorchScript model adds them (fbgemm/onednn add a float bias
    before requantizing): ONNX Runtime and OpenVINO still fuse DQ -> Conv -> Q into int8
    kernels (QLinearConv), and int32 biases (scale = input x weight scale) changed the logits
    by up to 3 output steps against the TorchScript artifact.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    # Constant nodes (the exporter's scales and zero points) become initializers.
    constants = [n for n in graph.node if n.op_type == "Constant" and len(n.attribute) == 1
                 and n.attribute[0].name == "value"]
    for node in constants:
        graph.initializer.append(numpy_helper.from_array(
            numpy_helper.to_array(node.attribute[0].t), node.output[0]))
        graph.node.remove(node)
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    removed: set[str] = set()  # by output name: protobuf wrappers are made anew on each access

    def axis_of(node) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    # 1. Q(constant weight) -> DQ  becomes  int8 initializer -> DQ
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in consts:
            continue
        x, scale, zp = (consts.get(n) for n in node.input[:3])
        if scale is None or zp is None:
            continue
        axis = axis_of(node)
        shape = [1] * x.ndim
        if scale.ndim:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(x / scale.reshape(shape)) + zp.reshape(shape).astype(np.int32),
                    info.min, info.max).astype(zp.dtype)
        new_inits.append(numpy_helper.from_array(q, node.output[0]))
        consts[node.output[0]] = q
        removed.add(node.output[0])
    kept = [n for n in graph.node if not (n.op_type == "QuantizeLinear" and n.output[0] in removed)]
    # Nodes appended above must come before their consumers: topological order by rebuild.
    ordered = _topological(kept, {i.name for i in graph.initializer} | {i.name for i in new_inits}
                           | {i.name for i in graph.input})
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_inits)
    used = {name for n in graph.node for name in n.input}
    keep_inits = [i for i in graph.initializer if i.name in used or i.name in
                  {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _topological(nodes, available: set[str]):
    ready, out, pending = set(available), [], list(nodes)
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(not i or i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise ExportError("the exported ONNX graph has a cycle or a missing input: "
                              + ", ".join(n.name for n in rest[:3]))
        pending = rest
    return out


# -- OpenVINO IR -----------------------------------------------------------------------------
IR_FILES = FORMAT_FILES["openvino"]  # model.xml, model.bin


def to_openvino(onnx_bytes: bytes) -> dict[str, bytes]:
    """OpenVINO IR of an ONNX model (ov.convert_model, ov.save_model): {"model.xml", "model.bin"}.

    Weights are saved as they are in the ONNX file (compress_to_fp16=False): int8 initializers
    stay int8, float ones stay f32 so the f32 baseline is a real f32 model.
    """
    runtimes.decline_openvino_telemetry()
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="quantlab-ov-") as tmp:
        src = os.path.join(tmp, "model.onnx")
        with open(src, "wb") as f:
            f.write(onnx_bytes)
        ov.save_model(ov.convert_model(src), os.path.join(tmp, IR_FILES[0]),
                      compress_to_fp16=False)
        out = {}
        for name in IR_FILES:
            with open(os.path.join(tmp, name), "rb") as f:
                out[name] = f.read()
        return out


def nncf_ptq(float_onnx: bytes, calibration: Sequence[torch.Tensor]) -> dict[str, bytes]:
    """The in-run peer `nncf-ptq`: NNCF's own `nncf.quantize` (its defaults) of the float model,
    calibrated on the same images as quantlab's PTQ; its OpenVINO IR files.

    `float_onnx` is `to_onnx_float` of the fused float model (dynamic batch); `calibration` the
    calibration batches (images only). Every image is used (subset_size = their number: NNCF's
    default, 300, would otherwise cap them); nothing else departs from NNCF's defaults.
    """
    runtimes.decline_openvino_telemetry()
    import nncf
    import openvino as ov

    images = [img[None].numpy() for batch in calibration for img in batch]
    if not images:
        raise ConfigError("nncf-ptq needs at least one calibration image; got none")
    with tempfile.TemporaryDirectory(prefix="quantlab-nncf-") as tmp:
        src = os.path.join(tmp, "float.onnx")
        with open(src, "wb") as f:
            f.write(float_onnx)
        quantized = nncf.quantize(ov.convert_model(src), nncf.Dataset(images),
                                  subset_size=len(images))
        ov.save_model(quantized, os.path.join(tmp, IR_FILES[0]), compress_to_fp16=False)
        out = {}
        for name in IR_FILES:
            with open(os.path.join(tmp, name), "rb") as f:
                out[name] = f.read()
        return out


def write_files(files: dict[str, bytes], folder: str) -> str:
    """Write {name: bytes} into `folder`; the path of the first (model.onnx or model.xml)."""
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return os.path.join(folder, next(iter(files)))
