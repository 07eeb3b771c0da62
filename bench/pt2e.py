"""PT2E-AOTI int8 against eager int8 (TorchScript) and float, side by side in one process.

    python bench/pt2e.py --model mobilenet_v2 --input-size 224 --threads 1 2 --batch-sizes 1 8

Random weights (no downloads) with BatchNorm statistics set by a few train-mode passes, so the
activations are not all zero. Every model is built the way quantlab builds it:
- float: TorchScript (quantlab.export.artifact_bytes), loaded back;
- eager x86 / eager onednn int8: EagerBackend PTQ with the ptq-x86 preset, TorchScript frozen;
- pt2e-aoti int8: Pt2eBackend PTQ (X86InductorQuantizer), AOTInductor package with freezing,
  loaded with aoti_load_package; with --no-freezing-too also the package compiled without it.
All are timed interleaved by quantlab.timing.measure. The PT2E package is then inspected (how
many oneDNN int8 convolutions its generated code calls) and profiled per op (torch.profiler).
Prints markdown; the CPU, its int8 flags and the load average are printed with every figure.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import time
import zipfile

import torch

from quantlab import export, models, pt2e
from quantlab.backend import get_backend
from quantlab.timing import cpu_info, measure
from quantlab.config import PTQ_PRESETS


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def build_float(name: str, input_size: int, num_classes: int = 1000, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build(name, num_classes=num_classes, **kwargs).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, input_size, input_size))
    return model.eval()


def calibration_batches(input_size: int, num_batches: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, input_size, input_size, generator=g), None)
            for _ in range(num_batches)]


@torch.inference_mode()
def calibrate(observed, batches) -> None:
    observed.eval()
    for images, _ in batches:
        observed(images)


def package_kernels(data: bytes) -> dict[str, int]:
    """Calls to int8/float kernels in the generated wrapper code of an AOTInductor package."""
    counts: dict[str, int] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in z.namelist():
            if name.endswith((".cpp", ".wrapper.cpp")):
                text = z.read(name).decode(errors="replace")
                for kernel in re.findall(r"aoti_torch_cpu_\w+", text):
                    counts[kernel] = counts.get(kernel, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def profile(runner, input_size: int, batch_size: int, num_threads: int, rows: int = 12) -> str:
    x = torch.randn(batch_size, 3, input_size, input_size)
    torch.set_num_threads(num_threads)
    with torch.inference_mode():
        for _ in range(5):
            runner(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                runner(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=sorted(models.ARCHITECTURES))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--width-mult", type=float, default=None,
                        help="MobileNet width (the demo's model: 0.5 at --input-size 32)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-freezing-too", action="store_true",
                        help="also compile and time the package without inductor freezing")
    parser.add_argument("--profile", action="store_true", help="per-op profile of the package")
    args = parser.parse_args()
    size = args.input_size
    kwargs = {} if args.width_mult is None else {"width_mult": args.width_mult}
    print(f"# PT2E vs eager: {args.model} {kwargs or ''} at {size} px, {args.num_classes} classes, "
          f"torch {torch.__version__}")
    print(f"CPU: {cpu_info()}; {load()}\n")

    float_model = build_float(args.model, size, args.num_classes, **kwargs)
    batches = calibration_batches(size)
    runners, engines = {}, {}
    runners["float"] = export.load(export.artifact_bytes(float_model))
    eager = get_backend()
    for engine in ("x86", "onednn"):
        variant = PTQ_PRESETS["ptq-x86"].model_copy(update={"engine": engine})
        observed = eager.prepare_ptq(build_float(args.model, size, args.num_classes, **kwargs), variant)
        calibrate(observed, batches)
        int8 = eager.convert(observed, engine)
        runners[f"eager-{engine}"] = export.load(export.artifact_bytes(int8, engine), engine)
        engines[f"eager-{engine}"] = engine

    backend = pt2e.Pt2eBackend(size)
    start = time.perf_counter()
    observed = backend.prepare_ptq(build_float(args.model, size, args.num_classes, **kwargs), PTQ_PRESETS["ptq-x86"])
    calibrate(observed, batches)
    converted = backend.convert(observed, "x86")
    print(f"PT2E export + prepare + calibrate + convert: {time.perf_counter() - start:.1f} s; {load()}")
    packages = {}
    for freezing in (True, False) if args.no_freezing_too else (True,):
        data, meta = pt2e.package_bytes(converted, size, freezing=freezing)
        name = "pt2e-aoti" + ("" if freezing else "-nofreeze")
        packages[name] = data
        runners[name] = pt2e.load_package(data)
        print(f"AOTInductor compile ({name}, freezing={freezing}): {meta['compile_seconds']} s, "
              f"{len(data) / 1e6:.1f} MB, compiled for {meta['vec_isa']}; {load()}")
        print(f"  kernels called by its wrapper: {package_kernels(data)}")

    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        ref = converted(x)
        for name in packages:
            print(f"  {name} vs converted program: max |diff| {(runners[name](x) - ref).abs().max():.3g} "
                  f"(logits up to {ref.abs().max():.3g})")

    print("\n| threads | batch | model | median ms | p90 ms | vs fastest eager int8 |")
    print("|---|---|---|---|---|---|")
    for num_threads in args.threads:
        rows = measure(runners, size, tuple(args.batch_sizes), num_threads, args.warmup,
                       args.iterations, engines=engines)
        for bs in args.batch_sizes:
            here = {r.variant: r for r in rows if r.batch_size == bs}
            best_eager = min(here[n].latency_ms for n in engines)
            for name, r in here.items():
                print(f"| {num_threads} | {bs} | {name} | {r.latency_ms:.2f} | {r.latency_ms_p90:.2f} "
                      f"| {r.latency_ms / best_eager:.2f}x |")
        print(f"(threads {num_threads}: {load()})")
    print(f"\nCPU: {cpu_info()}; {load()}")

    if args.profile:
        for name in packages:
            for bs in (1, max(args.batch_sizes)):
                print(f"\n## profile {name}, batch {bs}, 1 thread\n```")
                print(profile(runners[name], size, bs, 1))
                print("```")


if __name__ == "__main__":
    main()
