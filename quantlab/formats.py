"""Deployment artifacts of a run: ONNX and OpenVINO exports, the nncf-ptq peer, the check that
each export computes what its TorchScript artifact computes, and timing per (artifact, runtime).

    files = export_int8(int8, engine="x86", input_size=224)   # model.onnx, model.xml, model.bin
    files = export_float(fused_float, input_size=224)
    files = nncf_peer(files_float["model.onnx"], calibration_batches)   # model.xml, model.bin
    eq = check_equivalence(paths["model.onnx"], "onnxruntime", int8_ts_path, "torch-x86",
                           float_ts_path, val_loader, num_threads=2)
    rows = measure_runtimes({"ptq-x86/onnxruntime": (onnx_path, "onnxruntime"), ...},
                            input_size=224, batch_sizes=(1, 8), num_threads=2)

Timing method: one fresh process per (artifact, runtime) (quantlab/runtimes.py run as a
script: it imports neither quantlab nor the runtimes it does not use), each loaded and warmed
up once; then rounds in which each process in turn times BLOCK consecutive calls (who goes
first rotates), as quantlab.timing.measure does within one process. Only one process runs at
a time, and a short pause between turns lets the previous one's worker threads go idle, so
that no runtime's thread pool competes with another's.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from quantlab import installed_versions, onnx_export, runtimes
from quantlab.errors import ConfigError
from quantlab.sensitivity import Sqnr

BLOCK = 5                 # consecutive timed calls of one (artifact, runtime) per turn
TURN_PAUSE_S = 0.05       # between turns: lets the previous runtime's spinning threads sleep
MIN_AGREEMENT = 99.0      # percent of images whose top-1 matches the TorchScript int8 artifact
MAX_TOP1_DIFF = 0.3       # top-1 points between an export and its TorchScript artifact
RUNTIME_TIMER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtimes.py")
# Which file of an artifact's set each format is loaded from, and what the set holds.
FORMAT_FILES = {"torchscript": ("model.torchscript.pt",), "onnx": ("model.onnx",),
                "openvino": onnx_export.IR_FILES}


def versions() -> dict[str, str]:
    """Versions of the libraries that make and run the deployment artifacts (manifest)."""
    return installed_versions("torch", "onnx", "onnxruntime", "openvino", "nncf")


def export_int8(int8: nn.Module, engine: str, input_size: int) -> dict[str, bytes]:
    """model.onnx (QDQ with the variant's own qparams) and its OpenVINO IR, model.xml + .bin."""
    onnx_bytes = onnx_export.to_onnx(int8, input_size, engine)
    return {"model.onnx": onnx_bytes, **onnx_export.to_openvino(onnx_bytes)}


def export_float(fused: nn.Module, input_size: int) -> dict[str, bytes]:
    """The fused float model as model.onnx and OpenVINO IR (f32 weights): the float baselines."""
    onnx_bytes = onnx_export.to_onnx_float(fused, input_size)
    return {"model.onnx": onnx_bytes, **onnx_export.to_openvino(onnx_bytes)}


def nncf_peer(float_onnx: bytes, calibration: Iterable) -> dict[str, bytes]:
    """Variant `nncf-ptq`: NNCF's `nncf.quantize` (defaults) of the float model on the same
    calibration batches ((images, labels) or images); its OpenVINO IR files."""
    batches = [b[0] if isinstance(b, (list, tuple)) else b for b in calibration]
    return onnx_export.nncf_ptq(float_onnx, batches)


def artifact_files(files: Mapping[str, bytes], engine: str | None,
                   int8: bool | None = None) -> list[dict]:
    """Manifest entries for a variant's deployment files: one per format present, each with
    the runtimes that run it, its files (sha256, bytes; an IR is two files, verified together)
    and the library versions that made them. `engine`: the int8 variant's quantized engine,
    None for float and for nncf-ptq (which passes int8=True)."""
    import hashlib

    out = []
    for fmt, names in FORMAT_FILES.items():
        if not all(n in files for n in names):
            continue
        out.append({"format": fmt, "runtimes": runtimes.runtimes_for(fmt, engine, int8),
                    "files": [{"path": n, "sha256": hashlib.sha256(files[n]).hexdigest(),
                               "bytes": len(files[n])} for n in names],
                    "made_by": versions()})
    return out


# -- equivalence ---------------------------------------------------------------------------------
@dataclass
class Equivalence:
    """An exported model against its TorchScript int8 artifact and against float, on a loader."""

    runtime: str
    top1: float                    # percent
    reference_top1: float | None   # the TorchScript int8 artifact's top-1 (None: no reference)
    agreement: float | None        # percent of images with the reference's top-1 prediction
    float_agreement: float         # percent of images with the float model's top-1 prediction
    sqnr_db: float                 # logits SQNR against float, dB
    num_images: int
    passed: bool | None            # agreement >= MIN_AGREEMENT and |top1 diff| <= MAX_TOP1_DIFF
    reason: str


def predict(path: str, runtime: str, loader: Iterable, num_threads: int = 2,
            max_batches: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of a local artifact file run in `runtime` over (images, labels) batches."""
    model = runtimes.get_runtime(runtime).load(path, num_threads)
    logits, labels = [], []
    for i, (images, target) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits.append(model.run(np.ascontiguousarray(images.numpy(), dtype=np.float32)))
        labels.append(np.asarray(target))
    if not logits:
        raise ConfigError("the evaluation loader yielded no batches")
    return np.concatenate(logits), np.concatenate(labels)


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """10 log10(|reference|^2 / |reference - other|^2) of logits (quantlab.sensitivity.Sqnr)."""
    sqnr = Sqnr()
    sqnr.add(torch.from_numpy(np.asarray(reference, dtype=np.float64)),
             torch.from_numpy(np.asarray(other, dtype=np.float64)))
    return sqnr.db


def compare_logits(logits: np.ndarray, labels: np.ndarray, float_logits: np.ndarray,
                   reference_logits: np.ndarray | None, runtime: str) -> Equivalence:
    """The equivalence figures and verdict of an export's logits (see `Equivalence`)."""
    pred = logits.argmax(1)
    top1 = 100.0 * float(np.mean(pred == labels))
    float_agreement = 100.0 * float(np.mean(pred == float_logits.argmax(1)))
    if reference_logits is None:
        return Equivalence(runtime, top1, None, None, float_agreement,
                           sqnr_db(float_logits, logits), len(labels), None,
                           "no TorchScript int8 artifact to compare with")
    ref_top1 = 100.0 * float(np.mean(reference_logits.argmax(1) == labels))
    agreement = 100.0 * float(np.mean(pred == reference_logits.argmax(1)))
    problems = []
    if agreement < MIN_AGREEMENT:
        problems.append(f"top-1 agrees with the TorchScript artifact on {agreement:.2f}% of "
                        f"images (< {MIN_AGREEMENT}%)")
    if abs(top1 - ref_top1) > MAX_TOP1_DIFF:
        problems.append(f"top-1 {top1:.2f} vs {ref_top1:.2f} of the TorchScript artifact "
                        f"(> {MAX_TOP1_DIFF} points apart)")
    return Equivalence(runtime, top1, ref_top1, agreement, float_agreement,
                       sqnr_db(float_logits, logits), len(labels), not problems,
                       "; ".join(problems) or f"agrees on {agreement:.2f}% of images, top-1 "
                       f"{top1:.2f} vs {ref_top1:.2f}")


def check_equivalence(path: str, runtime: str, reference_path: str | None,
                      reference_runtime: str | None, float_path: str, loader,
                      num_threads: int = 2, max_batches: int | None = None) -> Equivalence:
    """Evaluate an exported artifact in its runtime on `loader` (e.g. val/) against its
    TorchScript int8 artifact (reference; None for nncf-ptq) and the float TorchScript file.

    The run must not select a variant whose export has `passed` False (it diverged).
    """
    batches = list(loader if max_batches is None else
                   (b for i, b in zip(range(max_batches), loader)))
    logits, labels = predict(path, runtime, batches, num_threads)
    float_logits, _ = predict(float_path, "torch", batches, num_threads)
    reference = (predict(reference_path, reference_runtime, batches, num_threads)[0]
                 if reference_path else None)
    return compare_logits(logits, labels, float_logits, reference, runtime)


# -- timing per (artifact, runtime) --------------------------------------------------------------
@dataclass
class RuntimeLatency:
    """timing.Latency's fields plus the runtime and the file's load time in its process."""

    variant: str
    runtime: str
    batch_size: int
    num_threads: int
    latency_ms: float
    latency_ms_p90: float
    latency_ms_min: float
    images_per_sec: float
    iterations: int
    load_ms: float

    def row(self) -> dict:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure_runtimes(artifacts: Mapping[str, tuple[str, str]], input_size: int,
                     batch_sizes: Sequence[int] = (1, 8), num_threads: int = 2,
                     warmup: int = 10, iterations: int = 50,
                     pause_s: float = TURN_PAUSE_S) -> list[RuntimeLatency]:
    """Time {key: (local path, runtime name)} interleaved, one fresh process per key.

    A key is usually "<variant>" or "<variant>/<runtime>"; rows carry it as `variant`.
    """
    for key, (path, runtime) in artifacts.items():
        rt = runtimes.get_runtime(runtime)
        if not rt.supports(runtimes.format_of(path)):
            raise ConfigError(f"{key}: runtime {runtime} cannot run {path}; valid for "
                              f"{runtimes.format_of(path)}: "
                              f"{', '.join(runtimes.runtimes_for(runtimes.format_of(path)))}")
    procs: dict[str, subprocess.Popen] = {}
    load_ms: dict[str, float] = {}
    try:
        for key, (path, runtime) in artifacts.items():
            spec = {"path": os.path.abspath(path), "runtime": runtime, "num_threads": num_threads,
                    "input_size": input_size, "batch_sizes": list(batch_sizes), "warmup": warmup}
            procs[key] = subprocess.Popen(
                [sys.executable, "-W", "ignore", RUNTIME_TIMER, "serve", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(num_threads)})
            load_ms[key] = _reply(procs[key], key)["load_ms"]  # one loads while others wait
        per_round = min(BLOCK, iterations)
        num_rounds = max(1, round(iterations / per_round))
        names, rows = list(artifacts), []
        for bs in batch_sizes:
            samples: dict[str, list[float]] = {k: [] for k in names}
            for r in range(num_rounds):
                for key in names[r % len(names):] + names[:r % len(names)]:
                    procs[key].stdin.write(f"time {bs} {per_round}\n")
                    procs[key].stdin.flush()
                    samples[key] += _reply(procs[key], key)
                    time.sleep(pause_s)
            for key, s in samples.items():
                median = statistics.median(s)
                rows.append(RuntimeLatency(
                    variant=key, runtime=artifacts[key][1], batch_size=bs,
                    num_threads=num_threads, latency_ms=median * 1e3,
                    latency_ms_p90=_percentile(s, 0.9) * 1e3, latency_ms_min=min(s) * 1e3,
                    images_per_sec=bs / median, iterations=len(s), load_ms=load_ms[key]))
        for key, p in procs.items():
            p.stdin.write("quit\n")
            p.stdin.flush()
            _reply(p, key)
        return rows
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()


def _reply(proc: subprocess.Popen, key: str):
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"timing process of {key} failed: {proc.stderr.read().strip()[-2000:]}")
    return json.loads(line)


# -- loading snippets for the manifest's `selected` ------------------------------------------------
def load_snippet(format: str, runtime: str, num_threads: int = 2) -> str:
    """Three lines that load and run the selected artifact in its runtime, without quantlab."""
    if format == "onnx":
        return ("import onnxruntime as ort\n"
                "s = ort.InferenceSession('model.onnx', providers=['CPUExecutionProvider'])\n"
                "logits = s.run(None, {'input': images})[0]  # float32 NCHW numpy")
    if format == "openvino":
        hint = ", 'INFERENCE_PRECISION_HINT': 'f32'" if runtime == "openvino-f32" else ""
        return ("import openvino as ov\n"
                f"m = ov.Core().compile_model('model.xml', 'CPU', {{'PERFORMANCE_HINT': "
                f"'LATENCY', 'INFERENCE_NUM_THREADS': {num_threads}{hint}}})\n"
                "logits = m(images)[0]  # float32 NCHW numpy")
    if format == "torchscript":
        engine = runtime.removeprefix("torch").lstrip("-")
        first = (f"import torch; torch.backends.quantized.engine = '{engine}'" if engine
                 else "import torch")
        return (f"{first}\n"
                "m = torch.jit.load('model.torchscript.pt').eval()\n"
                "logits = m(images)  # float32 NCHW tensor")
    raise ConfigError(f"unknown artifact format {format!r}; valid: {', '.join(FORMAT_FILES)}")


def as_numpy(loader: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """All (images, labels) of a loader as two numpy arrays (test data for `predict` children)."""
    images, labels = [], []
    for x, y in loader:
        images.append(x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        labels.append(np.asarray(y))
    return np.concatenate(images).astype(np.float32), np.concatenate(labels)
