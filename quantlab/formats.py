"""Deployment artifacts of a run: ONNX and OpenVINO exports, the nncf-ptq peer, the check that
each export computes what its TorchScript artifact computes, and timing per (artifact, runtime).

    files = export_int8(int8, engine="x86", input_size=224)   # model.onnx, model.xml, model.bin
    entries = artifact_entries(files, "ptq-x86", "ptq", "x86")  # the manifest's, per format
    files = export_float(fused_float, input_size=224)
    files = nncf_peer(files_float["model.onnx"], calibration_batches)   # model.xml, model.bin
    eq = check_equivalence(paths["model.onnx"], "onnxruntime", int8_ts_path, "torch-x86",
                           float_ts_path, val_loader, num_threads=2)   # or, from logits:
    eq = check_export(path, logits, labels, float_logits, reference_logits, "onnxruntime",
                      int8=True)   # compare_logits + quantization_lost(path)

Every (artifact, runtime) pair is timed by quantlab.timing.measure_files, with the TorchScript
files, in one fresh process (`TimedFile(path, runtime=...)`): the same interleaved rounds,
noise and re-measuring for all. Tried against one fresh process per pair (each loaded once,
taking turns; MobileNetV2 96 px, 1 thread, 100 calls, a loaded 2-core EPYC): the medians
agreed within the noise (ratios 0.85-1.1 at noise 5-20%), except torch int8 at batch 8,
which the per-process way timed 1.3-1.5x slower because its model ran batch 1 first (the
oneDNN primitive cache: see quantlab/_timer.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from xml.etree import ElementTree

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from quantlab import installed_versions, onnx_export, runtimes
from quantlab.errors import ConfigError
from quantlab.export import sha256
from quantlab.registry import FORMAT_FILES, ArtifactEntry, FileEntry
from quantlab.sensitivity import Sqnr

# An export passes its check only when all three hold against its own TorchScript artifact on
# val/ (and an int8 export's file is still int8: `quantization_lost`):
MIN_AGREEMENT = 98.0      # percent of images whose top-1 matches the artifact's top-1
MAX_TOP1_DIFF = 0.3       # top-1 points between the export and the artifact
MAX_SQNR_LOSS_DB = 1.0    # logits SQNR against float at most this many dB below the artifact's
# Why 98: it is the bar issue 23 set. On Fashion-MNIST's 10,000 val images the good exports
# agreed with their TorchScript artifact on 97.8-98.3% of images (the runtimes requantize
# their own way, and near-ties flip), with top-1 within 0.1 points and SQNR against float
# within 0.2 dB of the artifact's: an export at that range's low end fails this bar and is
# not selected. The one real divergence seen (a fallback's ONNX in ONNX Runtime: 85.8%
# agreement, 6.7 dB against 24.9 dB, top-1 80.8 against 87.4) fails all three. Agreement is
# never waived for being close to float: two models that each change a different 10% of
# float's predictions are each as close to float, yet agree with each other on ~80%.


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


def artifact_entries(files: Mapping[str, bytes], variant: str, method: str,
                     engine: str | None, int8: bool | None = None) -> list[ArtifactEntry]:
    """Manifest entries of a variant's deployment files ({"model.onnx": bytes, ...}): one per
    format present, in the variant's folder, each with the runtimes that run it, every file's
    sha256 (an IR is two files, verified together) and the library versions that made them.
    `engine`: the int8 variant's quantized engine; None for float and for nncf-ptq (which
    passes int8=True)."""
    out = []
    made_by = versions()
    for fmt, names in FORMAT_FILES.items():
        if fmt == "torchscript" or not all(n in files for n in names):
            continue
        first, *rest = [FileEntry(path=f"artifacts/{variant}/{n}", sha256=sha256(files[n]),
                                  bytes=len(files[n])) for n in names]
        out.append(ArtifactEntry(
            variant=variant, method=method, path=first.path, sha256=first.sha256,
            bytes=first.bytes, format=fmt, engine=engine, files=rest,
            optimisation="qdq" if fmt == "onnx" else "ir",
            runtimes=runtimes.runtimes_for(fmt, engine, int8), made_by=made_by))
    return out


# -- equivalence ---------------------------------------------------------------------------------
class Equivalence(BaseModel):
    """A model in a runtime against its TorchScript int8 artifact and against float, on val/."""

    runtime: str
    top1: float                    # percent
    reference_top1: float | None   # the TorchScript int8 artifact's top-1 (None: no reference)
    agreement: float | None        # percent of images with the reference's top-1 prediction
    float_agreement: float         # percent of images with the float model's top-1 prediction
    sqnr_db: float | None          # logits SQNR against float, dB (None: equal to float's)
    num_images: int
    passed: bool | None            # see compare_logits and check_export (None: no reference)
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


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float | None:
    """10 log10(|reference|^2 / |reference - other|^2) of logits (quantlab.sensitivity.Sqnr);
    None when they are equal (no noise to measure)."""
    sqnr = Sqnr()
    sqnr.add(torch.from_numpy(np.asarray(reference, dtype=np.float64)),
             torch.from_numpy(np.asarray(other, dtype=np.float64)))
    return sqnr.db if math.isfinite(sqnr.db) else None


def compare_logits(logits: np.ndarray, labels: np.ndarray, float_logits: np.ndarray,
                   reference_logits: np.ndarray | None, runtime: str) -> Equivalence:
    """The equivalence figures and verdict of an export's logits (see `Equivalence`).

    It passes when all hold against the TorchScript artifact's logits (`reference_logits`):
    top-1 agreement >= MIN_AGREEMENT, top-1 within MAX_TOP1_DIFF points, and logits SQNR
    against float at most MAX_SQNR_LOSS_DB below the artifact's. The reason names the
    agreement either way."""
    pred = logits.argmax(1)
    top1 = 100.0 * float(np.mean(pred == labels))
    float_agreement = 100.0 * float(np.mean(pred == float_logits.argmax(1)))
    common = dict(runtime=runtime, top1=top1, float_agreement=float_agreement,
                  sqnr_db=sqnr_db(float_logits, logits), num_images=len(labels))
    if reference_logits is None:
        return Equivalence(**common, reference_top1=None, agreement=None, passed=None,
                           reason="no TorchScript artifact to compare with")
    ref_top1 = 100.0 * float(np.mean(reference_logits.argmax(1) == labels))
    agreement = 100.0 * float(np.mean(pred == reference_logits.argmax(1)))
    ref_sqnr, sqnr = sqnr_db(float_logits, reference_logits), common["sqnr_db"]
    agrees = f"top-1 agrees with the TorchScript artifact on {agreement:.2f}% of images"
    problems = []
    if agreement < MIN_AGREEMENT:
        problems.append(f"{agrees} (< {MIN_AGREEMENT:g}%)")
    if abs(top1 - ref_top1) > MAX_TOP1_DIFF:
        problems.append(f"top-1 {top1:.2f} vs {ref_top1:.2f} of the TorchScript artifact "
                        f"(> {MAX_TOP1_DIFF:g} points apart)")
    # None: equal to float's logits, which no SQNR loss can be measured against
    if sqnr is not None and ref_sqnr is not None and sqnr < ref_sqnr - MAX_SQNR_LOSS_DB:
        problems.append(f"logits SQNR against float {sqnr:.1f} dB vs the artifact's "
                        f"{ref_sqnr:.1f} dB (> {MAX_SQNR_LOSS_DB:g} dB lower)")
    if problems and agreement >= MIN_AGREEMENT:
        problems.append(agrees)
    return Equivalence(**common, reference_top1=ref_top1, agreement=agreement,
                       passed=not problems,
                       reason="; ".join(problems) or f"{agrees}, top-1 {top1:.2f} vs "
                       f"{ref_top1:.2f}, logits SQNR against float {_db(sqnr)} vs {_db(ref_sqnr)}")


def quantization_lost(path: str) -> str | None:
    """Why an int8 export's file is not int8, in one line; None when it is. model.onnx must hold
    QuantizeLinear/DequantizeLinear nodes or int8/uint8 initializers, an OpenVINO IR's
    model.xml FakeQuantize layers or i8/u8 constants."""
    name = os.path.basename(path)
    if path.endswith(".onnx"):
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        int8_types = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node) or \
                any(i.data_type in int8_types for i in graph.initializer):
            return None
        return (f"{name} has no QuantizeLinear/DequantizeLinear nodes and no int8 weights: its "
                "quantization was lost")
    if path.endswith(".xml"):
        layers = ElementTree.parse(path).getroot().iter("layer")
        if any(layer.get("type") == "FakeQuantize" or
               (layer.get("type") == "Const" and
                any(d.get("element_type") in ("i8", "u8") for d in layer.iter("data")))
               for layer in layers):
            return None
        return f"{name} has no FakeQuantize nodes and no i8/u8 constants: its quantization was lost"
    raise ValueError(f"{path} is neither an ONNX model (.onnx) nor an OpenVINO IR (.xml)")


def check_export(path: str, logits: np.ndarray, labels: np.ndarray, float_logits: np.ndarray,
                 reference_logits: np.ndarray | None, runtime: str, int8: bool) -> Equivalence:
    """The verdict on an export file (`path`: model.onnx or model.xml) from its logits in
    `runtime`: compare_logits, and for an int8 export (`int8`; float baselines are exempt)
    its file must still be int8 (`quantization_lost`). Without a reference (nncf-ptq) only the
    int8 check can fail it (`passed` False), else `passed` stays None."""
    eq = compare_logits(logits, labels, float_logits, reference_logits, runtime)
    lost = quantization_lost(path) if int8 else None
    if lost is None:
        return eq
    return eq.model_copy(update={
        "passed": False, "reason": lost if eq.agreement is None else f"{lost}; {eq.reason}"})


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.1f} dB"


def check_equivalence(path: str, runtime: str, reference_path: str | None,
                      reference_runtime: str | None, float_path: str, loader,
                      num_threads: int = 2, max_batches: int | None = None,
                      int8: bool = True) -> Equivalence:
    """Evaluate an exported artifact in its runtime on `loader` (e.g. val/) against its
    TorchScript int8 artifact (reference; None for nncf-ptq) and the float TorchScript file
    (`check_export`; `int8` False for a float baseline).

    The run must not select a variant whose export has `passed` False (it diverged).
    """
    batches = list(loader if max_batches is None else
                   (b for i, b in zip(range(max_batches), loader)))
    logits, labels = predict(path, runtime, batches, num_threads)
    float_logits, _ = predict(float_path, "torch", batches, num_threads)
    reference = (predict(reference_path, reference_runtime, batches, num_threads)[0]
                 if reference_path else None)
    return check_export(path, logits, labels, float_logits, reference, runtime, int8)


def as_numpy(loader: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """All (images, labels) of a loader as two numpy arrays (test data for `predict` children)."""
    images, labels = [], []
    for x, y in loader:
        images.append(x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        labels.append(np.asarray(y))
    return np.concatenate(images).astype(np.float32), np.concatenate(labels)
