"""The quantization backends, behind one interface.

Two stacks implement `QuantBackend`, the verbs of PTQ (prepare, calibrate, convert) and QAT
(prepare_qat, freeze observers, freeze BN): the eager-mode recipe of the PyTorch tutorial
(`EagerBackend`, torch.ao.quantization: fuse, qconfig, prepare, convert; "eager") and PT2E
(`quantlab.pt2e.Pt2eBackend`: torch.export, torchao's prepare_pt2e / convert_pt2e with
X86InductorQuantizer; "pt2e").

    backend = get_backend()                                   # EagerBackend
    backend = get_backend("pt2e", input_size=224)             # Pt2eBackend (exports at that size)
    observed = backend.prepare_ptq(float_model, variant)      # observers inserted
    ...run calibration batches through `observed`...
    int8 = backend.convert(observed, variant.engine)          # a new int8 model
    package = backend.package(int8, variant.engine)           # the deployable artifact

Each backend ships its own artifact format: eager mode a TorchScript file, PT2E an
AOTInductor package (`Package.format`); `Package.runner` runs the artifact as stored, which is
what a run evaluates.

Mixed precision, for the per-layer sensitivity and the float fallback (quantlab.sensitivity),
is `MixedPrecisionBackend`: only the eager backend has it (`supports_mixed_precision`), since it
is built from eager modules that an exported graph does not have:

    backend.quantizable_layers(fused)                 # conv/linear layers PTQ turns into int8
    backend.prepare_ptq(model, variant, float_layers=["features.1.conv.0"])
    backend.prepare_isolated(model, variant)          # every layer quantized on its own

In eager mode a module's input and output are quantized tensors once converted, so a layer kept
in float is wrapped as DeQuantStub -> layer -> QuantStub (`FloatIsland`): its neighbours,
including FloatFunctional adds of residual blocks, still receive quantized tensors. A layer
quantized alone inside a float model is the converse, torch's `QuantWrapper`
(QuantStub -> layer -> DeQuantStub).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.nn.intrinsic.modules.fused import _FusedModule
from torch.ao.quantization.quantization_mappings import get_default_static_quant_module_mappings

from quantlab import algorithms, models
from quantlab.config import BACKENDS, RunConfig, VariantConfig
from quantlab.errors import ConfigError

# torch.backends.quantized.engine is process-global, and it decides how weights are packed at
# convert and load time. Parallel PTQ tasks (threads) take this lock around those steps.
_ENGINE_LOCK = threading.RLock()


class Layer(NamedTuple):
    """A quantizable layer of a fused float model: its module path, class and weight count."""

    name: str
    op_type: str
    num_params: int


@dataclass(frozen=True)
class Package:
    """A model as its backend deploys it: the artifact's bytes and what runs them."""

    format: str                             # registry.FORMATS: torchscript | aoti
    data: bytes
    optimisation: str                       # how it was built: script | freeze | aoti-freezing
    runner: nn.Module                       # runs the artifact as stored (evaluated by a run)
    made_by: dict[str, str] = field(default_factory=dict)  # what a consumer needs to know


class QuantBackend(Protocol):
    """What every backend does to a float model: PTQ and QAT, each ending in `convert`, and
    `package`, which turns the int8 (or float) model into the artifact the backend ships."""

    name: str

    def prepare_ptq(self, model: nn.Module, variant: VariantConfig) -> nn.Module:
        """An eval-mode float model with observers, ready for calibration."""

    def convert(self, model: nn.Module, engine: str) -> nn.Module:
        """A new int8 model (CPU, eval) from an observed or QAT model; the input is untouched."""

    def prepare_qat(self, model: nn.Module, engine: str) -> nn.Module:
        """A train-mode float model, prepared for QAT, with fake quantization inserted."""

    def freeze_observers(self, model: nn.Module) -> None:
        """Stop updating quantization ranges (scales and zero points are then fixed)."""

    def freeze_bn_stats(self, model: nn.Module) -> None:
        """Stop updating BatchNorm running mean/variance (BN stays folded in training)."""

    def package(self, model: nn.Module, engine: str | None,
                on_line: Callable[[str], None] | None = None) -> Package:
        """The deployable artifact of a converted (or float) model; `on_line` hears of slow work."""


@runtime_checkable
class MixedPrecisionBackend(QuantBackend, Protocol):
    """A backend that can keep chosen layers in float, quantize layers one at a time, and
    correct a converted model layer by layer (eager mode)."""

    def prepare_ptq(self, model: nn.Module, variant: VariantConfig,
                    float_layers: Sequence[str] = ()) -> nn.Module:
        """An eval-mode float model, fused and with observers, ready for calibration.

        `float_layers` (paths from `quantizable_layers`) stay in float after convert.
        """

    def quantizable_layers(self, fused: nn.Module) -> list[Layer]:
        """The conv/linear layers of a fused float model that PTQ turns into int8, in order."""

    def prepare_isolated(self, model: nn.Module, variant: VariantConfig) -> nn.Module:
        """Fused, with every quantizable layer observed on its own and the rest left float.

        After calibration and `convert`, the module at each layer's path takes and returns
        float tensors and quantizes only that layer (with the variant's qconfig).
        """


    def apply_after_convert(self, float_fused: nn.Module, int8: nn.Module,
                            variant: VariantConfig, batches) -> nn.Module:
        """The variant's post-convert algorithms (bias correction) on `int8`, in place.

        `float_fused` is the model `prepare_ptq` fused (in place); `batches` the calibration
        batches (re-iterable). Returns `int8`; does nothing for a variant without them.
        """


def supports_mixed_precision(backend: QuantBackend) -> bool:
    """Whether per-layer sensitivity, the float fallback and the post-convert algorithms
    (bias correction) can use `backend`."""
    return isinstance(backend, MixedPrecisionBackend)


def supported_engines() -> list[str]:
    """The quantized engines this build of torch offers on this CPU."""
    return list(torch.backends.quantized.supported_engines)


def check_engine(engine: str) -> str:
    """Refuse an engine this build of torch or this CPU cannot run."""
    supported = supported_engines()
    if engine not in supported:
        valid = [e for e in supported if e != "none"]
        raise ConfigError(f"quantization engine {engine!r} is not supported here; "
                          f"valid: {', '.join(valid)}")
    return engine


def qconfig_for(variant: VariantConfig) -> tq.QConfig:
    """The QConfig of a PTQ variant.

    ptq-minmax builds `default_qconfig` (per-tensor MinMax, activations 0..127) and ptq-x86
    builds `get_default_qconfig("x86")` (histogram activations, per-channel weights);
    "percentile" activations are quantlab.algorithms.PercentileObserver.
    """
    reduce_range = variant.reduce_range
    if reduce_range is None:
        reduce_range = variant.engine in ("x86", "fbgemm")
    qmax = 127 if reduce_range else 255
    activation = {
        "minmax": tq.MinMaxObserver.with_args(quant_min=0, quant_max=qmax),
        "moving_average_minmax": tq.MovingAverageMinMaxObserver.with_args(quant_min=0, quant_max=qmax),
        "histogram": tq.HistogramObserver.with_args(reduce_range=reduce_range),
        "percentile": algorithms.PercentileObserver.with_args(
            percentile=variant.activation_percentile, reduce_range=reduce_range),
    }[variant.activation_observer]
    weight = {
        "minmax": tq.default_weight_observer,
        "per_channel_minmax": tq.default_per_channel_weight_observer,
    }[variant.weight_observer]
    return tq.QConfig(activation=activation, weight=weight)


class EagerBackend:
    """torch.ao.quantization eager mode, as in the PyTorch tutorial."""

    name = "eager"

    def prepare_ptq(self, model: nn.Module, variant: VariantConfig,
                    float_layers: Sequence[str] = ()) -> nn.Module:
        check_engine(variant.engine)
        models.fuse(model, is_qat=False)
        if variant.cross_layer_equalization:
            algorithms.equalize(model)
        known = {layer.name for layer in self.quantizable_layers(model)}
        unknown = sorted(set(float_layers) - known)
        if unknown:
            raise ConfigError(f"float layers {', '.join(unknown)} are not quantizable layers of "
                              f"this model; valid: {', '.join(sorted(known))}")
        for name in float_layers:
            model.set_submodule(name, FloatIsland(model.get_submodule(name)))
        model.qconfig = qconfig_for(variant)
        return tq.prepare(model, inplace=False)

    def quantizable_layers(self, fused: nn.Module) -> list[Layer]:
        mapped = get_default_static_quant_module_mappings()
        weighted = (nn.modules.conv._ConvNd, nn.Linear)
        out: list[Layer] = []
        for name, module in fused.named_modules():
            if out and name.startswith(f"{out[-1].name}."):
                continue  # inside a fused layer (named_modules is depth first)
            first = module[0] if isinstance(module, _FusedModule) else module
            if type(module) in mapped and isinstance(first, weighted):
                out.append(Layer(name, type(module).__name__,
                                 sum(p.numel() for p in module.parameters())))
        return out

    def prepare_isolated(self, model: nn.Module, variant: VariantConfig) -> nn.Module:
        check_engine(variant.engine)
        models.fuse(model, is_qat=False)
        if variant.cross_layer_equalization:
            algorithms.equalize(model)
        qconfig = qconfig_for(variant)
        for layer in self.quantizable_layers(model):
            wrapper = tq.QuantWrapper(model.get_submodule(layer.name))
            wrapper.qconfig = qconfig
            model.set_submodule(layer.name, wrapper)
        model.qconfig = None
        return tq.prepare(model, inplace=False)

    def convert(self, model: nn.Module, engine: str) -> nn.Module:
        check_engine(engine)
        snapshot = copy.deepcopy(model).cpu().eval()
        with engine_context(engine):
            return tq.convert(snapshot, inplace=True).eval()

    def apply_after_convert(self, float_fused: nn.Module, int8: nn.Module,
                            variant: VariantConfig, batches) -> nn.Module:
        if variant.bias_correction:
            with engine_context(variant.engine):  # the corrected weights are packed again
                algorithms.correct_bias(float_fused, int8, batches)
        return int8

    def prepare_qat(self, model: nn.Module, engine: str) -> nn.Module:
        check_engine(engine)
        models.fuse(model, is_qat=True)
        model.qconfig = tq.get_default_qat_qconfig(engine)
        return tq.prepare_qat(model, inplace=False).train()

    def freeze_observers(self, model: nn.Module) -> None:
        model.apply(tq.disable_observer)

    def freeze_bn_stats(self, model: nn.Module) -> None:
        model.apply(nniqat.freeze_bn_stats)

    def package(self, model: nn.Module, engine: str | None,
                on_line: Callable[[str], None] | None = None) -> Package:
        """TorchScript (export.artifact_bytes); the module itself runs what the file holds."""
        from quantlab import export  # it imports this module (engine_context)

        return Package(format="torchscript", data=export.artifact_bytes(model, engine),
                       optimisation=export.ARTIFACT_OPTIMISATION, runner=model)


class FloatIsland(nn.Module):
    """A layer kept in float inside an int8 model: dequantize its input, run it, requantize.

    The QuantStub gets the model's qconfig, so after convert it quantizes the layer's float
    output with the scale its own observer recorded, which is what the layer's output observer
    would have recorded had it been quantized.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        module.qconfig = None  # explicit None is not overridden by the parent's qconfig
        self.dequant = tq.DeQuantStub()
        self.module = module
        self.quant = tq.QuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.module(self.dequant(x)))


_EAGER = EagerBackend()


def get_backend(name: str = "eager", input_size: int | None = None) -> QuantBackend:
    """The backend called `name`. PT2E exports the model at `input_size` (required for it)."""
    if name == "eager":
        return _EAGER
    if name == "pt2e":
        if input_size is None:
            raise ConfigError("backend pt2e needs the model's input_size (it exports the model)")
        from quantlab.pt2e import Pt2eBackend  # imports torchao: only runs that use it pay

        return Pt2eBackend(input_size)
    raise ConfigError(f"unknown quantization backend {name!r}; valid: {', '.join(BACKENDS)}")


def backend_for(cfg: RunConfig, name: str) -> QuantBackend:
    """The backend called `name` (eager | pt2e), set up for the run's input size."""
    return get_backend(name, cfg.data.transforms.input_size)


@contextmanager
def engine_context(name: str) -> Iterator[None]:
    """Hold the process-wide quantized engine at `name` (convert, load and run int8 models)."""
    check_engine(name)
    with _ENGINE_LOCK:
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = name
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous
