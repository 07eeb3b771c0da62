"""Latency and throughput of TorchScript models, measured side by side.

    rows = measure({"float": f, "ptq-x86": q}, input_size=224, batch_sizes=(1, 8), num_threads=2)
    old, new, attempts = compare(previous, candidate, input_size=224, max_ratio=1.1)

Method: fixed intra-op threads, inference_mode, warm-up, then many timed iterations per model;
models are timed in interleaved rounds (float, int8, float, int8, ...) so that drift in the
machine (frequency, a noisy neighbour) hits all of them alike. Medians and p90s are reported.
`compare` is the regression gate's measurement: two models, batch 1, repeated while the
candidate looks slower than allowed.
"""

from __future__ import annotations

import platform
import statistics
import time
from contextlib import contextmanager
from collections.abc import Iterator

import torch
from pydantic import BaseModel

ROUNDS = 5  # interleaved rounds; each times iterations/ROUNDS calls of every model


class Latency(BaseModel):
    variant: str
    batch_size: int
    num_threads: int
    latency_ms: float        # median per call
    latency_ms_p90: float
    images_per_sec: float    # batch_size / median
    iterations: int


def cpu_info() -> str:
    """CPU model and the int8-relevant ISA flags, e.g. "AMD EPYC [avx2,avx512_vnni]"."""
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
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model} [{','.join(wanted)}]"


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
def measure(modules: dict[str, torch.nn.Module], input_size: int, batch_sizes=(1, 8),
            num_threads: int = 2, warmup: int = 10, iterations: int = 50,
            channels: int = 3) -> list[Latency]:
    """Time every module on random input of each batch size, interleaved; one row each."""
    rows = []
    per_round = max(1, iterations // ROUNDS)
    with threads(num_threads):
        for bs in batch_sizes:
            x = torch.randn(bs, channels, input_size, input_size)
            for m in modules.values():
                for _ in range(warmup):
                    m(x)
            samples: dict[str, list[float]] = {name: [] for name in modules}
            names = list(modules)
            for r in range(ROUNDS):
                order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
                for name in order:
                    m = modules[name]
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        m(x)
                        samples[name].append(time.perf_counter() - t0)
            for name, s in samples.items():
                median = statistics.median(s)
                rows.append(Latency(variant=name, batch_size=bs, num_threads=num_threads,
                                    latency_ms=median * 1e3,
                                    latency_ms_p90=percentile(s, 0.9) * 1e3,
                                    images_per_sec=bs / median, iterations=len(s)))
    return rows


def compare(reference: torch.nn.Module, candidate: torch.nn.Module, input_size: int,
            max_ratio: float, attempts: int = 3, num_threads: int = 2, warmup: int = 10,
            iterations: int = 50) -> tuple[Latency, Latency, int]:
    """Batch-1 latency of `candidate` against `reference`, timed side by side (`measure`).

    A measurement whose ratio exceeds `max_ratio` is repeated, up to `attempts` in all: noise
    from a busy machine seldom repeats, a real slow-down does. Returns the reference's and the
    candidate's Latency from the measurement with the lowest ratio, and the attempts used.
    """
    best: tuple[Latency, Latency] | None = None
    for attempt in range(1, attempts + 1):
        rows = {r.variant: r for r in measure({"reference": reference, "candidate": candidate},
                                              input_size, (1,), num_threads, warmup, iterations)}
        pair = (rows["reference"], rows["candidate"])
        if best is None or _ratio(pair) < _ratio(best):
            best = pair
        if _ratio(best) <= max_ratio:
            break
    return best[0], best[1], attempt


def _ratio(pair: tuple[Latency, Latency]) -> float:
    return pair[1].latency_ms / pair[0].latency_ms
