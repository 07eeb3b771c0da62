"""PT2E quantization (torchao.quantization.pt2e) and AOTInductor packages: PyTorch's current stack.

Eager mode (quantlab.backend.EagerBackend) and TorchScript are deprecated; this is the path
PyTorch points to instead. The float model is exported as it is built (no eager fusion: the
quantizer finds conv-bn-relu patterns in the graph itself), quantized with torchao's
`X86InductorQuantizer`, and stored as an AOTInductor package that runs without torchao or
quantlab:

    backend = Pt2eBackend(input_size=224)
    preflight("mobilenet_v2", float_model, variant, input_size=224)   # one-line ConfigError
    observed = backend.prepare_ptq(float_model, variant)   # torch.export + prepare_pt2e
    ...run calibration batches through `observed`...
    int8 = backend.convert(observed, "x86")                # convert_pt2e, on a copy
    data = package_bytes(int8, input_size=224)             # AOTInductor, dynamic batch, frozen
    runner = load_package(data)                            # torch._inductor.aoti_load_package

QAT (the tutorial's schedule, done on the exported graph):

    qat_model = backend.prepare_qat(float_model.train(), "x86")   # export + prepare_qat_pt2e
    ...train; model.train() / model.eval() work (they switch dropout and batch norm)...
    backend.freeze_observers(qat_model)    # torchao's disable_observer: scales stop changing
    backend.freeze_bn_stats(qat_model)     # batch_norm nodes get training=False, and keep it

A consumer loads a package with plain torch (see `LOAD_SNIPPET`); `package_metadata` says
which torch built it and for which CPU ISA its kernels were compiled.
"""

from __future__ import annotations

import copy
import io
import platform
import time
import types
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from quantlab.backend import Package
from quantlab.config import (PT2E_ENGINE, VariantConfig, pt2e_problem)
from quantlab.errors import ConfigError

# torchao is imported on first use (its warnings are silenced by quantlab/_deprecations.py,
# installed when quantlab is imported): an eager-only run never pays for it.

ENGINE = PT2E_ENGINE  # X86InductorQuantizer lowers to oneDNN int8 kernels through inductor only
EXPORT_BATCH = 2  # the traced batch: a batch of 1 would be specialised as a constant
MAX_BATCH = 4096  # the dynamic batch dimension's upper bound
# batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
_BN_TRAINING_ARG = 5
_BN_FROZEN_ATTR = "_quantlab_bn_frozen"

LOAD_SNIPPET = """\
import torch
runner = torch._inductor.aoti_load_package("model.pt2")   # torch only: no torchao, no quantlab
logits = runner(torch.randn(8, 3, 224, 224))              # any batch size
"""


def _pt2e():
    """torchao's pt2e namespace and its x86 inductor quantizer module (imported on first use)."""
    import torchao.quantization.pt2e as pt2e
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  (prepare_pt2e, convert_pt2e)
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86

    _speed_up_pattern_rewrites()
    return pt2e, x86


_PATTERN_GRAPHS: dict = {}


def _speed_up_pattern_rewrites() -> None:
    """Make torchao's QAT graph rewrites export fewer pattern graphs (outputs unchanged).

    prepare_qat_pt2e fuses and convert_pt2e folds BN into the convolutions by matching small
    pattern graphs, each made by a torch.export of a pattern function
    (`_get_aten_graph_module_for_pattern`, ~0.2 s each): ~100 per call, for conv1d, conv2d,
    conv_transpose1d and conv_transpose2d alike. Measured on MobileNetV2 at 32 px (1 thread):
    a convert of the QAT graph took 14 s, the model's own part well under one, and QAT converts
    a copy after every epoch; model.train() / model.eval() of an exported graph export
    patterns too (0.5 s each). Two changes, both keyed on what cannot alter the result:
    - a convolution kind the graph does not contain cannot match: its fuse/fold pass is skipped
      (as long as another kind's pass runs, which does the shared clean-up);
    - a pattern's graph depends only on the pattern function (its code and the values it
      closes over) and its example inputs' shapes: it is exported once per process and handed
      out as a copy. Patterns it cannot key (no code object, unhashable closure) are exported
      as before.
    With both, the first convert of MobileNetV2's QAT graph takes ~4 s and later ones ~2.5 s.
    """
    from torchao.quantization.pt2e import qat_utils, utils

    original = utils._get_aten_graph_module_for_pattern
    if getattr(original, "_quantlab_memoized", False):
        return
    _skip_absent_convolutions(qat_utils)

    def signature(x):
        return ("tensor", tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x

    def memoized(pattern, example_inputs, is_cuda=False, **kwargs):
        fn = getattr(pattern, "fn", pattern)  # torchao wraps pattern functions in a module
        try:
            key = (fn.__code__, tuple(c.cell_contents for c in fn.__closure__ or ()),
                   tuple(signature(x) for x in example_inputs), is_cuda,
                   tuple(sorted((k, signature(v)) for k, v in kwargs.items())))
            hash(key)
        except (AttributeError, TypeError, ValueError):
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERN_GRAPHS:
            _PATTERN_GRAPHS[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERN_GRAPHS[key])

    memoized._quantlab_memoized = True
    utils._get_aten_graph_module_for_pattern = memoized     # export_utils imports it per call
    qat_utils._get_aten_graph_module_for_pattern = memoized  # qat_utils imported it by name


def _skip_absent_convolutions(qat_utils) -> None:
    """Run qat_utils' per-convolution-kind fuse (prepare) and fold (convert) passes only for
    the kinds of convolution the graph has (one pass always runs: it also cleans up)."""
    import torch.nn.functional as F

    ops = {F.conv1d: torch.ops.aten.conv1d, F.conv2d: torch.ops.aten.conv2d,
           F.conv_transpose1d: torch.ops.aten.conv_transpose1d,
           F.conv_transpose2d: torch.ops.aten.conv_transpose2d}

    def kinds(m) -> set:
        return {getattr(n.target, "overloadpacket", None) for n in m.graph.nodes
                if n.op == "call_function"}

    def only_present(helper):
        def run(m, conv_fn, *args, **kwargs):
            present = kinds(m) & set(ops.values())
            if conv_fn in ops and present and ops[conv_fn] not in present:
                return m
            return helper(m, conv_fn, *args, **kwargs)
        return run

    for name in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper"):
        setattr(qat_utils, name, only_present(getattr(qat_utils, name)))


def example_input(input_size: int, batch_size: int = EXPORT_BATCH) -> torch.Tensor:
    """A random NCHW image batch of the model's input size."""
    return torch.randn(batch_size, 3, input_size, input_size)


def export(model: nn.Module, input_size: int) -> torch.fx.GraphModule:
    """torch.export the model in its current mode (eval for PTQ, train for QAT), dynamic batch.

    Returns the exported program's module (what prepare_pt2e and prepare_qat_pt2e take).
    """
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(model, (example_input(input_size),),
                                  dynamic_shapes=({0: batch},))
    return program.module()


def quantizer(variant: VariantConfig | None, is_qat: bool = False):
    """An X86InductorQuantizer with its default static config, adjusted by the variant.

    `activation_observer` swaps the PTQ activation observer (the default is the quantizer's
    HistogramObserver, as in `get_default_qconfig("x86")`); `reduce_range` None means "only
    where the CPU lacks VNNI", the quantizer's own advice. QAT uses the quantizer's QAT config
    (fused moving-average fake quantization, per-channel weights) as it is.
    """
    _, x86 = _pt2e()
    reduce_range = variant.reduce_range if variant and variant.reduce_range is not None \
        else not has_vnni()
    config = x86.get_default_x86_inductor_quantization_config(is_qat=is_qat,
                                                              reduce_range=reduce_range)
    if variant is not None and not is_qat and variant.activation_observer != "histogram":
        pt2e, _ = _pt2e()
        observer = {"minmax": pt2e.MinMaxObserver,
                    "moving_average_minmax": pt2e.MovingAverageMinMaxObserver}[variant.activation_observer]
        activation = replace(config.input_activation,
                             observer_or_fake_quant_ctr=observer.with_args(eps=2**-12))
        config = replace(config, input_activation=activation, output_activation=activation)
    return x86.X86InductorQuantizer().set_global(config)


def has_vnni() -> bool:
    """Whether this CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX)."""
    from quantlab.timing import cpu_model_and_flags

    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_model_and_flags()[1]))


def check_variant(variant: VariantConfig) -> None:
    """Refuse settings X86InductorQuantizer does not offer (one line, the valid values).

    A validated config has already refused them (config.pt2e_problem); this guards variants
    built in code with `model_copy(update=...)`, which skips validation.
    """
    problem = pt2e_problem(variant.model_copy(update={"backend": "pt2e"}))
    if problem:
        raise ConfigError(problem)


def check_engine(engine: str) -> str:
    if engine != ENGINE:
        raise ConfigError(f"quantization engine {engine!r} is not available with backend pt2e; "
                          f"valid: {ENGINE}")
    return engine


def lowering_problem() -> str | None:
    """Why X86InductorQuantizer's int8 program cannot be lowered on this machine, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return f"the CPU is {platform.machine()}, and X86InductorQuantizer lowers to x86 only"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn), which runs its int8 kernels"
    if not hasattr(torch.ops.onednn, "qconv_pointwise"):
        return "this torch build has no oneDNN int8 convolution (torch.ops.onednn.qconv_pointwise)"
    from torch._inductor import cpu_vec_isa

    if not cpu_vec_isa.valid_vec_isa_list():
        return "inductor finds no vector ISA (AVX2 or AVX-512) on this CPU to compile kernels for"
    return None


def preflight(model_name: str, model: nn.Module, variant: VariantConfig | None,
              input_size: int) -> None:
    """Fail fast, in one line naming the model and the reason, before anything is stored.

    Checks the variant's settings, that this CPU can lower the quantizer's program, and that
    torch.export exports the model (a deep copy, in eval mode, on a cheap input).
    """
    if variant is not None:
        check_variant(variant)
    problem = lowering_problem()
    if problem:
        raise ConfigError(f"model {model_name}: backend pt2e cannot run here: {problem}")
    try:
        export(copy.deepcopy(model).eval(), input_size)
    except Exception as e:  # torch.export's errors are long: keep their first line
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"model {model_name} cannot be exported by torch.export for backend "
                          f"pt2e ({type(e).__name__}: {first[:300]})") from None


# -- train/eval on an exported graph -----------------------------------------------------------
def set_training(model: torch.fx.GraphModule, mode: bool) -> torch.fx.GraphModule:
    """model.train(mode) for an exported graph: torchao's move_exported_model_to_train/eval.

    Those rewrite dropout and batch norm (an exported graph ignores `.training`); batch norm
    that `freeze_bn_stats` froze stays frozen when the model goes back to train mode.
    """
    pt2e, _ = _pt2e()
    if mode:
        pt2e.move_exported_model_to_train(model)
        if getattr(model, _BN_FROZEN_ATTR, False):
            _set_bn_training(model, False)
    else:
        pt2e.move_exported_model_to_eval(model)
    return model


def allow_train_eval(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make `model.train()` / `model.eval()` (which quantlab's loops call) use `set_training`."""

    def _train(self, mode: bool = True):
        return set_training(self, mode)

    def _eval(self):
        return set_training(self, False)

    model.train = types.MethodType(_train, model)
    model.eval = types.MethodType(_eval, model)
    return model


def _bn_nodes(model: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in model.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default)]


def _set_bn_training(model: torch.fx.GraphModule, training: bool) -> None:
    """The PT2E QAT tutorial's BN freeze: set batch_norm's `training` argument, recompile."""
    for node in _bn_nodes(model):
        args = list(node.args)
        args[_BN_TRAINING_ARG] = training
        node.args = tuple(args)
    model.recompile()


def bn_training(model: torch.fx.GraphModule) -> list[bool]:
    """The `training` flag of each batch_norm node (True: batch statistics, updating running ones)."""
    return [bool(n.args[_BN_TRAINING_ARG]) for n in _bn_nodes(model)]


# -- the backend --------------------------------------------------------------------------------
class Pt2eBackend:
    """torchao.quantization.pt2e with X86InductorQuantizer: the `QuantBackend` core verbs.

    Mixed precision (per-layer sensitivity, the float fallback) is eager-only: it is built on
    eager modules (FloatIsland, QuantWrapper) that an exported graph does not have.
    """

    name = "pt2e"

    def __init__(self, input_size: int):
        if input_size < 8:
            raise ConfigError(f"input_size {input_size} is too small for backend pt2e; valid: >= 8")
        self.input_size = input_size

    def prepare_ptq(self, model: nn.Module, variant: VariantConfig) -> torch.fx.GraphModule:
        """Export the eval-mode float model and insert the quantizer's observers."""
        check_variant(variant)
        pt2e, _ = _pt2e()
        graph = export(model.eval(), self.input_size)
        observed = pt2e.quantize_pt2e.prepare_pt2e(graph, quantizer(variant))
        return allow_train_eval(observed)

    def convert(self, model: nn.Module, engine: str) -> torch.fx.GraphModule:
        """A new int8 program (eval, q/dq ops around float ops) from an observed or QAT model."""
        check_engine(engine)
        pt2e, _ = _pt2e()
        snapshot = copy.deepcopy(_unwrap(model)).cpu()
        set_training(snapshot, False)
        return allow_train_eval(pt2e.quantize_pt2e.convert_pt2e(snapshot))

    def prepare_qat(self, model: nn.Module, engine: str) -> torch.fx.GraphModule:
        """Export the train-mode float model; prepare_qat_pt2e folds BN into the conv for QAT."""
        check_engine(engine)
        pt2e, _ = _pt2e()
        graph = export(model.train(), self.input_size)
        prepared = pt2e.quantize_pt2e.prepare_qat_pt2e(graph, quantizer(None, is_qat=True))
        setattr(prepared, _BN_FROZEN_ATTR, False)
        return allow_train_eval(prepared)

    def freeze_observers(self, model: nn.Module) -> None:
        pt2e, _ = _pt2e()
        model.apply(pt2e.disable_observer)

    def freeze_bn_stats(self, model: nn.Module) -> None:
        graph = _unwrap(model)
        setattr(graph, _BN_FROZEN_ATTR, True)
        _set_bn_training(graph, False)

    def package(self, model: nn.Module, engine: str | None,
                on_line: Callable[[str], None] | None = None) -> Package:
        """An AOTInductor package (`package_bytes`), loaded back: the runner is the package."""
        if engine is not None:
            check_engine(engine)
        data, meta = package_bytes(model, self.input_size, on_line=on_line)
        return Package(format="aoti", data=data, optimisation="aoti-freezing",
                       runner=PackagedModel(load_package(data)), made_by=meta)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model) if isinstance(
        model, nn.parallel.DistributedDataParallel) else model


# -- the artifact: an AOTInductor package ---------------------------------------------------------
def package_metadata(compile_seconds: float | None = None) -> dict[str, str]:
    """What a consumer of a package needs: torch version, the CPU ISA it was compiled for.

    Stored inside the package (AOTInductor metadata, strings only) and meant for the manifest.
    """
    from torch._inductor import cpu_vec_isa

    from quantlab.timing import cpu_model_and_flags

    cpu, flags = cpu_model_and_flags()
    meta = {"format": "aoti", "torch": torch.__version__, "vec_isa": str(cpu_vec_isa.pick_vec_isa()),
            "cpu": cpu, "cpu_flags": ",".join(flags), "machine": platform.machine(),
            "dynamic_dims": "batch"}
    if compile_seconds is not None:
        meta["compile_seconds"] = f"{compile_seconds:.1f}"
    return meta


def package_bytes(model: nn.Module, input_size: int, freezing: bool = True,
                  on_line: Callable[[str], None] | None = None) -> tuple[bytes, dict[str, str]]:
    """Export an int8 (or float) model with a dynamic batch and compile it with AOTInductor.

    Returns the .pt2 package and its metadata (`package_metadata`). `freezing` lets inductor
    treat weights as constants, which is what packs int8 weights for oneDNN and fuses
    dequantize-conv-quantize into one int8 convolution. Compiling takes tens of seconds
    (about a minute and a half for MobileNetV2 at 224 on two cores): `on_line` hears of it.
    """
    graph = _unwrap(model)
    if isinstance(graph, torch.fx.GraphModule):
        set_training(graph, False)
    else:
        graph.eval()
    start = time.perf_counter()
    with torch.no_grad():
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        program = torch.export.export(graph, (example_input(input_size),),
                                      dynamic_shapes=({0: batch},))
        if on_line:
            on_line(f"compiling an AOTInductor package at {input_size} px (freezing={freezing}); "
                    "this takes tens of seconds")
        meta = package_metadata()
        buf = io.BytesIO()
        torch._inductor.aoti_compile_and_package(
            program, package_path=buf,
            inductor_configs={"freezing": freezing, "aot_inductor.metadata": meta})
    seconds = time.perf_counter() - start
    meta = {**meta, "compile_seconds": f"{seconds:.1f}"}
    if on_line:
        on_line(f"AOTInductor package compiled in {seconds:.0f} s ({len(buf.getvalue())} bytes)")
    return buf.getvalue(), meta


def load_package(data: bytes | str):
    """Load an AOTInductor package (bytes or a local path) with plain torch; call it on a batch.

    Verify its sha256 against a manifest first: a package holds compiled code.
    """
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    return torch._inductor.aoti_load_package(source)


class PackagedModel(nn.Module):
    """A loaded AOTInductor package as an nn.Module, for quantlab's evaluate and bench loops."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.runner(images)
