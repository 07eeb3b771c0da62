"""Latency and throughput of TorchScript models, measured side by side; noise; memory and load time.

    rows = measure_files({"float": "f.pt", "ptq-x86": "q.pt"}, input_size=224, batch_sizes=(1, 8),
                         num_threads=2, engines={"ptq-x86": "x86"})   # fresh torch-only process
    old, new, attempts = compare(previous, candidate, input_size=224, max_ratio=1.1)
    noise_of(old, new)               # the noise of their ratio (same rounds: per-round ratios)
    faster_beyond_noise(new, old), margin_reason(new, old)          # "0.38 ms vs 0.41 ms, ..."
    prof = profile_artifact("model.pt", engine="x86", input_size=224, batch_size=1, num_threads=2)

Method (quantlab/_timer.py runs it): fixed intra-op threads, inference_mode, warm-up, then
interleaved rounds of BLOCK calls per model (float, int8, float, int8, ...; who goes first
rotates) so that drift in the machine (frequency, a noisy neighbour) hits all of them alike.
Medians and p90s are reported, and the minimum as a sign of how disturbed the run was.
Figures that decide things come from `measure_files`: a fresh process that imports only torch,
where each (thread count, batch size) is timed on models loaded afresh after the thread count
was set (an int8 model keeps the oneDNN primitive of its first call: see quantlab/_timer.py).

Noise. Per model and setting, `noise` is half the spread (p10 to p90) of the per-round medians
(at least MIN_ROUNDS rounds), relative to the median: how far a median taken at another moment
of the same run could be. A measurement is noisy if noise > NOISE_THRESHOLD or p90 >
TAIL_THRESHOLD x median; a noisy setting is measured again (all models, still interleaved) up
to `max_remeasure` times, and the measurements are combined (`combine`): the median of their
medians and the median of their noises, never the quietest one alone (keeping the quietest
under-states the noise that the next run will meet). If it stays noisy its rows say `noisy` and
a warning is logged. The thresholds come from timing a model against a byte-identical copy of itself on
this project's 2-core machines, quiet and under a CPU burner (bench/timing_check.py,
bench/gate_noise.py; figures in BENCHMARKS.md): see NOISE_THRESHOLD.

Oversubscription. Before timing, `capacity()` reads the CPUs this process may run on
(os.sched_getaffinity), the load average and how many of those CPUs are idle right now
(/proc/stat over half a second); no model is timed with more threads than there are idle CPUs
(at least 1), and the rows record the threads used and asked for, and the load.

`compare` is the regression gate's measurement: two models at the serving batch size, measured
again while the candidate looks slower than allowed or the timing is noisy, and combined.

Memory and load time are measured in a fresh Python process per model that imports only torch
(so it also proves that the file runs with plain `torch.jit.load`): the peak resident set size
(Linux VmHWM, reset after torch is imported) while loading the model and running inference,
and the median time of `torch.jit.load` from the file. tracemalloc would not see torch's
allocator, hence RSS.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from pydantic import BaseModel

from quantlab import _timer, runtimes
from quantlab.backend import engine_context
from quantlab.errors import ConfigError

BLOCK = _timer.BLOCK
MIN_ROUNDS = _timer.MIN_ROUNDS
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
# Noise thresholds, from identical-model trials (bench/timing_check.py, MobileNetV2 96 px int8,
# batch 1, 100 calls, 12 trials each, 2-core AMD EPYC): with the threads capped to the idle CPUs
# (one CPU burner), noise 0.9-1.1% median, 3.6% max, p90/median at most 1.07, identical models'
# ratio within 0.6%; with other developers' jobs at load 6-12, noise 11-12% median (23% max),
# p90/median 5.8-6.8, yet interleaving kept the identical models' ratio within 4.2%.
NOISE_THRESHOLD = 0.05   # relative: noise above this marks a measurement noisy
TAIL_THRESHOLD = 1.5     # p90 / median above this marks it noisy
MAX_REMEASURE = 2        # further measurements of a noisy setting before it is flagged
MIN_MARGIN = 0.02        # a latency difference below this is never "faster", even when quiet
# "Faster beyond the noise" means a margin above NOISE_MULTIPLE x the noise of the ratio. The
# noise (half the p10-p90 spread of per-round ratios) describes one round; the medians of
# separate quiet runs of the demo lay up to 2x that apart (int8/float 1.10 at ±9%, 1.30 at
# ±35%, 1.07 at ±12%, 1.15 at ±10%: bench/verdict.py), and one noise's margin let two
# identical runs choose differently.
NOISE_MULTIPLE = 2.0
_TIMER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_timer.py")

log = logging.getLogger(__name__)


class Latency(BaseModel):
    variant: str
    runtime: str = "torch"   # where it ran (quantlab.runtimes): torch-x86, onnxruntime, openvino..
    batch_size: int
    num_threads: int         # the intra-op threads used
    latency_ms: float        # median per call
    latency_ms_p90: float
    latency_ms_min: float    # the least disturbed call: close to the median on a quiet machine
    images_per_sec: float    # batch_size / median
    iterations: int
    noise: float = 0.0       # half the p10-p90 spread of per-round medians / median (0.03 = 3%)
    noisy: bool = False      # noise or p90/median above the thresholds after every re-measurement
    attempts: int = 1        # measurements of this setting (1 + re-measurements)
    num_threads_requested: int | None = None  # asked for; more than num_threads when capped
    load_avg_1m: float | None = None          # the machine's 1-minute load average at the start
    cpus_available: int | None = None         # CPUs this process may use (sched_getaffinity)
    idle_cpus: float | None = None            # of those, idle just before timing
    round_ms: list[float] = []   # per-round medians (not stored in tables)
    round_attempts: list[int] = []  # which measurement (0, 1, ..) each round belongs to
    session: str = ""            # one id per interleaved measurement: rounds pair up within it

    @property
    def tail(self) -> float:
        """p90 / median."""
        return self.latency_ms_p90 / self.latency_ms


class Capacity(BaseModel):
    """What the machine can give a benchmark right now."""

    cpus: int                # CPUs this process may run on
    load_avg_1m: float
    idle_cpus: float | None  # of those CPUs, idle over the sampling window (None: no /proc/stat)

    @property
    def threads(self) -> int:
        """The most intra-op threads to time with: CPUs at least 75% idle, at least 1."""
        free = self.cpus if self.idle_cpus is None else math.floor(self.idle_cpus + 0.25)
        return max(1, min(self.cpus, free))

    def describe(self) -> str:
        idle = "" if self.idle_cpus is None else f", {self.idle_cpus:.1f} of them idle"
        return f"{self.cpus} CPUs{idle}, load average {self.load_avg_1m:.2f}"


def _cpu_times(cpus: Collection[int]) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over `cpus`, from /proc/stat; None where it is missing."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    idle = total = 0.0
    for fields in lines:
        if fields[0] != "cpu" and int(fields[0][3:]) in cpus:
            # user nice system idle iowait irq softirq steal
            values = [float(v) for v in fields[1:9]]
            idle += values[3] + values[4]
            total += sum(values)
    return idle, total


def capacity(sample_seconds: float = 0.5) -> Capacity:
    """CPUs usable by this process, the load average, and how many are idle (sampled now)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(
        range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    time.sleep(sample_seconds)
    after = _cpu_times(cpus)
    idle = None
    if before and after and after[1] > before[1]:
        idle = len(cpus) * (after[0] - before[0]) / (after[1] - before[1])
    return Capacity(cpus=len(cpus), load_avg_1m=os.getloadavg()[0], idle_cpus=idle)


def cap_threads(requested: Sequence[int], cap: Capacity,
                say: Callable[[str], None] | None = None) -> list[tuple[int, int]]:
    """(used, requested) per requested thread count, none above `cap.threads`; says so if capped."""
    out = [(min(n, cap.threads), n) for n in requested]
    capped = [n for used, n in out if used < n]
    if capped:
        (say or log.warning)(
            f"timing at most {cap.threads} thread(s), not {', '.join(map(str, capped))}: "
            f"{cap.describe()} (more threads than free CPUs would time the other load)")
    return out


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


def spread(values: Sequence[float]) -> float:
    """Half the p10-p90 range of `values`, relative to their median."""
    return (percentile(list(values), 0.9) - percentile(list(values), 0.1)) / (
        2 * statistics.median(values))


def latency(name: str, batch_size: int, num_threads: int, rounds: Sequence[Sequence[float]],
            session: str = "", noise_threshold: float = NOISE_THRESHOLD,
            tail_threshold: float = TAIL_THRESHOLD) -> Latency:
    """One model's Latency from its timed calls (seconds), grouped by interleaved round."""
    s = [t for r in rounds for t in r]
    median = statistics.median(s)
    round_ms = [statistics.median(r) * 1e3 for r in rounds]
    noise = spread(round_ms)
    p90 = percentile(s, 0.9)
    return Latency(variant=name, batch_size=batch_size, num_threads=num_threads,
                   latency_ms=median * 1e3, latency_ms_p90=p90 * 1e3,
                   latency_ms_min=min(s) * 1e3, images_per_sec=batch_size / median,
                   iterations=len(s), noise=noise,
                   noisy=noise > noise_threshold or p90 / median > tail_threshold,
                   round_ms=round_ms, session=session)


@torch.inference_mode()
def measure(modules: Mapping[str, torch.nn.Module], input_size: int, batch_sizes=(1, 8),
            num_threads: int = 2, warmup: int = 10, iterations: int = 50,
            channels: int = 3, engines: Mapping[str, str | None] | None = None,
            channels_last: Collection[str] = ()) -> list[Latency]:
    """Time every module on random input of each batch size, interleaved, in this process.

    For quick looks and tests only: the same modules serve every batch size (an int8 model
    keeps the oneDNN primitive of its first call's shape, so later batch sizes run slower
    than in deployment), and other threads of this process compete for the GIL. Figures that
    decide things come from `measure_files`. `engines` names the quantized engine held while
    a module runs (int8 models); modules named in `channels_last` get a channels-last input.
    No re-measurement here; noisy rows are flagged.
    """
    rows = []
    engines = engines or {}
    session = uuid.uuid4().hex[:8]
    with threads(num_threads), _keep_engine():
        for bs in batch_sizes:
            x = torch.randn(bs, channels, input_size, input_size)
            inputs = {name: x.contiguous(memory_format=torch.channels_last)
                      if name in channels_last else x for name in modules}
            rounds = _timer.time_rounds(modules, inputs, warmup, iterations, BLOCK, engines)
            rows += [latency(name, bs, num_threads, r, f"{session}-{bs}")
                     for name, r in rounds.items()]
    return rows


@contextmanager
def _keep_engine() -> Iterator[None]:
    """Restore the process-wide quantized engine that `_timer.time_rounds` switches."""
    with engine_context(torch.backends.quantized.engine):
        yield


class TimedFile(BaseModel):
    """A model file to time, and how to run it."""

    path: str
    runtime: str = "torch"                  # quantlab.runtimes name: torch, onnxruntime, openvino..
    engine: str | None = None               # quantized engine to load and run it under (torch)
    channels_last: bool = False             # feed a channels-last input
    optimize_for_inference: bool = False    # apply torch.jit.optimize_for_inference after load


def measure_files(paths: Mapping[str, str | TimedFile], input_size: int, batch_sizes=(1, 8),
                  num_threads: int | Sequence[int] = 2, warmup: int = 10, iterations: int = 50,
                  engines: Mapping[str, str | None] | None = None, *,
                  max_remeasure: int = MAX_REMEASURE, noise_threshold: float = NOISE_THRESHOLD,
                  tail_threshold: float = TAIL_THRESHOLD, limit_threads: bool = True,
                  say: Callable[[str], None] | None = None) -> list[Latency]:
    """Time local TorchScript files in a fresh torch-only process; rows per setting and model.

    Every thread count x batch size is a setting, timed interleaved on models loaded afresh
    (quantlab/_timer.py). A process that also runs other threads (Prefect's API client, log
    shipping, a rich console) makes each short forward call wait for the GIL: measured in a
    flow's task, batch-1 latencies of the demo's 32-pixel models came out 4x (float) and 9x
    (int8) slower than in a quiet process. The pipeline's figures come from here.

    A setting with a noisy row is measured again (up to `max_remeasure` times) and the
    measurements combined (`combine`: median latency, median noise); rows still noisy are flagged and a warning names them (`say`,
    default: this module's logger). With `limit_threads`, thread counts above the idle CPUs
    are capped (`capacity`), and the rows say so.
    """
    models = {name: (p if isinstance(p, TimedFile) else TimedFile(path=p)) for name, p in
              paths.items()}
    for name, engine in (engines or {}).items():
        if engine and name in models:
            models[name] = models[name].model_copy(update={"engine": engine})
    for name, m in models.items():
        fmt = runtimes.format_of(m.path)
        if not runtimes.get_runtime(m.runtime).supports(fmt):
            raise ConfigError(f"{name}: runtime {m.runtime} cannot run {m.path}; valid for "
                              f"{fmt}: {', '.join(runtimes.runtimes_for(fmt, m.engine))}")
    for name, m in models.items():  # "torch-onednn": TorchScript under the onednn engine
        if m.runtime.startswith("torch-") and not m.engine:
            models[name] = m.model_copy(update={"engine": m.runtime.removeprefix("torch-")})
    requested = [num_threads] if isinstance(num_threads, int) else list(num_threads)
    cap = capacity()
    pairs = cap_threads(requested, cap, say) if limit_threads else [(n, n) for n in requested]
    asked: dict[int, int] = {}      # threads used -> the most asked for (capped ones merge)
    for used, n in pairs:
        asked[used] = max(asked.get(used, 0), n)
    settings = list(dict.fromkeys((used, asked[used], bs) for used, _ in pairs
                                  for bs in batch_sizes))
    measured: dict[tuple[int, int, int], list[list[Latency]]] = {k: [] for k in settings}
    combined: dict[tuple[int, int, int], list[Latency]] = {}
    todo = settings
    for _ in range(1 + max(0, max_remeasure)):
        timed = _run_timer(models, input_size, [(used, bs) for used, _, bs in todo], warmup,
                           iterations, noise_threshold, tail_threshold)
        for key, rows in zip(todo, timed):
            measured[key].append(rows)
            combined[key] = [combine([attempt[i] for attempt in measured[key]], noise_threshold,
                                     tail_threshold) for i in range(len(rows))]
        todo = [key for key in settings if any(r.noisy for r in combined[key])]
        if not todo:
            break
    out = []
    for key in settings:
        for r in combined[key]:
            out.append(r.model_copy(update={
                "runtime": models[r.variant].runtime, "num_threads_requested": key[1],
                "load_avg_1m": cap.load_avg_1m, "cpus_available": cap.cpus,
                "idle_cpus": cap.idle_cpus}))
    for r in out:
        if r.noisy:
            (say or log.warning)(
                f"noisy timing: {r.variant} batch {r.batch_size}, {r.num_threads} thread(s): "
                f"{r.latency_ms:.3f} ms with per-round medians spread +-{r.noise:.0%} and p90 "
                f"{r.tail:.2f}x the median, after {r.attempts} measurement(s) "
                f"({cap.describe()})")
    return out


def combine(measurements: Sequence[Latency], noise_threshold: float = NOISE_THRESHOLD,
            tail_threshold: float = TAIL_THRESHOLD) -> Latency:
    """One model's measurements of one setting (a first one and its re-measurements) as one.

    Median latency and p90 over the measurements; noise: the median of theirs (the quietest
    alone would under-state it), or the spread of their medians if larger (each measurement
    is a fresh process, and processes differ more than rounds within one); the least
    disturbed call; every round kept with the measurement it came from (`round_attempts`), so
    that `noise_of` pairs rounds within each measurement.
    """
    first = measurements[0]
    if len(measurements) == 1:
        return first.model_copy(update={"round_attempts": [0] * len(first.round_ms)})
    median = statistics.median(m.latency_ms for m in measurements)
    p90 = statistics.median(m.latency_ms_p90 for m in measurements)
    # the noise within a measurement (the median of theirs), or between the measurements, each
    # a fresh process, if their medians lie further apart
    noise = max(statistics.median(m.noise for m in measurements),
                spread([m.latency_ms for m in measurements]))
    return first.model_copy(update={
        "latency_ms": median, "latency_ms_p90": p90,
        "latency_ms_min": min(m.latency_ms_min for m in measurements),
        "images_per_sec": first.batch_size / (median / 1e3),
        "iterations": sum(m.iterations for m in measurements), "noise": noise,
        "noisy": noise > noise_threshold or p90 / median > tail_threshold,
        "attempts": len(measurements),
        "round_ms": [x for m in measurements for x in m.round_ms],
        "round_attempts": [i for i, m in enumerate(measurements) for _ in m.round_ms],
        "session": "+".join(m.session for m in measurements)})


def _run_timer(models: Mapping[str, TimedFile], input_size: int, settings: list[tuple[int, int]],
               warmup: int, iterations: int, noise_threshold: float,
               tail_threshold: float) -> list[list[Latency]]:
    """One torch-only process timing every setting; per setting, a Latency per model."""
    spec = {"models": {n: m.model_dump() for n, m in models.items()},
            "settings": [list(s) for s in settings], "input_size": input_size, "channels": 3,
            "warmup": warmup, "iterations": iterations, "block": BLOCK}
    out = subprocess.run([sys.executable, "-P", "-W", "ignore", _TIMER], input=json.dumps(spec),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark process failed: {out.stderr.strip()[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    session = uuid.uuid4().hex[:8]
    return [[latency(name, s["batch_size"], s["num_threads"], rounds,
                     f"{session}-{i}", noise_threshold, tail_threshold)
             for name, rounds in s["rounds"].items()]
            for i, s in enumerate(result["settings"])]


def compare(reference: torch.nn.Module | str | TimedFile,
            candidate: torch.nn.Module | str | TimedFile, input_size: int,
            max_ratio: float, attempts: int = 3, num_threads: int = 2, warmup: int = 10,
            iterations: int = 50, engines: Mapping[str, str | None] | None = None,
            batch_size: int = 1) -> tuple[Latency, Latency, int]:
    """The latency of `candidate` against `reference` at `batch_size`, timed side by side.

    Both are modules (timed in this process, `measure`) or local files (paths of TorchScript
    files, or TimedFiles in any runtime), timed in a fresh process (`measure_files`, as the
    pipeline does; `engines` keyed "reference"/"candidate").
    While the ratio candidate/reference exceeds `max_ratio` or the timing is noisy, the pair is
    measured again, up to `attempts` measurements in all, and the measurements are combined
    (`combine`: the median, never the luckiest one). Returns the reference's and the
    candidate's combined Latency (their ratio's noise: `noise_of`) and the measurements taken.
    """
    pair_in = {"reference": reference, "candidate": candidate}
    taken: list[dict[str, Latency]] = []
    for attempt in range(1, attempts + 1):
        if isinstance(reference, (str, TimedFile)):
            measured = measure_files(pair_in, input_size, (batch_size,), num_threads, warmup,
                                     iterations, engines, max_remeasure=0)
        else:
            measured = measure(pair_in, input_size, (batch_size,), num_threads, warmup,
                               iterations)
        taken.append({r.variant: r for r in measured})
        old, new = (combine([t[name] for t in taken]) for name in ("reference", "candidate"))
        if new.latency_ms <= max_ratio * old.latency_ms and not (old.noisy or new.noisy):
            break
    return old, new, attempt


def margin(a: Latency, b: Latency) -> float:
    """How much slower b is than a, relative: 0.07 = b's median is 7% above a's (< 0: faster)."""
    return b.latency_ms / a.latency_ms - 1.0


def noise_of(a: Latency, b: Latency) -> float:
    """The noise of the ratio of two latencies, relative.

    Measured in the same interleaved rounds (same `session`), it is the spread of the
    per-round ratios (load that hits both alike cancels), the median over the measurements
    combined (`combine`), or the spread of those measurements' own ratios if larger (on the
    demo's 0.1 ms models two quiet fresh processes gave int8/float ratios of 1.10 and 1.30
    with per-round noise of 9%: bench/verdict.py). Otherwise the two noises add.
    """
    if a.session and a.session == b.session and len(a.round_ms) == len(b.round_ms) > 1:
        groups: dict[int, list[float]] = {}
        for i, (x, y) in enumerate(zip(a.round_ms, b.round_ms)):
            groups.setdefault(a.round_attempts[i] if a.round_attempts else 0, []).append(y / x)
        within = statistics.median(spread(ratios) for ratios in groups.values())
        # each measurement is a fresh process: how far their ratios lie apart counts too
        between = spread([statistics.median(r) for r in groups.values()]) if len(groups) > 1 else 0.0
        return max(within, between)
    return a.noise + b.noise


def faster_beyond_noise(a: Latency, b: Latency) -> bool:
    """Is a faster than b beyond the measured noise: by more than NOISE_MULTIPLE x the noise of
    their ratio, and at least MIN_MARGIN?"""
    return margin(a, b) > max(NOISE_MULTIPLE * noise_of(a, b), MIN_MARGIN)


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def _pct(value: float) -> str:
    return f"{value:.1%}" if abs(value) < 0.1 else f"{value:.0%}"


def margin_reason(a: Latency, b: Latency) -> str:
    """The words for a selection reason: "0.38 ms vs 0.41 ms, a 7.9% margin; noise 1.0%,
    margin needed 2.0%".

    Says "within the noise" when a is not faster than b beyond it, and "noisy" when either
    measurement stayed noisy.
    """
    noise = noise_of(a, b)
    text = (f"{_ms(a.latency_ms)} vs {_ms(b.latency_ms)}, a {_pct(margin(a, b))} margin; "
            f"noise {_pct(noise)}, margin needed {_pct(max(NOISE_MULTIPLE * noise, MIN_MARGIN))}")
    if not faster_beyond_noise(a, b):
        text += ", within the noise"
    if a.noisy or b.noisy:
        text += "; measurement noisy"
    return text


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
    weights, calibration and size_bytes (and backend, for a quantlab variant); the CPU, its int8 ISA flags and the torch version are
    filled in here.
    """
    nulls = {"load_ms": None, "peak_rss_mb": None, "peak_rss_delta_mb": None}
    flags = set(cpu_model_and_flags()[1])
    return {**latency.model_dump(exclude={"round_ms", "round_attempts", "session"}), **(profile.model_dump() if profile else nulls),
            "cpu": cpu_info(), "cpu_avx2": "avx2" in flags,
            "cpu_avx512_vnni": "avx512_vnni" in flags, "cpu_amx": "amx_int8" in flags,
            "torch_version": torch.__version__, "format": runtimes.format_for(latency.runtime),
            "backend": None, **columns}

