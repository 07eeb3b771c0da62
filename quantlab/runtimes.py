"""The runtimes an artifact can run in, behind one small interface; and their timing child.

    rt = get_runtime("onnxruntime")                 # or "torch-x86", "openvino", "openvino-f32"
    rt.supports("onnx")                             # True
    model = rt.load("model.onnx", num_threads=2)
    logits = model.run(batch)                       # numpy float32 NCHW in, logits out

Runtimes: torch (TorchScript, a quantized engine held for int8 files), AOTInductor packages
of PT2E programs ("aoti": torch._inductor.aoti_load_package, plain torch), ONNX Runtime (CPU
execution provider, fixed intra-op threads, sequential), OpenVINO (CPU, PERFORMANCE_HINT
LATENCY, INFERENCE_NUM_THREADS; "openvino-f32" also sets INFERENCE_PRECISION_HINT f32, since
on AMX/avx512_bf16 CPUs OpenVINO runs float models in bf16 unless told otherwise).

This module imports nothing from quantlab, and torch, onnxruntime and openvino only when a
runtime loads a file: the timing child (quantlab/_timer.py) loads it by its path, and run as a
script it predicts (`predict`) and reports which modules it imported, so a test can show an
exported artifact runs where neither quantlab nor torch is installed.

    python runtimes.py predict < spec.json      # {"path", "runtime", "num_threads", "inputs", "output"}
"""

from __future__ import annotations

import json
import os
import sys
from typing import Protocol

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run as a script: quantlab's modules (data, export, ...) must not shadow others

import numpy as np  # noqa: E402

FORMATS = ("torchscript", "aoti", "onnx", "openvino")
_SUFFIXES = {".pt": "torchscript", ".pt2": "aoti", ".onnx": "onnx", ".xml": "openvino"}


class LoadedModel(Protocol):
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (float32, [N, classes]) of a float32 NCHW batch."""


class Runtime(Protocol):
    name: str

    def supports(self, format: str) -> bool:
        """Whether this runtime runs artifacts of `format` (one of FORMATS)."""

    def load(self, path: str, num_threads: int) -> LoadedModel:
        """Load a local artifact file for inference with `num_threads` intra-op threads."""


def format_of(path: str) -> str:
    """The artifact format of a file, from its suffix (.pt, .onnx, .xml)."""
    suffix = os.path.splitext(path)[1]
    if suffix not in _SUFFIXES:
        raise ValueError(f"unknown artifact suffix {suffix!r} of {path}; valid: "
                         f"{', '.join(_SUFFIXES)}")
    return _SUFFIXES[suffix]


class TorchRuntime:
    """TorchScript in torch, holding quantized engine `engine` (None for float files)."""

    def __init__(self, engine: str | None = None):
        self.engine = engine
        self.name = f"torch-{engine}" if engine else "torch"

    def supports(self, format: str) -> bool:
        return format == "torchscript"

    def load(self, path: str, num_threads: int) -> LoadedModel:
        import torch

        held = _holding(num_threads, self.engine)
        return _TorchLoaded(held(lambda: torch.jit.load(path, map_location="cpu").eval()), held)


class AotiRuntime:
    """An AOTInductor package (a PT2E int8 program compiled by inductor) loaded with
    `torch._inductor.aoti_load_package`: plain torch, no torchao; any batch size."""

    name = "aoti"

    def supports(self, format: str) -> bool:
        return format == "aoti"

    def load(self, path: str, num_threads: int) -> LoadedModel:
        import torch

        held = _holding(num_threads)
        return _TorchLoaded(held(lambda: torch._inductor.aoti_load_package(path)), held)


def _holding(num_threads: int, engine: str | None = None):
    """Run a function with torch's threads (and quantized engine) set, restored afterwards:
    the process-wide settings hold only while this model loads or works."""
    import torch

    def held(fn):
        previous = torch.backends.quantized.engine, torch.get_num_threads()
        if engine:
            torch.backends.quantized.engine = engine
        torch.set_num_threads(num_threads)
        try:
            return fn()
        finally:
            torch.backends.quantized.engine = previous[0]
            torch.set_num_threads(previous[1])

    return held


class _TorchLoaded:
    """A loaded torch model (TorchScript module, AOTInductor runner) behind `run`."""

    def __init__(self, module, held):
        self.module, self.held = module, held

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.held(lambda: self.module(torch.from_numpy(batch)).numpy())


class OnnxRuntime:
    """ONNX Runtime, CPU execution provider, `num_threads` intra-op threads, sequential."""

    name = "onnxruntime"

    def supports(self, format: str) -> bool:
        return format == "onnx"

    def load(self, path: str, num_threads: int) -> LoadedModel:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        class _Loaded:
            def run(self, batch: np.ndarray) -> np.ndarray:
                return session.run(None, {input_name: batch})[0]

        return _Loaded()


class OpenVINORuntime:
    """OpenVINO CPU plugin with a LATENCY hint and INFERENCE_NUM_THREADS; `precision` "f32"
    forces f32 inference (default: the plugin's choice, bf16 on AMX CPUs)."""

    def __init__(self, precision: str | None = None):
        self.precision = precision
        self.name = f"openvino-{precision}" if precision else "openvino"

    def supports(self, format: str) -> bool:
        return format == "openvino"

    def load(self, path: str, num_threads: int) -> LoadedModel:
        decline_openvino_telemetry()
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": num_threads}
        if self.precision:
            config["INFERENCE_PRECISION_HINT"] = self.precision
        compiled = ov.Core().compile_model(path, "CPU", config)
        request = compiled.create_infer_request()

        class _Loaded:
            def run(self, batch: np.ndarray) -> np.ndarray:
                request.infer({0: batch})
                return request.get_output_tensor(0).data.copy()

        return _Loaded()


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    TorchRuntime(), TorchRuntime("x86"), TorchRuntime("onednn"), TorchRuntime("fbgemm"),
    TorchRuntime("qnnpack"), AotiRuntime(), OnnxRuntime(), OpenVINORuntime(),
    OpenVINORuntime("f32"))}


def decline_openvino_telemetry() -> None:
    """Decline openvino_telemetry (used by OpenVINO and NNCF) for this process, as its opt-out
    would: the Telemetry singleton, now and after every re-init, has consent False.

    Without a consent file in the user's home, `import openvino`, `ov.convert_model` and
    `nncf.quantize` send usage events to Google Analytics, each from a forked process; on a
    machine without internet those processes waited in getaddrinfo and the job's interpreter
    hung at exit (found running the flow offline). A production job must neither phone home
    nor hang: quantlab calls this before anything of it imports openvino or nncf.
    """
    try:
        from openvino_telemetry import Telemetry
    except ImportError:
        return
    if getattr(Telemetry.init, "_quantlab_declined", False):
        return
    original = Telemetry.init

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.consent = False

    init._quantlab_declined = True
    Telemetry.init = init
    made = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)
    if made is not None:  # an import already made the singleton
        made.consent = False


def get_runtime(name: str) -> Runtime:
    """A runtime by name (see RUNTIMES)."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; valid: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def runtimes_for(format: str, engine: str | None = None, int8: bool | None = None) -> list[str]:
    """Names of the runtimes that run `format`: TorchScript in torch holding `engine` (int8;
    an x86 artifact also under the onednn engine, which packs its weights afresh at load) or
    plain torch (float); ONNX in ONNX Runtime; IR in OpenVINO at its default precision, and
    for float models (`int8` False; default: whether an engine is given) also at f32."""
    int8 = engine is not None if int8 is None else int8
    if format == "torchscript":  # x86 dispatches to fbgemm or onednn: run it under onednn too
        return ([f"torch-{engine}", "torch-onednn"] if engine == "x86" else
                [f"torch-{engine}"] if engine else ["torch"])
    if format == "aoti":
        return ["aoti"]
    if format == "onnx":
        return ["onnxruntime"]
    if format == "openvino":
        return ["openvino"] if int8 else ["openvino", "openvino-f32"]
    raise ValueError(f"unknown artifact format {format!r}; valid: {', '.join(FORMATS)}")


def format_for(runtime: str) -> str:
    """The artifact format a runtime runs (torch*: torchscript, aoti, onnxruntime: onnx,
    openvino*)."""
    return next(f for f in FORMATS if get_runtime(runtime).supports(f))


def load_snippet(runtime: str, path: str | None = None, num_threads: int = 2) -> str:
    """Three lines that load an artifact file (default: its name in the run folder) and run
    it in `runtime`, without quantlab: what the manifest's `selected` and `pull` show."""
    fmt = format_for(runtime)
    path = path or {"torchscript": "model.torchscript.pt", "aoti": "model.pt2",
                    "onnx": "model.onnx", "openvino": "model.xml"}[fmt]
    if fmt == "aoti":
        return ("import torch\n"
                f"runner = torch._inductor.aoti_load_package({path!r})  # torch only, no torchao\n"
                "logits = runner(images)  # float32 NCHW tensor, any batch size")
    if fmt == "onnx":
        return ("import onnxruntime as ort\n"
                f"s = ort.InferenceSession({path!r}, providers=['CPUExecutionProvider'])\n"
                "logits = s.run(None, {'input': images})[0]  # float32 NCHW numpy")
    if fmt == "openvino":
        hint = ", 'INFERENCE_PRECISION_HINT': 'f32'" if runtime == "openvino-f32" else ""
        return ("import openvino as ov\n"
                f"m = ov.Core().compile_model({path!r}, 'CPU', {{'PERFORMANCE_HINT': "
                f"'LATENCY', 'INFERENCE_NUM_THREADS': {num_threads}{hint}}})\n"
                "logits = m(images)[0]  # float32 NCHW numpy")
    engine = runtime.removeprefix("torch").lstrip("-")
    first = (f"import torch; torch.backends.quantized.engine = '{engine}'" if engine
             else "import torch")
    return (f"{first}\n"
            f"m = torch.jit.load({path!r}).eval()\n"
            "logits = m(images)  # float32 NCHW tensor")


def imported_frameworks() -> list[str]:
    """Which of quantlab, torch, onnxruntime, openvino this process has imported."""
    return [m for m in ("quantlab", "torch", "onnxruntime", "openvino") if m in sys.modules]


# -- the child process -------------------------------------------------------------------------
def _predict_main() -> None:
    """`predict`: logits of the batches in spec["inputs"] (.npy, N x C x H x W) -> spec["output"]."""
    spec = json.loads(sys.stdin.read())
    model = get_runtime(spec["runtime"]).load(spec["path"], spec["num_threads"])
    images = np.load(spec["inputs"])
    batch = spec.get("batch_size", 16)
    logits = np.concatenate([model.run(np.ascontiguousarray(images[i:i + batch]))
                             for i in range(0, len(images), batch)])
    np.save(spec["output"], logits)
    print(json.dumps({"modules": imported_frameworks()}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["predict"]:
        _predict_main()
    else:
        sys.exit(f"usage: {os.path.basename(sys.argv[0])} predict < SPEC")
