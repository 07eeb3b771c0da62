"""Are `quantlab bench`'s timings those of a plain torch process, and is noise caught? Quiet and under a CPU burner.

    python bench/timing_check.py [--input-size 96] [--repeats 3] [--trials 8]

One MobileNetV2 float model and its int8 ptq-minmax artifact (the pipeline's functions, random
weights: timing does not depend on the values) are saved as TorchScript files. Then, on a quiet
machine and again with CPU burners running (`--burners`, busy-looping processes this script
starts and stops), interleaved in repetitions:

1. timing: each file at 1 and 2 threads, batch 1, timed three ways: `in-process` (the old
   `quantlab bench` method: the models built in this process, every thread count on the same
   loaded modules), `bench` (`quantlab bench`'s path now: bench.time_candidates, a fresh
   torch-only process) and `bare` (a `python -c` process that imports only torch, sets the
   thread count, loads the one file and times it). The table gives each method's median over
   the repetitions divided by bare's: 1.00 is the truth.
2. noise: the int8 file timed against a byte-identical copy of itself (`timing.measure_files`,
   no re-measurement), `--trials` times: the per-round-median noise of each, the paired noise
   of their ratio (timing.noise_of: the spread of per-round ratios), p90/median, the ratio of
   the two identical models (1.00 is the truth), how often the measurement is flagged noisy,
   and how often `faster_beyond_noise` wrongly calls one of the identical models faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quantlab import bench  # noqa: E402
from quantlab.timing import (NOISE_THRESHOLD, TAIL_THRESHOLD, capacity, cpu_info,  # noqa: E402
                            faster_beyond_noise, measure, measure_files, noise_of)

BARE = r"""
import statistics, sys, time, torch
path, engine, n, size, warmup, iterations = sys.argv[1:7]
torch.set_num_threads(int(n))
if engine:
    torch.backends.quantized.engine = engine
m = torch.jit.load(path).eval()
x = torch.randn(1, 3, int(size), int(size))
with torch.inference_mode():
    for _ in range(int(warmup)):
        m(x)
    t = []
    for _ in range(int(iterations)):
        t0 = time.perf_counter()
        m(x)
        t.append(time.perf_counter() - t0)
print(statistics.median(t) * 1e3)
"""
BURN = "while True: pass"


def bare_ms(path: str, engine: str | None, num_threads: int, input_size: int, warmup: int,
            iterations: int) -> float:
    """Median latency of one file in a process that imports only torch."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", BARE, path, engine or "",
                          str(num_threads), str(input_size), str(warmup), str(iterations)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def build(input_size: int, folder: str) -> tuple[dict, dict[str, str]]:
    """quantlab's float artifact and ptq-minmax (onednn): candidates by key, and their files."""
    spec = bench.parse_spec({"input_size": input_size, "variants": ["ptq-minmax"],
                                  "engines": ["onednn"], "optimisations": ["freeze"],
                                  "threads": [1, 2], "batch_sizes": [1]})
    cands = bench.build_candidates(spec, log=lambda line: None)
    keys = {f"{i}:{c.label}": c for i, c in enumerate(cands) if c.source == "quantlab"}
    paths = {}
    for i, (key, c) in enumerate(keys.items()):
        paths[key] = os.path.join(folder, f"{i}.pt")
        with open(paths[key], "wb") as f:
            f.write(c.payload)
    return {"spec": spec, "keys": keys}, paths


def timing_table(built: dict, paths: dict[str, str], args) -> list[str]:
    spec, keys = built["spec"], built["keys"]
    spec = spec.model_copy(update={"warmup": args.warmup, "iterations": args.iterations,
                                   "max_remeasure": 0})
    modules = {k: c.module for k, c in keys.items()}
    engines = {k: c.engine for k, c in keys.items()}
    got: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(args.repeats):
        for n in (1, 2):
            for r in measure(modules, spec.input_size, (1,), n, args.warmup, args.iterations,
                             engines=engines):
                got.setdefault(("in-process", r.variant, n), []).append(r.latency_ms)
        for r in bench.time_candidates(spec, keys, log=lambda line: None):
            got.setdefault(("bench", r.variant, r.num_threads), []).append(r.latency_ms)
        for key, path in paths.items():
            for n in (1, 2):
                got.setdefault(("bare", key, n), []).append(
                    bare_ms(path, engines[key], n, spec.input_size, args.warmup, args.iterations))
    lines = ["| model | threads | bare ms | bench / bare | in-process / bare |",
             "|---|---|---|---|---|"]
    for key in keys:
        for n in (1, 2):
            bare = statistics.median(got[("bare", key, n)])
            via_bench = got.get(("bench", key, n))
            ratio = f"{statistics.median(via_bench) / bare:.2f}" if via_bench else "- (capped)"
            lines.append(f"| {key.split(':', 1)[1]} | {n} | {bare:.3f} | {ratio} | "
                         f"{statistics.median(got[('in-process', key, n)]) / bare:.2f} |")
    return lines


def noise_table(paths: dict[str, str], input_size: int, args) -> list[str]:
    key = next(k for k in paths if "ptq" in k)
    pair = {"a": paths[key], "b": paths[key]}
    lines = []
    for n in (1, 2):
        noise, paired, tails, ratios, flagged, wrong, used = [], [], [], [], 0, 0, []
        for _ in range(args.trials):
            rows = {r.variant: r for r in measure_files(
                pair, input_size, (1,), n, args.warmup, args.iterations,
                engines={"a": "onednn", "b": "onednn"}, max_remeasure=0, say=lambda line: None)}
            a, b = rows["a"], rows["b"]
            used.append(a.num_threads)
            noise += [a.noise, b.noise]
            paired.append(noise_of(a, b))
            tails += [a.tail, b.tail]
            ratios.append(b.latency_ms / a.latency_ms)
            flagged += a.noisy or b.noisy
            wrong += faster_beyond_noise(a, b) or faster_beyond_noise(b, a)
        err = [abs(r - 1) for r in ratios]
        lines.append(f"| {n} (used {min(used)}-{max(used)}) | {statistics.median(noise):.1%} "
                     f"(max {max(noise):.1%}) | {statistics.median(paired):.1%} "
                     f"(max {max(paired):.1%}) | "
                     f"{statistics.median(tails):.2f} (max "
                     f"{max(tails):.2f}) | {statistics.median(err):.1%} (max {max(err):.1%}) | "
                     f"{flagged}/{args.trials} | {wrong}/{args.trials} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of the timing")
    p.add_argument("--trials", type=int, default=8, help="identical-model measurements")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--burners", type=int, default=1, help="busy-looping processes when loaded")
    args = p.parse_args()
    print(f"CPU {cpu_info()}; MobileNetV2 {args.input_size}px, batch 1, {args.iterations} timed "
          f"calls; noise threshold {NOISE_THRESHOLD:.0%}, p90/median threshold {TAIL_THRESHOLD}")
    with tempfile.TemporaryDirectory(prefix="quantlab-timing-") as tmp:
        built, paths = build(args.input_size, tmp)
        for burners in (0, args.burners):
            procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(burners)]
            try:
                time.sleep(1.0 if burners else 0.0)
                cap = capacity()
                t0 = time.time()
                print(f"\n### {'quiet' if not burners else f'{burners} CPU burner(s)'}: "
                      f"{cap.describe()} at the start\n")
                print("\n".join(timing_table(built, paths, args)))
                print("\n| threads asked | noise, median (max) | paired noise of the ratio "
                      "| p90/median | identical models' ratio error | flagged noisy | called faster |\n"
                      "|---|---|---|---|---|---|---|")
                print("\n".join(noise_table(paths, args.input_size, args)))
                print(f"\n({time.time() - t0:.0f} s; load average at the end "
                      f"{os.getloadavg()[0]:.2f})")
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
