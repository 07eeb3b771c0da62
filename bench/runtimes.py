"""Each artifact in each runtime: quantlab's int8 TorchScript, its ONNX (QDQ) in ONNX Runtime,
its IR in OpenVINO, NNCF's own PTQ in OpenVINO, and float in torch, ONNX Runtime and OpenVINO.

    python bench/runtimes.py                               # 224, threads 2, batch 1 and 8
    python bench/runtimes.py --threads 1 2 --batch-sizes 1 8 --iterations 50

MobileNetV2 (torchvision's quantizable one, 1000 classes) with random weights, calibrated on
random images (timing does not depend on the values; accuracy is not measured here). The
variants are built by quantlab's own functions (prepare, calibrate, convert; scripting as the
pipeline stores it), exported with quantlab.formats, and timed as the pipeline times them
(quantlab.timing.measure_files: one fresh process, every (artifact, runtime) interleaved, same
threads and batches, noisy settings measured again). Prints a
markdown table of medians and ratios, with the CPU's int8 flags and the load average.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

from quantlab import export, formats, models, onnx_export
from quantlab._deprecations import silence_deprecations
from quantlab.backend import get_backend
from quantlab.timing import TimedFile, cpu_info, measure_files
from quantlab.config import PTQ_PRESETS


def build(input_size: int, num_calibration: int, tmp: str) -> dict[str, tuple[str, str]]:
    """All artifacts, written under `tmp`: {"<variant>/<runtime>": (path, runtime)}."""
    torch.manual_seed(0)
    float_model = models.build("mobilenet_v2", 1000).eval()
    calibration = [torch.randn(8, 3, input_size, input_size) for _ in range(num_calibration)]
    out: dict[str, tuple[str, str]] = {}

    def store(variant: str, files: dict[str, bytes]) -> dict[str, str]:
        folder = os.path.join(tmp, variant)
        onnx_export.write_files(files, folder)
        return {name: os.path.join(folder, name) for name in files}

    fused = models.fuse(copy.deepcopy(float_model), is_qat=False)
    paths = store("float", {"model.torchscript.pt": export.artifact_bytes(fused),
                            **formats.export_float(fused, input_size)})
    out["float/torch"] = (paths["model.torchscript.pt"], "torch")
    out["float/onnxruntime"] = (paths["model.onnx"], "onnxruntime")
    out["float/openvino"] = (paths["model.xml"], "openvino")
    out["float/openvino-f32"] = (paths["model.xml"], "openvino-f32")
    t0 = time.perf_counter()
    nncf = formats.nncf_peer(open(paths["model.onnx"], "rb").read(), calibration)
    print(f"nncf-ptq: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out["nncf-ptq/openvino"] = (store("nncf-ptq", nncf)["model.xml"], "openvino")
    backend = get_backend()
    for name in ("ptq-minmax", "ptq-x86"):
        variant = PTQ_PRESETS[name]
        observed = backend.prepare_ptq(copy.deepcopy(float_model), variant)
        with torch.inference_mode():
            for x in calibration:
                observed(x)
        int8 = backend.convert(observed, variant.engine)
        t0 = time.perf_counter()
        files = {"model.torchscript.pt": export.artifact_bytes(int8, variant.engine),
                 **formats.export_int8(int8, variant.engine, input_size)}
        print(f"{name} export: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        paths = store(name, files)
        out[f"{name}/torch-x86"] = (paths["model.torchscript.pt"], "torch-x86")
        out[f"{name}/torch-onednn"] = (paths["model.torchscript.pt"], "torch-onednn")
        out[f"{name}/onnxruntime"] = (paths["model.onnx"], "onnxruntime")
        out[f"{name}/openvino"] = (paths["model.xml"], "openvino")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--calibration-batches", type=int, default=4)
    args = parser.parse_args()
    silence_deprecations()
    with tempfile.TemporaryDirectory(prefix="quantlab-runtimes-") as tmp:
        artifacts = build(args.input_size, args.calibration_batches, tmp)
        load_before = os.getloadavg()
        rows = []
        for n in args.threads:
            rows += measure_files({k: TimedFile(path=p, runtime=rt)
                                   for k, (p, rt) in artifacts.items()},
                                  args.input_size, args.batch_sizes, n, args.warmup,
                                  args.iterations, limit_threads=False)
        load_after = os.getloadavg()
    print(f"CPU: {cpu_info()}; load average (1 min) {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; {formats.versions()}\n")
    cols = [(n, bs) for n in args.threads for bs in args.batch_sizes]
    by = {(r.variant, r.num_threads, r.batch_size): r for r in rows}
    nncf = {c: by[("nncf-ptq/openvino", *c)].latency_ms for c in cols}
    best_float = {c: min((r for r in rows if r.variant.startswith("float/")
                          and (r.num_threads, r.batch_size) == c), key=lambda r: r.latency_ms)
                  for c in cols}
    head = " | ".join(f"{n} thr, batch {bs}: ms (p90) / vs nncf / vs best float" for n, bs in cols)
    print(f"| artifact / runtime | {head} |")
    print("|---|" + "---|" * len(cols))
    for key in artifacts:
        cells = []
        for c in cols:
            r = by[(key, *c)]
            cells.append(f"{r.latency_ms:.2f} ({r.latency_ms_p90:.2f}) / "
                         f"{r.latency_ms / nncf[c]:.2f}x / "
                         f"{best_float[c].latency_ms / r.latency_ms:.2f}x faster")
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("\nfastest float: " + ", ".join(f"{n} thr batch {bs}: {best_float[(n, bs)].variant}"
                                          for n, bs in cols))


if __name__ == "__main__":
    main()
