"""PT2E-AOTI int8 against eager int8 (TorchScript) and float, side by side; where the time goes.

    python bench/pt2e.py --model mobilenet_v2                  # 224 px, threads 1 2, batch 1 8
    python bench/pt2e.py --model resnet18 --packages default no-freezing static-batch max-autotune
    python bench/pt2e.py --model mobilenet_v2 --quantizers global module-type
    python bench/pt2e.py --model mobilenet_v2 --in-process --profile

Random weights (no downloads) with BatchNorm statistics set by a few train-mode passes, so the
activations are not all zero. Every model is built the way quantlab builds it:
- float: TorchScript (quantlab.export.artifact_bytes);
- eager x86 / eager onednn int8: EagerBackend PTQ with the ptq-x86 preset, TorchScript frozen;
- pt2e-aoti int8: Pt2eBackend PTQ (X86InductorQuantizer, the ptq-x86 observers) packaged by
  quantlab.pt2e.package_bytes (AOTInductor, dynamic batch, freezing);
- with --packages / --quantizers, the same PT2E program packaged with other inductor options
  (PACKAGES) or quantized with other X86InductorQuantizer set-ups (QUANTIZERS).
All files are timed as the pipeline times them (quantlab.timing.measure_files: one fresh
torch-only process per batch size, every model interleaved, loaded afresh per thread count,
noisy settings measured again), the packages in the "aoti" runtime (aoti_load_package).

Where the time goes: every package's generated wrapper is read for the kernels it calls (are
the dequantize-conv-quantize patterns oneDNN int8 convolutions, are there layout conversions
between them), and one warm forward of each package runs under ONEDNN_VERBOSE to list the
oneDNN primitives it executes (a reorder there re-lays out a weight on every call);
--in-process times the AOTI runner against the same converted program through torch.compile
(inductor, freezing) in this process, which shows whether the AOTI runner adds per-call
overhead; --profile is a per-op torch.profiler table of eager int8 and of the torch.compile
program (the package calls its kernels from C++, where the profiler sees only the shim's small
aten calls). Prints markdown with the CPU, its int8 flags and the load average.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile

import torch

from quantlab import export, models, pt2e, ptq
from quantlab.bench import compiled_program
from quantlab._deprecations import silence_deprecations
from quantlab.backend import get_backend
from quantlab.config import PTQ_PRESETS
from quantlab.report import markdown_table
from quantlab.timing import TimedFile, cpu_info, measure, measure_files

EAGER = ("eager-x86", "eager-onednn")
VARIANT = PTQ_PRESETS["ptq-x86"]
# Package variants: inductor options on top of package_bytes' own (freezing, a dynamic batch).
# "static-batch" exports at each timed batch size instead (a package per batch size).
PACKAGES: dict[str, dict] = {
    "default": {},
    "no-freezing": {"freezing": False},
    "no-weight-prepack": {"cpp.weight_prepack": False},
    "max-autotune": {"max_autotune": True},
    "static-batch": {},
}
QUANTIZERS = ("global", "module-type")  # set_global (quantlab's), or Conv2d + Linear by type


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


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


def pt2e_program(float_model: torch.nn.Module, input_size: int, batches, how: str):
    """The converted PT2E int8 program: quantlab's Pt2eBackend ("global"), or the same export
    and calibration with X86InductorQuantizer asked per module type (Conv2d, Linear)."""
    backend = pt2e.Pt2eBackend(input_size)
    if how == "global":
        observed = backend.prepare_ptq(float_model, VARIANT)
    else:
        ao, x86 = pt2e._pt2e()
        config = pt2e.quantizer(VARIANT).get_global_quantization_config()
        quantizer = (x86.X86InductorQuantizer().set_module_type_qconfig(torch.nn.Conv2d, config)
                     .set_module_type_qconfig(torch.nn.Linear, config))
        observed = pt2e.allow_train_eval(ao.quantize_pt2e.prepare_pt2e(
            pt2e.export(float_model.eval(), input_size), quantizer))
    with torch.inference_mode():
        ptq.calibrate(observed, batches)
    return backend.convert(observed, "x86")


def package(program, input_size: int, option: str, batch_size: int | None = None):
    """(bytes, compile seconds) of an AOTInductor package of `program` with PACKAGES[option]."""
    if option == "static-batch":
        start = time.perf_counter()
        with torch.no_grad():
            exported = torch.export.export(program, (pt2e.example_input(input_size, batch_size),))
            buf = io.BytesIO()
            torch._inductor.aoti_compile_and_package(exported, package_path=buf,
                                                     inductor_configs={"freezing": True})
        return buf.getvalue(), time.perf_counter() - start
    configs = dict(PACKAGES[option])
    freezing = configs.pop("freezing", True)
    with torch._inductor.config.patch(configs):
        data, meta = pt2e.package_bytes(program, input_size, freezing=freezing)
    return data, float(meta["compile_seconds"])


def package_kernels(data: bytes) -> tuple[dict[str, int], list[str]]:
    """Calls in an AOTInductor package's generated wrapper: aten/oneDNN kernels through the C
    shim (aoti_torch_cpu_*: counted) and inductor's own generated kernels (cpp_fused_*: named,
    which shows any quantize, dequantize or layout conversion between the convolutions)."""
    counts: dict[str, int] = {}
    fused: list[str] = []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in z.namelist():
            if name.endswith("wrapper.cpp"):
                text = z.read(name).decode(errors="replace")
                run = text[text.index("::run_impl("):]   # the calls, not the declarations
                for kernel in re.findall(r"AOTI_TORCH_ERROR_CODE_CHECK\((aoti_torch_cpu_\w+)", run):
                    counts[kernel] = counts.get(kernel, 0) + 1
                fused += re.findall(r"^\s*(cpp_fused_\w+)\(", run, re.M)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])), fused


_VERBOSE_RUN = """
import sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.randn(int(sys.argv[2]), 3, int(sys.argv[3]), int(sys.argv[3]))
torch.set_num_threads(1)
with torch.inference_mode():
    for _ in range(3):
        runner(x)
    print("-- timed --", flush=True)
    runner(x)
"""


def onednn_calls(path: str, input_size: int, batch_size: int) -> dict[str, tuple[int, float]]:
    """oneDNN primitives one warm forward of a package executes (ONEDNN_VERBOSE, 1 thread, a
    fresh process): {kind: (calls, ms)}. Reorders here are weight re-layouts on every call."""
    out = subprocess.run([sys.executable, "-c", _VERBOSE_RUN, path, str(batch_size),
                          str(input_size)], capture_output=True, text=True,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"})
    calls: dict[str, tuple[int, float]] = {}
    for line in out.stdout.partition("-- timed --")[2].splitlines():
        fields = line.split(",")
        if line.startswith("onednn_verbose") and fields[3:4] == ["exec"]:
            n, ms = calls.get(fields[5], (0, 0.0))
            calls[fields[5]] = (n + 1, ms + float(fields[-1]))
    return calls


def profile(fn, input_size: int, batch_size: int, rows: int = 12) -> tuple[str, dict[str, float]]:
    """A per-op table (1 thread, 20 calls) and the self CPU ms per forward of each op."""
    torch.set_num_threads(1)
    with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
        x = torch.randn(batch_size, 3, input_size, input_size)  # made under inference mode
        for _ in range(5):
            fn(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                fn(x)
    events = prof.key_averages()
    return (events.table(sort_by="self_cpu_time_total", row_limit=rows),
            {e.key: e.self_cpu_time_total / 1e3 / 20 for e in events})


def conv_ms(per_op: dict[str, float]) -> float:
    return sum(ms for op, ms in per_op.items() if re.search(r"q?conv", op.split("::")[-1]))


def timing_table(rows, label: str = "") -> str:
    out = []
    for bs in sorted({r.batch_size for r in rows}):
        for n in sorted({r.num_threads for r in rows}):
            here = [r for r in rows if (r.batch_size, r.num_threads) == (bs, n)]
            eager = [r for r in here if r.variant in EAGER]
            best = min(eager, key=lambda r: r.latency_ms) if eager else None
            for r in here:
                asked = r.num_threads_requested or r.num_threads
                out.append({
                    "threads": str(n) + ("" if asked == n else f" (asked {asked})"),
                    "batch": str(bs), "model": r.variant + label,
                    "median ms": f"{r.latency_ms:.2f}", "p90 ms": f"{r.latency_ms_p90:.2f}",
                    "noise": f"+-{r.noise:.0%}" + (" NOISY" if r.noisy else ""),
                    "vs fastest eager int8": "-" if best is None else
                    f"{r.latency_ms / best.latency_ms:.2f}x ({best.variant})"})
    return markdown_table(out)


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
    parser.add_argument("--packages", nargs="+", default=["default"], choices=list(PACKAGES),
                        help="AOTInductor package variants of the PT2E program")
    parser.add_argument("--quantizers", nargs="+", default=["global"], choices=QUANTIZERS,
                        help="X86InductorQuantizer set-ups, each packaged with the default options")
    parser.add_argument("--no-float", action="store_true", help="leave the float model out")
    parser.add_argument("--no-thread-cap", action="store_true",
                        help="time every thread count asked for, even when CPUs are busy")
    parser.add_argument("--in-process", action="store_true",
                        help="also time the AOTI runner, torch.compile of the same program and "
                        "eager int8 in this process")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="--in-process: torch.compile with inductor's C++ wrapper "
                        "(cpp_wrapper, as AOTInductor always has) instead of its Python one")
    parser.add_argument("--profile", action="store_true",
                        help="per-op profiles (1 thread) of eager onednn and torch.compile")
    args = parser.parse_args()
    silence_deprecations()
    size = args.input_size
    kwargs = {} if args.width_mult is None else {"width_mult": args.width_mult}
    command = shlex.join(["python", "bench/pt2e.py", *sys.argv[1:]])
    print(f"# PT2E vs eager: {args.model} {kwargs or ''} at {size} px, {args.num_classes} classes, "
          f"torch {torch.__version__}\n")
    print(f"Command: `{command}`\n\nCPU: {cpu_info()}; {load()}\n")

    def fresh_float():
        return build_float(args.model, size, args.num_classes, **kwargs)

    batches = calibration_batches(size)
    files: dict[str, bytes] = {}           # name -> TorchScript bytes or .pt2 package
    engines: dict[str, str] = {}
    if not args.no_float:
        files["float"] = export.artifact_bytes(fresh_float())
    eager = get_backend()
    for engine in ("x86", "onednn"):
        observed = eager.prepare_ptq(fresh_float(), VARIANT.model_copy(update={"engine": engine}))
        with torch.inference_mode():
            ptq.calibrate(observed, batches)
        files[f"eager-{engine}"] = export.artifact_bytes(eager.convert(observed, engine), engine)
        engines[f"eager-{engine}"] = engine

    programs = {}
    for how in dict.fromkeys(["global", *args.quantizers]):
        start = time.perf_counter()
        programs[how] = pt2e_program(fresh_float(), size, batches, how)
        print(f"PT2E ({how} quantizer) export + prepare + calibrate + convert: "
              f"{time.perf_counter() - start:.1f} s")
    wanted = [("global", p) for p in args.packages] + [(q, "default") for q in args.quantizers
                                                       if q != "global"]
    static: dict[int, dict[str, bytes]] = {bs: {} for bs in args.batch_sizes}
    print("\n| package | compile s | MB | kernels its wrapper calls | inductor's own kernels |")
    print("|---|---|---|---|---|")
    for how, option in wanted:
        name = "pt2e-aoti" + ("" if option == "default" else f" {option}") + (
            "" if how == "global" else f" {how}")
        for bs in args.batch_sizes if option == "static-batch" else [None]:
            data, seconds = package(programs[how], size, option, bs)
            if bs is None:
                files[name] = data
            else:
                static[bs][name] = data
            counts, fused = package_kernels(data)
            calls = ", ".join(f"{k.removeprefix('aoti_torch_cpu_')} x{n}"
                              for k, n in counts.items())
            which = "" if bs is None else f" (batch {bs})"
            print(f"| {name}{which} | {seconds:.1f} | {len(data) / 1e6:.1f} | {calls} "
                  f"| {len(fused)}: {', '.join(fused)} |")
    print(f"\n(compiled for {pt2e.package_metadata()['vec_isa']}; {load()})")

    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        ref = programs["global"](x)
        got = pt2e.load_package(files["pt2e-aoti"])(x)
    print(f"pt2e-aoti vs its converted program: max |diff| {(got - ref).abs().max():.3g} "
          f"(logits up to {ref.abs().max():.3g})\n")

    rows = []
    with tempfile.TemporaryDirectory(prefix="quantlab-pt2e-") as tmp:
        def timed(name: str, data: bytes) -> TimedFile:
            path = os.path.join(tmp, re.sub(r"\W+", "-", name) + (
                ".pt2" if name.startswith("pt2e") else ".pt"))
            with open(path, "wb") as f:
                f.write(data)
            return TimedFile(path=path, engine=engines.get(name),
                             runtime="aoti" if path.endswith(".pt2") else "torch")

        print("oneDNN primitives of one warm forward (1 thread, ONEDNN_VERBOSE):\n")
        for bs in args.batch_sizes:
            for name, data in {**files, **static[bs]}.items():
                if name.startswith("pt2e"):
                    calls = onednn_calls(timed(name, data).path, size, bs)
                    print(f"- {name}, batch {bs}: " + ", ".join(
                        f"{kind} x{n} ({ms:.2f} ms)" for kind, (n, ms) in sorted(calls.items())))
        print()
        for bs in args.batch_sizes:  # one child per batch size: static packages run one batch
            before = load()
            rows += measure_files({n: timed(n, d) for n, d in {**files, **static[bs]}.items()},
                                  size, (bs,), args.threads, args.warmup, args.iterations,
                                  limit_threads=not args.no_thread_cap, say=print)
            print(f"(batch {bs}: {before} before, {load()} after)")
    print("\nFiles, each in its runtime, in a fresh torch-only process (interleaved):\n")
    print(timing_table(rows))

    if args.in_process:
        in_process(args, programs["global"], files, engines)
    if args.profile:
        profiles(args, programs["global"], files)
    print(f"\nCPU: {cpu_info()}; {load()}")


def in_process(args, program, files: dict[str, bytes], engines: dict[str, str]) -> None:
    """The AOTI runner against torch.compile of the same program, in this process."""
    size = args.input_size
    options = {"freezing": True, "cpp_wrapper": args.cpp_wrapper}
    label = "pt2e torch.compile" + (" cpp_wrapper" if args.cpp_wrapper else "")
    rows = []
    for bs in args.batch_sizes:
        start = time.perf_counter()
        with torch._inductor.config.patch(options):
            compiled = compiled_program(program, size, bs)
        print(f"torch.compile ({', '.join(k for k, v in options.items() if v)}) of the program "
              f"at batch {bs}: {time.perf_counter() - start:.1f} s")
        for n in args.threads:
            modules = {name: export.load(files[name], engines[name]) for name in EAGER}
            modules["pt2e-aoti"] = pt2e.load_package(files["pt2e-aoti"])
            modules[label] = compiled
            with torch._inductor.config.patch(options):
                rows += measure(modules, size, (bs,), n, args.warmup, args.iterations,
                                engines=engines)
    print("\nIn this process (one process: eager TorchScript, the AOTI runner, torch.compile of "
          "the same converted program; interleaved):\n")
    print(timing_table(rows, " (in-process)"))
    print(f"\n({load()})")


def profiles(args, program, files: dict[str, bytes]) -> None:
    """Per-op profiles at batch 1 and the largest batch, 1 thread."""
    size = args.input_size
    for bs in sorted({1, max(args.batch_sizes)}):
        eager = export.load(files["eager-onednn"], "onednn")
        torch.backends.quantized.engine = "onednn"
        table_e, ops_e = profile(eager, size, bs)
        table_c, ops_c = profile(compiled_program(program, size, bs), size, bs)
        table_a, ops_a = profile(pt2e.load_package(files["pt2e-aoti"]), size, bs, rows=8)
        print(f"\n## Per-op profile, batch {bs}, 1 thread (self CPU per forward, 20 forwards)\n")
        print(f"- convolutions: eager onednn {conv_ms(ops_e):.2f} ms "
              f"({', '.join(f'{k} {v:.2f}' for k, v in ops_e.items() if 'conv' in k)}), "
              f"torch.compile {conv_ms(ops_c):.2f} ms "
              f"({', '.join(f'{k} {v:.2f}' for k, v in ops_c.items() if 'conv' in k)})")
        print(f"- everything: eager {sum(ops_e.values()):.2f} ms, torch.compile "
              f"{sum(ops_c.values()):.2f} ms; the AOTI runner's visible aten calls "
              f"{sum(ops_a.values()):.2f} ms "
              f"({', '.join(f'{k} {v:.3f}' for k, v in ops_a.items())})")
        for title, table in (("eager onednn (TorchScript)", table_e),
                             ("torch.compile of the PT2E program", table_c),
                             ("AOTI runner (its kernels are not visible)", table_a)):
            print(f"\n{title}:\n```\n{table}```")


if __name__ == "__main__":
    main()
