"""What does `quantlab demo` ship, quiet and beside a second job? The verdict, run by run.

    python bench/verdict.py [--quiet-runs 2] [--busy-runs 1] [--dataset digits]

Runs `quantlab demo` as a user does (the console script, a fresh process per run) on one
temporary store: a first run seeds the data and trains the baseline, every run after it reuses
them, so the runs differ only in what else the machine does. "busy" runs have a second job
beside them: one process that busy-loops on a CPU for the whole run (on a 2-core machine, half
the machine). Per run: the (variant, runtime) selected, whether int8 pays, the best int8 /
best float ratio and its noise at every timed batch size, whether the verdict rests on noisy
timing, and the wall time. Two runs on identical inputs should make the same choice; the
table shows whether they did.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BURN = "while True: pass"
QUANTLAB = os.path.join(os.path.dirname(sys.executable), "quantlab")


def demo_run(store: str, dataset: str, busy: bool) -> dict:
    """One `quantlab demo` on `store` (a second job beside it if `busy`): its verdict."""
    print(f"quantlab demo ({'beside a second job' if busy else 'quiet'}) ...", file=sys.stderr,
          flush=True)
    burner = subprocess.Popen([sys.executable, "-c", BURN]) if busy else None
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        out = subprocess.run([QUANTLAB, "demo", "--store", store, "--dataset", dataset],
                             capture_output=True, text=True)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"quantlab demo failed: {out.stderr.strip()[-2000:]}")
    print(out.stdout, file=sys.stderr, flush=True)  # the table and verdict, as a user sees them
    show = subprocess.run([QUANTLAB, "show", "latest", "--store", store, "--json"],
                          capture_output=True, text=True, check=True)
    manifest = json.loads(show.stdout)
    return {"busy": busy, "seconds": seconds, "load_before": load_before,
            "selected": manifest["selected"], "run_id": manifest["run_id"]}


def rows(runs: list[dict]) -> list[str]:
    """A markdown table: one row per run."""
    sizes = sorted({s["batch_size"] for r in runs for s in r["selected"]["verdict"]["speedups"]})
    head = ["run", "machine", "selected", "int8 pays"] + [
        f"batch {b}: best int8 / best float (noise)" for b in sizes] + ["noisy", "wall"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(runs, 1):
        v = r["selected"]["verdict"]
        cells = [str(i), f"{'second job' if r['busy'] else 'quiet'} (load {r['load_before']:.1f})",
                 f"{r['selected']['variant']} in {r['selected']['runtime']}",
                 "yes" if v["int8_pays"] else "no"]
        by_batch = {s["batch_size"]: s for s in v["speedups"]}
        for b in sizes:
            s = by_batch.get(b)
            cells.append("-" if not s or s["speedup"] is None else
                         f"{s['speedup']:.2f}x ±{s['noise']:.0%} ({s['int8_variant']} in "
                         f"{s['int8_runtime']} vs float in {s['float_runtime']})")
        cells += ["yes" if v["noisy"] else "no", f"{r['seconds'] / 60:.1f} min"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def measure(quiet_runs: int, busy_runs: int, dataset: str) -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory(prefix="quantlab-verdict-") as tmp:
        store = os.path.join(tmp, "store")
        runs = [demo_run(store, dataset, busy=False) for _ in range(quiet_runs)]
        runs += [demo_run(store, dataset, busy=True) for _ in range(busy_runs)]
    cpu = runs[0]["selected"]["verdict"]["cpu"]
    return runs, cpu


def section(runs: list[dict], cpu: str, command: str) -> str:
    first = runs[0]["selected"]["verdict"]
    quiet = [(r["selected"]["variant"], r["selected"]["runtime"]) for r in runs if not r["busy"]]
    same = len(set(quiet)) <= 1
    return "\n".join([
        "## The verdict: what the demo ships, quiet and beside a second job", "",
        f"Command: `{command}` (each run is `quantlab demo` in a fresh process on one store; the "
        "first also seeds the data and trains the baseline, so its wall time is longer)", "",
        f"CPU: {cpu}; serving batch {first['serving_batch_size']}. A second job: one process "
        "busy-looping on a CPU for the whole run.", "",
        *rows(runs), "",
        f"Quiet runs on identical inputs chose {'the same pair' if same else 'DIFFERENT pairs'}: "
        f"{', '.join(f'{v} in {rt}' for v, rt in quiet)}.", "",
        "Verdict of the first run: " + first["sentence"], ""])


def markdown_section() -> str:
    runs, cpu = measure(2, 1, "digits")
    return section(runs, cpu, "python bench/verdict.py")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quiet-runs", type=int, default=2)
    p.add_argument("--busy-runs", type=int, default=1)
    p.add_argument("--dataset", default="digits")
    args = p.parse_args()
    runs, cpu = measure(args.quiet_runs, args.busy_runs, args.dataset)
    print(section(runs, cpu, "python bench/verdict.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
