"""Which (variant, runtime) a run ships: the comparison rows and the choice under the budget.

    rows = comparison(results, latencies, batch_size=1)   # one ResultRow per (variant, runtime)
    chosen = select(rows, max_accuracy_drop=1.0, latencies=latencies, serving_batch_size=1)
    chosen.verdict.sentence        # "int8 pays off on this CPU at batch 1: ..." or "does not"
    table = fastest_per_variant(rows)                     # each variant in its fastest runtime

The rule. Float competes: doing nothing (float in its fastest runtime) is always a candidate,
and an int8 pair is one only if it is within the accuracy budget, its export did not diverge,
and it is faster than the fastest float pair beyond the measured noise at the serving batch
size. Among the candidates the choice starts from the most accurate and moves to a faster one
only when that one is faster than the current choice beyond the noise (then again from there).
Accuracy is the same in every run on the same inputs, so the start does not depend on which
pair happened to be measured fastest; a move needs a margin of more than twice the noise of
that very ratio (quantlab.timing.faster_beyond_noise, NOISE_MULTIPLE). Judging ties against the one fastest measurement
instead made two identical runs choose differently (tests/library/test_selection.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from quantlab import runtimes
from quantlab.registry import BatchSpeedup, ResultRow, Selection, Verdict
from quantlab.timing import (Latency, cpu_info, faster_beyond_noise, margin_reason, noise_of)

Key = tuple[str, str]


def at_batch(latencies: Sequence[Latency], batch_size: int) -> dict[Key, Latency]:
    """Each (variant, runtime)'s latency at `batch_size`."""
    return {(x.variant, x.runtime): x for x in latencies if x.batch_size == batch_size}


def _key(row: ResultRow) -> Key:
    return row.variant, row.runtime


def comparison(results: Sequence[dict], latencies: Sequence[Latency],
               batch_size: int = 1) -> list[ResultRow]:
    """A row per (variant, runtime) evaluated; latency and speed-ups at `batch_size` (the
    serving batch): `speedup` against the fastest float runtime of the run,
    `speedup_vs_torchscript` against the float TorchScript file in torch.

    `results` items carry variant, method, top1, top5, size_bytes and optionally runtime
    (default torch; the format is the runtime's), float_layers, algorithms, agreement, equivalent,
    float_agreement, sqnr_db.
    """
    lat = at_batch(latencies, batch_size)
    float_times = {rt: x.latency_ms for (v, rt), x in lat.items() if v == "float"}
    float_ms = min(float_times.values(), default=None)
    torch_ms = float_times.get("torch")
    rows = []
    for r in results:
        x = lat.get((r["variant"], r.get("runtime", "torch")))
        ms = x.latency_ms if x else None
        rows.append(ResultRow(**{k: v for k, v in r.items() if k in ResultRow.model_fields},
                              format=runtimes.format_for(r.get("runtime", "torch")),
                              latency_ms=ms,
                              speedup=(float_ms / ms) if (ms and float_ms) else None,
                              speedup_vs_torchscript=(torch_ms / ms) if (ms and torch_ms) else None,
                              latency_noise=x.noise if x else None,
                              noisy=bool(x and x.noisy)))
    return sorted(rows, key=lambda row: ["float", "ptq", "qat"].index(row.method))  # stable


def fastest_per_variant(rows: Sequence[ResultRow],
                        selected: Selection | None = None) -> list[ResultRow]:
    """One row per variant, in its fastest runtime at the serving batch among those whose
    export did not diverge (a variant that was not timed keeps its first row), the selected
    variant in the runtime it was selected in; in the rows' order."""
    out: dict[str, ResultRow] = {}
    for r in rows:
        if r.equivalent is False:
            continue
        if selected is not None and r.variant == selected.variant:
            if r.runtime == selected.runtime:
                out[r.variant] = r
            continue
        best = out.get(r.variant)
        if best is None or (r.latency_ms is not None and
                            (best.latency_ms is None or r.latency_ms < best.latency_ms)):
            out[r.variant] = r
    return list(out.values())


def _untimed_latencies(rows: Sequence[ResultRow], batch_size: int) -> list[Latency]:
    """Latencies from rows that carry only a median (no rounds, so no measured noise)."""
    return [Latency(variant=r.variant, runtime=r.runtime, batch_size=batch_size, num_threads=1,
                    latency_ms=r.latency_ms, latency_ms_p90=r.latency_ms,
                    latency_ms_min=r.latency_ms, images_per_sec=batch_size * 1e3 / r.latency_ms,
                    iterations=1, noise=r.latency_noise or 0.0, noisy=r.noisy)
            for r in rows if r.latency_ms]


def _name(row: ResultRow) -> str:
    return f"{row.variant} in {row.runtime}"


def select(rows: Sequence[ResultRow], max_accuracy_drop: float,
           latencies: Sequence[Latency] = (), serving_batch_size: int = 1) -> Selection:
    """The (variant, runtime) to ship: float in its fastest runtime unless an int8 pair pays
    (the rule is in this module's docstring), with the verdict that says why.

    The budget is against float's top-1 (the float TorchScript file's, or the first float
    row's). Rows whose export diverged from its TorchScript artifact (`equivalent` False) are
    never chosen. `latencies` are every measured Latency (all batch sizes); without them the
    rows' own `latency_ms` count, with no noise measured.
    """
    floats = [r for r in rows if r.method == "float"]
    float_row = next((r for r in floats if r.runtime == "torch"), floats[0] if floats else None)
    int8 = [r for r in rows if r.method != "float" and r.equivalent is not False]
    if float_row is None or not int8:
        raise ValueError("selection needs the float row and at least one int8 variant")
    if not latencies:
        latencies = _untimed_latencies(rows, serving_batch_size)
    lat = at_batch(latencies, serving_batch_size)
    floor = float_row.top1 - max_accuracy_drop
    within = [r for r in int8 if r.top1 >= floor]
    timed_floats = [r for r in floats if _key(r) in lat]
    fastest_float = min(timed_floats, key=lambda r: lat[_key(r)].latency_ms, default=float_row)
    paying = [r for r in within if _key(r) in lat and _key(fastest_float) in lat
              and faster_beyond_noise(lat[_key(r)], lat[_key(fastest_float)])]

    candidates = [fastest_float, *paying]
    current = max(candidates, key=lambda r: (r.top1, r.method == "float", -r.size_bytes))
    steps = [f"most accurate candidate: {_name(current)} (top-1 {current.top1:.2f})"]
    while True:
        faster = [r for r in candidates if _key(r) in lat and _key(current) in lat
                  and faster_beyond_noise(lat[_key(r)], lat[_key(current)])]
        if not faster:
            break
        step = max(faster, key=lambda r: (r.top1, -lat[_key(r)].latency_ms))
        steps.append(f"moved to {_name(step)} (top-1 {step.top1:.2f}): "
                     f"{margin_reason(lat[_key(step)], lat[_key(current)])}")
        current = step

    speedups = [_speedup(latencies, within, floats, b)
                for b in sorted({x.batch_size for x in latencies})]
    speedups = [s for s in speedups if s is not None]
    pays = current.method != "float"
    involved = [lat[k] for k in {_key(current), _key(fastest_float)} if k in lat]
    verdict = Verdict(serving_batch_size=serving_batch_size, int8_pays=pays,
                      sentence=_sentence(current, lat, fastest_float, within,
                                         max_accuracy_drop, float_row, speedups,
                                         serving_batch_size),
                      cpu=cpu_info(), speedups=speedups,
                      noisy=any(x.noisy for x in involved), steps=steps)
    if pays:
        reason = (f"within {max_accuracy_drop:g} top-1 points of float ({current.top1:.2f} vs "
                  f"{float_row.top1:.2f}) and faster than float in {fastest_float.runtime} "
                  f"beyond the noise at batch {serving_batch_size}: "
                  f"{margin_reason(lat[_key(current)], lat[_key(fastest_float)])}")
    else:
        reason = verdict.sentence
    if len(steps) > 1:
        reason += "; " + "; ".join(steps)
    return Selection(variant=current.variant, runtime=current.runtime, format=current.format,
                     within_budget=True, reason=reason, verdict=verdict)


def _speedup(latencies: Sequence[Latency], within: Sequence[ResultRow],
             floats: Sequence[ResultRow], batch_size: int) -> BatchSpeedup | None:
    """The fastest int8 pair within the budget against the fastest float pair, at one batch."""
    lat = at_batch(latencies, batch_size)
    f = min((lat[_key(r)] for r in floats if _key(r) in lat), key=lambda x: x.latency_ms,
            default=None)
    if f is None:
        return None
    q = min((lat[_key(r)] for r in within if _key(r) in lat), key=lambda x: x.latency_ms,
            default=None)
    out = BatchSpeedup(batch_size=batch_size, float_runtime=f.runtime, float_ms=f.latency_ms,
                       noisy=f.noisy)
    if q is None:
        return out
    return out.model_copy(update={
        "int8_variant": q.variant, "int8_runtime": q.runtime, "int8_ms": q.latency_ms,
        "speedup": f.latency_ms / q.latency_ms, "noise": noise_of(f, q),
        "beyond_noise": faster_beyond_noise(q, f), "noisy": f.noisy or q.noisy})


def _ratio_text(s: BatchSpeedup) -> str:
    noise = f", noise ±{s.noise:.0%}" if s.noise is not None and math.isfinite(s.noise) else ""
    noisy = ", noisy" if s.noisy else ""
    return f"{s.speedup:.2f}x at batch {s.batch_size}{noise}{noisy}"


def _sentence(chosen: ResultRow, lat: dict[Key, Latency], fastest_float: ResultRow,
              within: Sequence[ResultRow], max_accuracy_drop: float, float_row: ResultRow,
              speedups: Sequence[BatchSpeedup], serving_batch_size: int) -> str:
    """The verdict in one sentence, with the best int8 / best float ratio at every timed
    batch size."""
    serving = next((s for s in speedups if s.batch_size == serving_batch_size), None)
    ratios = "; ".join(_ratio_text(s) for s in sorted(
        speedups, key=lambda s: s.batch_size != serving_batch_size) if s.speedup is not None)
    if chosen.method != "float":
        q, f = lat[_key(chosen)], lat[_key(fastest_float)]
        return (f"int8 pays off on this CPU at batch {serving_batch_size}: {_name(chosen)} is "
                f"{f.latency_ms / q.latency_ms:.2f}x float in {fastest_float.runtime} (noise "
                f"±{noise_of(f, q):.0%}); fastest int8 within the budget against the fastest "
                f"float: {ratios}")
    if not within:
        return (f"no int8 variant is within {max_accuracy_drop:g} top-1 points of float "
                f"({float_row.top1:.2f}); shipping float in {chosen.runtime}")
    if serving is None or serving.speedup is None:
        return (f"float and int8 were not both timed at batch {serving_batch_size}, so int8 "
                f"cannot be shown to pay off; shipping float in {chosen.runtime}")
    return (f"int8 does not pay off on this CPU at this size: best int8 "
            f"({serving.int8_variant} in {serving.int8_runtime}) against float in "
            f"{serving.float_runtime}: {ratios}; shipping float in {chosen.runtime}")


def float_baseline_warnings(rows: Sequence[ResultRow], float_loss: float,
                            num_classes: int) -> list[str]:
    """Signs that the float baseline itself is broken, so that no comparison with it means much.

    A mean loss far above chance (ln of the number of classes), or every int8 variant well
    above float's top-1, point to BatchNorm statistics that do not fit the weights (a model
    saved mid-training, or trained with other batch statistics) or to evaluation
    preprocessing (mean/std, resize, input size) unlike the training's.
    """
    out = []
    chance = math.log(max(num_classes, 2))
    if float_loss > 10 * chance:
        out.append(f"the float model's val loss is {float_loss:.1f}, far above chance level "
                   f"({chance:.2f} for {num_classes} classes): its BatchNorm statistics or the "
                   "evaluation preprocessing (mean/std, resize, input size) are likely wrong")
    float_row = next((r for r in rows if r.method == "float"), None)
    int8 = [r for r in rows if r.method != "float"]
    if float_row and int8 and all(r.top1 > float_row.top1 + 10 for r in int8):
        out.append(f"every int8 variant is more than 10 top-1 points above float "
                   f"({float_row.top1:.2f}): the float evaluation is likely broken (BatchNorm "
                   "statistics, or preprocessing that differs from training)")
    return out


def timing_warnings(rows: Sequence[ResultRow], serving_batch_size: int = 1) -> list[str]:
    """A warning naming the pairs whose timing at the serving batch stayed noisy."""
    noisy = [r for r in rows if r.noisy]
    if not noisy:
        return []
    return [f"the batch-{serving_batch_size} timing of "
            f"{', '.join(f'{_name(r)} (noise ±{r.latency_noise:.0%})' for r in noisy)} "
            "stayed noisy after re-measuring (another job is using this machine?): the "
            "selection moves only on margins beyond that noise"]
