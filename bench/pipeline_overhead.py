"""Prefect's orchestration cost: the demo pipeline's wall time against its tasks' compute time.

    python bench/pipeline_overhead.py [--qat-epochs 3] [--store DIR] [--baseline-epochs 20]
    python bench/report.py --only pipeline_overhead     # its BENCHMARKS.md section

Runs the `quantize` flow on the demo's data and config (what `quantlab demo` runs after seeding
the digits and training the float baseline, both done here beforehand and not measured) against
a fresh Prefect API, then reads that flow run's task runs back from the Prefect API:

- wall: the flow call as the caller sees it (`quantize(config)`, start to return);
- busy: the union of the task runs' running intervals (start_time..end_time as the API
  recorded them). PTQ variants run in parallel threads, so intervals overlap: the union is the
  time at least one stage was computing, and the sum of durations is printed too;
- overhead = wall - busy: time in which no task was running (flow and task state changes,
  result handling, the progress artifact, logging to the API). ratio = wall / busy.

Why this and not "the same functions without Prefect vs the flow": both numbers come from one
run, so the minutes-long drift of a shared machine cannot masquerade as overhead. What it
cannot see is Prefect's cost inside a task's running interval (logging calls made by the task);
that is counted as compute, so the overhead is a lower bound on Prefect's share.

The API is the ephemeral one under a temporary PREFECT_HOME unless PREFECT_API_URL is set; its
start-up (once per process) is timed separately with an empty flow and excluded.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import sys
import tempfile
import time

_HOME = tempfile.mkdtemp(prefix="quantlab-overhead-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.setdefault("PREFECT_HOME", os.path.join(_HOME, "prefect"))  # before prefect loads
from quantlab_flows import set_prefect_defaults  # noqa: E402 (imports no Prefect)
set_prefect_defaults()  # the ephemeral API's start-up timeout, quantlab's as the CLI's
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prefect import flow  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402

from quantlab_flows.quantize import quantize  # noqa: E402
from quantlab import demo as demo_lib  # noqa: E402
from quantlab.store import Store  # noqa: E402

COMMAND = "python bench/pipeline_overhead.py"


@flow(name="overhead-warmup")
def _empty() -> None:
    """Starts the API (and the flow engine) once, so that the measured flow does not pay it."""


def _task_runs(flow_run_id, timeout: float = 60.0) -> tuple[list, int]:
    """The flow run's task runs once the API has recorded every one as finished.

    Returns (finished runs, number of task runs the API knows); the flow has returned, so the
    only wait is for the API to record the last end times.
    """
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
            finished = [r for r in runs if r.start_time and r.end_time]
            if (runs and len(finished) == len(runs)) or time.monotonic() > deadline:
                return finished, len(runs)
            time.sleep(0.5)


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def measure(qat_epochs: int = 3, store_uri: str | None = None, baseline_epochs: int = 20) -> dict:
    """Prepare the demo's inputs, run the flow once, and read its task runs from the API.

    `store_uri`: a store that may already hold the digits and the trained baseline (reused).
    `baseline_epochs`: training of the float baseline (not measured; the demo trains 20).
    """
    store_uri, cache = store_uri or os.path.join(_HOME, "store"), os.path.join(_HOME, "cache")
    store = Store(store_uri)
    data_uri, _ = demo_lib.seed(store)
    checkpoint, _ = demo_lib.train_baseline(
        store, data_uri, cache, epochs=baseline_epochs, on_epoch=lambda e, s, top1: print(
            f"baseline epoch {e}: val top-1 {top1:.2f}", file=sys.stderr, flush=True))
    config = demo_lib.demo_config(store_uri, data_uri, checkpoint, qat_epochs=qat_epochs)
    config = config.model_copy(update={"cache_dir": cache})

    t0 = time.perf_counter()
    _empty()
    startup = time.perf_counter() - t0

    t0 = time.perf_counter()
    state = quantize(config, return_state=True)
    wall = time.perf_counter() - t0
    state.result()  # raise if the flow failed
    runs, num_expected = _task_runs(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(state.state_details.flow_run_id)
    intervals = [(r.start_time.timestamp(), r.end_time.timestamp()) for r in runs]
    stages = {re.sub(r"-[0-9a-f]{3}$", "", r.name): (r.end_time - r.start_time).total_seconds()
              for r in sorted(runs, key=lambda r: r.start_time)}  # names without their suffix
    busy = _union_seconds(intervals)
    return {"wall_s": wall, "flow_run_s": (fr.end_time - fr.start_time).total_seconds(),
            "busy_s": busy, "sum_s": sum(b - a for a, b in intervals), "overhead_s": wall - busy,
            "ratio": wall / busy, "startup_s": startup, "num_task_runs": len(runs),
            "num_expected": num_expected, "stages": stages, "qat_epochs": qat_epochs}


def markdown_section() -> str:
    """BENCHMARKS.md's section (runs the measurement)."""
    m = measure()
    lines = [
        "## Pipeline overhead (Prefect orchestration)", "",
        f"Command: `{COMMAND}`", "",
        "The `quantize` flow on the demo's digits and config (float baseline trained beforehand, "
        f"not measured; QAT {m['qat_epochs']} epochs on 2 gloo workers), one run; task "
        "durations read back from the Prefect API. Overhead is wall time in which no task was "
        "running, a lower bound on Prefect's share (its cost inside a task counts as compute).",
        "",
        "| figure | seconds |", "|---|---|",
        f"| wall time of `quantize(config)` | {m['wall_s']:.1f} |",
        f"| flow run start to end (Prefect API) | {m['flow_run_s']:.1f} |",
        f"| busy: union of {m['num_task_runs']} task runs | {m['busy_s']:.1f} |",
        f"| sum of task run durations (PTQ runs in parallel) | {m['sum_s']:.1f} |",
        f"| **overhead = wall - busy** | **{m['overhead_s']:.1f}** |",
        f"| API start-up, once per process (excluded) | {m['startup_s']:.1f} |", "",
        f"**wall / busy = {m['ratio']:.3f}** (Prefect adds {100 * (m['ratio'] - 1):.1f}% on top "
        "of the stages' compute).", "",
        "| task run | seconds |", "|---|---|",
    ]
    lines += [f"| {name} | {secs:.1f} |" for name, secs in m["stages"].items()]
    if m["num_task_runs"] < m["num_expected"]:
        lines += ["", f"Warning: only {m['num_task_runs']} of {m['num_expected']} task runs "
                  "were recorded as finished by the API in time."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--store", help="reuse this store's digits and baseline (default: a "
                        "temporary one, trained first)")
    parser.add_argument("--baseline-epochs", type=int, default=20,
                        help="float baseline training, before and not measured (demo: 20)")
    args = parser.parse_args()
    m = measure(args.qat_epochs, args.store, args.baseline_epochs)
    for key, value in m.items():
        print(f"{key:>14}: {value}")


if __name__ == "__main__":
    main()
