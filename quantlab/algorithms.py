"""PTQ algorithms beyond the tutorial's observers, without any training.

Each is an option of a PTQ variant (quantlab.config.VariantConfig), so it combines with any
engine and observer:

- Cross-layer equalization (`equalize`; Nagel et al. 2019, "Data-Free Quantization Through
  Weight Equalization and Bias Correction", section 4.1). For two consecutive layers with only
  a ReLU (or nothing) between them, scaling output channel i of the first by 1/s_i and input
  channel i of the second by s_i leaves the float function unchanged, because ReLU(x/s) =
  ReLU(x)/s for s > 0. s_i = sqrt(r1_i / r2_i) gives both channels the range sqrt(r1_i r2_i),
  so one per-tensor scale fits every channel far better (MobileNetV2's depthwise convolutions
  have per-channel ranges that differ 100x). It runs on the fused float model, before
  observers. torch's `torch.ao.quantization._equalize` was the starting point; it refuses the
  pairs a quantizable MobileNetV2 is made of (a grouped conv as the second layer, the
  expand -> depthwise pair: "Number of output channels of first arg do not match") and uses
  max - min where symmetric int8 weights need max |w|, hence this implementation.
- Empirical bias correction (`correct_bias`; the same paper, section 4.2, measured rather than
  derived). After convert, layer by layer in order, each int8 conv/linear's bias is shifted
  by the mean per-channel difference between its pre-activation output in the int8 model and
  in the float model, on the calibration batches. Layers are corrected in order, each measured
  with the earlier ones already corrected. torch's `torch.ao.quantization._correct_bias` does
  not see fused modules (ConvReLU2d is neither nn.Conv2d nor nnq.Conv2d there), measures after
  the ReLU, and assigns to the tensor `bias()` returns, which does not reach the packed
  weights; here the bias is repacked with `set_weight_bias`.
- Percentile activation calibration (`PercentileObserver`): the histogram torch's
  HistogramObserver keeps, clipped at a percentile (e.g. 99.99) instead of searched for the
  least L2 error, as ONNX Runtime and TensorRT calibrate.
"""

from __future__ import annotations

import threading

from collections.abc import Iterable

import torch
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.intrinsic.modules.fused import _FusedModule

from quantlab.errors import ConfigError

# Modules CLE rescales: float layers (after eval-mode fusion) whose activation, if any, is a ReLU.
_LINEAR_LAYERS = (nn.Conv2d, nn.Linear)
_FUSED_WITH_RELU = (torch.ao.nn.intrinsic.ConvReLU2d, torch.ao.nn.intrinsic.LinearReLU)
# What may sit between two equalized layers: ops that commute with a positive per-channel scale.
_PASS_MODULES = (nn.ReLU, nn.Dropout, nn.Identity, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.adaptive_avg_pool2d, F.avg_pool2d, torch.flatten,
                   F.dropout}


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


# -- cross-layer equalization --------------------------------------------------------------
def _layer(module: nn.Module) -> nn.Module | None:
    """The conv/linear of a float layer CLE can rescale (the module or its fused first part)."""
    if isinstance(module, _FUSED_WITH_RELU):
        return module[0]
    if type(module) in _LINEAR_LAYERS:
        return module
    return None


class _FusedLeafTracer(torch.fx.Tracer):
    """fx tracing that keeps fused modules (ConvReLU2d, a Sequential) whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _FusedModule) or super().is_leaf_module(m, qualname)


# torch.fx tracing patches nn.Module.__call__ for every thread while it runs: a PTQ variant
# calibrating in another thread would then fail ("module is not installed as a submodule").
# Pairs depend on the architecture only, so each one is traced once, under a lock, and the
# pipeline's preflight traces the run's architectures before PTQ variants run in parallel.
_PAIRS: dict[tuple, list[tuple[str, str]]] = {}
_TRACE_LOCK = threading.Lock()


def _structure(model: nn.Module) -> tuple:
    return tuple((name, type(m).__name__, tuple(getattr(m, "weight", torch.empty(0)).shape))
                 for name, m in model.named_modules())


def equalization_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Consecutive layer pairs of a fused float model that CLE can rescale, in graph order.

    A pair is (first, second) where the first's output reaches only the second, through ReLUs,
    pooling, flatten or dropout at most, and the second's input channels are the first's
    output channels (grouped and depthwise convolutions included). Found by tracing the model
    with torch.fx, once per architecture (see _PAIRS).
    """
    key = _structure(model)
    with _TRACE_LOCK:
        if key not in _PAIRS:
            _PAIRS[key] = _traced_pairs(model)
        return list(_PAIRS[key])


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]]:
    try:
        graph = _FusedLeafTracer().trace(model)
    except Exception as e:  # tracing runs arbitrary forward code: any failure means "cannot"
        raise ConfigError(f"cross_layer_equalization needs a model torch.fx can trace; "
                          f"{type(model).__name__} cannot be ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); turn it off") from None
    modules = dict(model.named_modules())

    def is_layer(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and _layer(modules[node.target]) is not None

    def passes(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(modules[node.target], _PASS_MODULES)
        return node.op == "call_function" and node.target in _PASS_FUNCTIONS

    pairs = []
    for node in graph.nodes:
        if not is_layer(node):
            continue
        nxt = node
        while len(nxt.users) == 1:
            (nxt,) = nxt.users
            if not passes(nxt):
                break
        if nxt is node or not is_layer(nxt):
            continue
        first, second = _layer(modules[node.target]), _layer(modules[nxt.target])
        num_in = second.in_channels if isinstance(second, nn.Conv2d) else second.in_features
        if first.weight.shape[0] == num_in:
            pairs.append((node.target, nxt.target))
    return pairs


def _out_ranges(layer: nn.Module) -> torch.Tensor:
    """max |w| of each output channel."""
    return layer.weight.detach().abs().flatten(1).amax(dim=1)


def _in_view(layer: nn.Module) -> torch.Tensor:
    """The weight as [groups, out/groups, in/groups, rest]: input channel c is [c // k, :, c % k]."""
    w = layer.weight.detach()
    groups = getattr(layer, "groups", 1)
    return w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)


def _in_ranges(layer: nn.Module) -> torch.Tensor:
    """max |w| over the weights that read each input channel."""
    return _in_view(layer).abs().amax(dim=(1, 3)).flatten()


def _rescale(first: nn.Module, second: nn.Module, scale: torch.Tensor) -> None:
    """Divide the first layer's output channels by `scale`, multiply the second's inputs."""
    with torch.no_grad():
        first.weight.div_(scale.view(-1, *[1] * (first.weight.dim() - 1)))
        if first.bias is not None:
            first.bias.div_(scale)
        view = _in_view(second)
        groups, _, per_group, _ = view.shape
        second.weight.copy_((view * scale.view(groups, 1, per_group, 1)).reshape(second.weight.shape))


def equalize(model: nn.Module, max_iterations: int = 20, tolerance: float = 1e-3) -> list[tuple[str, str]]:
    """Cross-layer equalization of a fused, eval-mode float model, in place; returns the pairs.

    Pairs are equalized in graph order, and the whole pass repeated until no scale moves more
    than `tolerance` (relative) or `max_iterations` passes: a layer that is the second of one
    pair and the first of the next (MobileNetV2's depthwise conv) settles in a few passes.
    Channels whose weights are all zero are left alone.
    """
    pairs = equalization_pairs(model)
    layers = {name: _layer(model.get_submodule(name)) for pair in pairs for name in pair}
    for _ in range(max_iterations):
        largest = 0.0
        for a, b in pairs:
            first, second = layers[a], layers[b]
            r1, r2 = _out_ranges(first), _in_ranges(second)
            scale = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-30)),
                                torch.ones_like(r1))
            _rescale(first, second, scale)
            largest = max(largest, float((scale - 1).abs().max()))
        if largest < tolerance:
            break
    return pairs


# -- bias correction -----------------------------------------------------------------------
_QUANTIZED_LAYERS = (nnq.Conv2d, nnq.Linear)  # and their fused subclasses (ConvReLU2d, ...)


def _pre_activation(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What an int8 conv/linear computes before its activation and requantization, in float."""
    x = x.dequantize() if x.is_quantized else x
    weight, bias = module.weight().dequantize(), module.bias()
    if isinstance(module, nnq.Conv2d):
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            return F.conv2d(x, weight, bias, module.stride, 0, module.dilation, module.groups)
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation,
                        module.groups)
    return F.linear(x, weight, bias)


def _channel_sum(y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over every dimension but the channels (dim 1), and how many values each summed."""
    dims = [d for d in range(y.dim()) if d != 1]
    return y.double().sum(dim=dims), y.numel() // y.shape[1]


class _Images:
    """The images of re-iterable batches (a DataLoader, a list), each pass read anew."""

    def __init__(self, batches: Iterable):
        self.batches = list(batches) if iter(batches) is batches else batches  # one-shot: keep

    def __iter__(self):
        for b in self.batches:
            yield b[0] if isinstance(b, (tuple, list)) else b


@torch.inference_mode()
def _float_means(float_model: nn.Module, names: list[str], batches: _Images
                 ) -> dict[str, torch.Tensor]:
    """Mean pre-activation output per channel of each named float layer, in one pass."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name: str):
        def record(_module, _inputs, y):
            s, n = _channel_sum(y)
            sums[name] = sums[name] + s if name in sums else s
            counts[name] += n
        return record
    handles = []
    for name in names:
        module = float_model.get_submodule(name)
        linear = module[0] if isinstance(module, _FusedModule) else module
        handles.append(linear.register_forward_hook(hook(name)))
    try:
        float_model.eval()
        for images in batches:
            float_model(images)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in names if counts[name]}


@torch.inference_mode()
def _int8_mean(int8: nn.Module, name: str, batches: _Images) -> torch.Tensor | None:
    """Mean pre-activation output per channel of one int8 layer, on the int8 model's inputs.

    The forward pass stops at that layer: later layers do not matter to it.
    """
    module = int8.get_submodule(name)
    total, count = None, 0

    def record(mod, inputs):
        nonlocal total, count
        s, n = _channel_sum(_pre_activation(mod, inputs[0]))
        total, count = (s if total is None else total + s), count + n
        raise _Stop
    handle = module.register_forward_pre_hook(record)
    try:
        for images in batches:
            try:
                int8(images)
            except _Stop:
                pass
    finally:
        handle.remove()
    return None if total is None else total / count


def correct_bias(float_model: nn.Module, int8: nn.Module, batches: Iterable) -> dict[str, float]:
    """Empirical bias correction of a converted int8 model, in place; {layer: mean |shift|}.

    `float_model` is the fused float model `int8` was converted from (with the same module
    paths: the model `prepare_ptq` fused in place); `batches` yields images or (images, labels)
    and is read once, then once per layer (up to that layer): pass a DataLoader with a fixed
    order or a list (a one-shot iterator is held in memory).
    For each int8 conv/linear with a bias, in order: bias -= E[int8 pre-activation] -
    E[float pre-activation], per output channel, over all batches. Call it with the engine the
    model was converted for selected (`quantlab.backend.engine_context`): the corrected
    weights are packed again.
    """
    images = _Images(batches)
    if next(iter(images), None) is None:
        raise ValueError("bias correction needs at least one calibration batch")
    names = [name for name, m in int8.named_modules()
             if isinstance(m, _QUANTIZED_LAYERS) and m.bias() is not None]
    float_means = _float_means(float_model, names, images)
    int8.eval()
    shifts: dict[str, float] = {}
    for name in names:
        if name not in float_means:
            continue  # not reached on these inputs
        quant_mean = _int8_mean(int8, name, images)
        if quant_mean is None:
            continue
        module = int8.get_submodule(name)
        error = (quant_mean - float_means[name]).to(module.bias().dtype)
        module.set_weight_bias(module.weight(), module.bias() - error)
        shifts[name] = float(error.abs().mean())
    return shifts


# -- percentile calibration ----------------------------------------------------------------
class PercentileObserver(tq.HistogramObserver):
    """A histogram observer whose range is clipped at a percentile of the values it has seen.

    The histogram is HistogramObserver's (2048 bins over the running min..max, merged across
    batches); the range kept is [the (100 - p)th, the p-th] percentile, widened to hold 0.
    """

    def __init__(self, percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        if not 50 < percentile <= 100:
            raise ConfigError(f"activation percentile {percentile} must be in (50, 100]")
        self.percentile = percentile

    def calculate_qparams(self):  # type: ignore[override]
        if self.min_val == float("inf") and self.max_val == float("-inf") or not self.histogram.sum():
            return super().calculate_qparams()  # torch's warning and default qparams
        hist = self.histogram.double()
        cdf = hist.cumsum(0) / hist.sum()
        tail = (100.0 - self.percentile) / 100.0
        lo = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=cdf.dtype)))
        hi = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=cdf.dtype)))
        width = (self.max_val - self.min_val) / self.bins
        new_min = self.min_val + width * (lo if tail > 0 else 0)
        new_max = self.min_val + width * (min(hi + 1, self.bins) if tail > 0 else self.bins)
        return self._calculate_qparams(new_min, new_max)

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, " + super().extra_repr()
