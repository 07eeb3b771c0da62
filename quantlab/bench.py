"""Latency and throughput of TorchScript models, measured side by side; their memory and load time.

    rows = measure({"float": f, "ptq-x86": q}, input_size=224, batch_sizes=(1, 8), num_threads=2)
    old, new, attempts = compare(previous, candidate, input_size=224, max_ratio=1.1)
    prof = profile_artifact("model.pt", engine="x86", input_size=224, batch_size=1, num_threads=2)

Method: fixed intra-op threads, inference_mode, warm-up, then many timed iterations per model;
models are timed in interleaved rounds of BLOCK calls each (float, int8, float, int8, ...; who
goes first rotates) so that drift in the machine (frequency, a noisy neighbour) hits all of
them alike. Medians and p90s are reported, and the minimum as a sign of how disturbed the run
was (on a quiet machine it is close to the median).
`compare` is the regression gate's measurement: two models, batch 1, repeated while the
candidate looks slower than allowed.

Memory and load time are measured in a fresh Python process per model that imports only torch
(so it also proves that the file runs with plain `torch.jit.load`): the peak resident set size
(Linux VmHWM, reset after torch is imported) while loading the model and running inference,
and the median time of `torch.jit.load` from the file. tracemalloc would not see torch's
allocator, hence RSS.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
from pydantic import BaseModel

from quantlab.backend import engine_context

BLOCK = 5  # consecutive timed calls of one model before the next model's turn
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


class Latency(BaseModel):
    variant: str
    batch_size: int
    num_threads: int
    latency_ms: float        # median per call
    latency_ms_p90: float
    latency_ms_min: float    # the least disturbed call: close to the median on a quiet machine
    images_per_sec: float    # batch_size / median
    iterations: int


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU model name and which int8-relevant ISA flags (INT8_FLAGS) it has."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [f for f in INT8_FLAGS if f in flags]


def cpu_info() -> str:
    """CPU model and the int8-relevant ISA flags, e.g. "AMD EPYC [avx2,avx512_vnni]"."""
    model, flags = cpu_model_and_flags()
    return f"{model} [{','.join(flags)}]"


@contextmanager
def threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


@torch.inference_mode()
def measure(modules: Mapping[str, torch.nn.Module], input_size: int, batch_sizes=(1, 8),
            num_threads: int = 2, warmup: int = 10, iterations: int = 50,
            channels: int = 3, engines: Mapping[str, str | None] | None = None,
            channels_last: Collection[str] = ()) -> list[Latency]:
    """Time every module on random input of each batch size, interleaved; one row each.

    `engines` names the quantized engine held while a module runs (int8 models); modules named
    in `channels_last` get a channels-last input.
    """
    rows = []
    per_round = min(BLOCK, iterations)
    num_rounds = max(1, round(iterations / per_round))
    engines = engines or {}

    def engine_of(name: str):
        return engine_context(engines[name]) if engines.get(name) else nullcontext()

    with threads(num_threads):
        for bs in batch_sizes:
            x = torch.randn(bs, channels, input_size, input_size)
            inputs = {name: x.contiguous(memory_format=torch.channels_last)
                      if name in channels_last else x for name in modules}
            for name, m in modules.items():
                with engine_of(name):
                    for _ in range(warmup):
                        m(inputs[name])
            samples: dict[str, list[float]] = {name: [] for name in modules}
            names = list(modules)
            for r in range(num_rounds):
                order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
                for name in order:
                    m, xi = modules[name], inputs[name]
                    with engine_of(name):
                        for _ in range(per_round):
                            t0 = time.perf_counter()
                            m(xi)
                            samples[name].append(time.perf_counter() - t0)
            for name, s in samples.items():
                median = statistics.median(s)
                rows.append(Latency(variant=name, batch_size=bs, num_threads=num_threads,
                                    latency_ms=median * 1e3,
                                    latency_ms_p90=percentile(s, 0.9) * 1e3,
                                    latency_ms_min=min(s) * 1e3, images_per_sec=bs / median, iterations=len(s)))
    return rows


def measure_files(paths: Mapping[str, str], input_size: int, batch_sizes=(1, 8),
                  num_threads: int = 2, warmup: int = 10, iterations: int = 50,
                  engines: Mapping[str, str | None] | None = None) -> list[Latency]:
    """`measure` on local TorchScript files, in a fresh Python process.

    A process that also runs other threads (Prefect's API client, log shipping, an ephemeral
    API server) makes each short forward call wait for the GIL: measured in a flow's task,
    batch-1 latencies of the demo's 32-pixel models came out 4x (float) and 9x (int8) slower
    than in a quiet process, and speed-ups halved. The pipeline's figures come from here.
    """
    spec = {"paths": dict(paths), "input_size": input_size, "batch_sizes": list(batch_sizes),
            "num_threads": num_threads, "warmup": warmup, "iterations": iterations,
            "engines": dict(engines or {})}
    out = subprocess.run([sys.executable, "-m", "quantlab.bench"], input=json.dumps(spec),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark process failed: {out.stderr.strip()[-2000:]}")
    return [Latency.model_validate(r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def _measure_files_main() -> None:
    """The child of `measure_files`: a spec on stdin, Latency rows as JSON on stdout."""
    spec = json.loads(sys.stdin.read())
    engines = spec["engines"]
    modules = {}
    for name, path in spec["paths"].items():
        with engine_context(engines[name]) if engines.get(name) else nullcontext():
            modules[name] = torch.jit.load(path, map_location="cpu").eval()
    rows = measure(modules, spec["input_size"], spec["batch_sizes"], spec["num_threads"],
                   spec["warmup"], spec["iterations"], engines=engines)
    print(json.dumps([r.model_dump() for r in rows]))


def compare(reference: torch.nn.Module | str, candidate: torch.nn.Module | str, input_size: int,
            max_ratio: float, attempts: int = 3, num_threads: int = 2, warmup: int = 10,
            iterations: int = 50,
            engines: Mapping[str, str | None] | None = None) -> tuple[Latency, Latency, int]:
    """Batch-1 latency of `candidate` against `reference`, timed side by side (`measure`).

    Both are modules (timed in this process) or local TorchScript files (timed in a fresh
    process, `measure_files`, as the pipeline does; `engines` keyed "reference"/"candidate").
    A measurement whose ratio exceeds `max_ratio` is repeated, up to `attempts` in all: noise
    from a busy machine seldom repeats, a real slow-down does. Returns the reference's and the
    candidate's Latency from the measurement with the lowest ratio, and the attempts used.
    """
    pair_in = {"reference": reference, "candidate": candidate}
    best: tuple[Latency, Latency] | None = None
    for attempt in range(1, attempts + 1):
        if isinstance(reference, str):
            measured = measure_files(pair_in, input_size, (1,), num_threads, warmup, iterations,
                                     engines)
        else:
            measured = measure(pair_in, input_size, (1,), num_threads, warmup, iterations)
        rows = {r.variant: r for r in measured}
        pair = (rows["reference"], rows["candidate"])
        if best is None or _ratio(pair) < _ratio(best):
            best = pair
        if _ratio(best) <= max_ratio:
            break
    return best[0], best[1], attempt


def _ratio(pair: tuple[Latency, Latency]) -> float:
    return pair[1].latency_ms / pair[0].latency_ms
class Profile(BaseModel):
    """A model file's load time and peak memory, measured in a fresh torch-only process."""

    load_ms: float             # median torch.jit.load of the file (after one untimed load)
    peak_rss_mb: float         # the process's peak RSS running the model at one batch size
                               # (the first batch size also covers loading it)
    peak_rss_delta_mb: float   # that peak above the RSS before loading (model + inference)


# Runs in a fresh interpreter: plain torch only, and it checks that quantlab is not loaded.
_PROFILE_CODE = r"""
import json, re, statistics, sys, time
import torch
path, engine, input_size, batch_sizes, num_threads, channels_last, iterations = sys.argv[1:8]
torch.set_num_threads(int(num_threads))
if engine:
    torch.backends.quantized.engine = engine
def kib(key):
    with open("/proc/self/status") as f:
        return int(re.search(r"^" + key + r":\s+(\d+) kB", f.read(), re.M).group(1))
def reset_peak():  # the peak RSS (VmHWM) becomes the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
inputs = {}
for bs in map(int, batch_sizes.split(",")):
    x = torch.randn(bs, 3, int(input_size), int(input_size))
    inputs[bs] = x.contiguous(memory_format=torch.channels_last) if channels_last == "1" else x
reset_peak()
before = kib("VmRSS")
model = torch.jit.load(path).eval()
peaks = {}
with torch.inference_mode():
    for bs, x in inputs.items():
        for _ in range(int(iterations)):
            model(x)
        peaks[bs] = kib("VmHWM")
        reset_peak()
del model
times = []
for _ in range(5):
    t0 = time.perf_counter()
    torch.jit.load(path)
    times.append(time.perf_counter() - t0)
assert "quantlab" not in sys.modules
print(json.dumps({"load_ms": statistics.median(times) * 1e3,
                  "peaks": {bs: [p / 1024, (p - before) / 1024] for bs, p in peaks.items()}}))
"""


def profile_artifact(path: str, engine: str | None, input_size: int, batch_sizes: Sequence[int],
                     num_threads: int, channels_last: bool = False,
                     iterations: int = 5) -> dict[int, Profile]:
    """Load time and peak RSS per batch size of a local TorchScript file, in a fresh process.

    Batch sizes run in the given order, each with the peak reset before it; the delta is
    always taken against the RSS before the model was loaded (Linux only: /proc).
    """
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _PROFILE_CODE, path, engine or "", str(input_size),
         ",".join(map(str, batch_sizes)), str(num_threads), "1" if channels_last else "0",
         str(iterations)],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(path)))
    if out.returncode != 0:
        raise RuntimeError(f"profiling {path} failed: {out.stderr.strip()[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {int(bs): Profile(load_ms=result["load_ms"], peak_rss_mb=peak, peak_rss_delta_mb=delta)
            for bs, (peak, delta) in result["peaks"].items()}


def table_row(latency: Latency, profile: Profile | None = None, **columns) -> dict:
    """A `benchmarks` table row: the latency, the memory profile (or nulls), the context.

    `columns` carries run_id, model, engine, input_size, source, optimisation, channels_last,
    weights, calibration and size_bytes; the CPU, its int8 ISA flags and the torch version are
    filled in here.
    """
    nulls = {"load_ms": None, "peak_rss_mb": None, "peak_rss_delta_mb": None}
    flags = set(cpu_model_and_flags()[1])
    return {**latency.model_dump(), **(profile.model_dump() if profile else nulls),
            "cpu": cpu_info(), "cpu_avx2": "avx2" in flags,
            "cpu_avx512_vnni": "avx512_vnni" in flags, "cpu_amx": "amx_int8" in flags,
            "torch_version": torch.__version__, **columns}


if __name__ == "__main__":
    _measure_files_main()
