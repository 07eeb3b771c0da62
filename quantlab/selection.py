"""Which variant a run ships: the comparison rows and the choice under the accuracy budget.

    rows = comparison(results, latencies)          # one ResultRow per (variant, runtime)
    chosen = select(rows, max_accuracy_drop=1.0)   # fastest int8 pair within the budget
    table = fastest_per_variant(rows)              # each variant in its fastest runtime
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from quantlab import runtimes
from quantlab.timing import Latency, margin_reason, tied_with_fastest
from quantlab.registry import ResultRow, Selection
from quantlab.report import format_ms


def first_batch(latencies: Sequence[Latency]) -> dict[tuple[str, str], Latency]:
    """Each (variant, runtime)'s latency at the smallest batch size measured (batch 1)."""
    smallest = min((lat.batch_size for lat in latencies), default=None)
    return {(x.variant, x.runtime): x for x in latencies if x.batch_size == smallest}


def _key(row: ResultRow) -> tuple[str, str]:
    return row.variant, row.runtime


def comparison(results: Sequence[dict], latencies: Sequence[Latency]) -> list[ResultRow]:
    """A row per (variant, runtime) evaluated; latency and speed-ups at batch 1 (or the
    smallest batch): `speedup` against the fastest float runtime of the run,
    `speedup_vs_torchscript` against the float TorchScript file in torch.

    `results` items carry variant, method, top1, top5, size_bytes and optionally runtime
    (default torch; the format is the runtime's), float_layers, algorithms, agreement, equivalent,
    float_agreement, sqnr_db.
    """
    lat = first_batch(latencies)
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


def fastest_per_variant(rows: Sequence[ResultRow]) -> list[ResultRow]:
    """One row per variant, in its fastest runtime at batch 1 among those whose export did not
    diverge (a variant that was not timed keeps its first row); in the rows' order."""
    out: dict[str, ResultRow] = {}
    for r in rows:
        if r.equivalent is False:
            continue
        best = out.get(r.variant)
        if best is None or (r.latency_ms is not None and
                            (best.latency_ms is None or r.latency_ms < best.latency_ms)):
            out[r.variant] = r
    return list(out.values())


def select(rows: Sequence[ResultRow], max_accuracy_drop: float,
           latencies: Sequence[Latency] = ()) -> Selection:
    """The fastest int8 (variant, runtime) (batch-1 latency) whose top-1 is within the budget
    of float's (the float TorchScript file's, or the first float row's).

    Rows whose export diverged from its TorchScript artifact (`equivalent` False) are never
    chosen. With the measured `latencies`, "fastest" must hold beyond the noise: pairs that
    the fastest does not beat by more than the measured noise (quantlab.timing.tied_with_fastest)
    count as equally fast, and among them the most accurate, then the smallest, is chosen.
    If none is within budget, the most accurate int8 pair, marked as outside the budget.
    """
    floats = [r for r in rows if r.method == "float"]
    float_row = next((r for r in floats if r.runtime == "torch"), floats[0] if floats else None)
    candidates = [r for r in rows if r.method != "float" and r.equivalent is not False]
    if float_row is None or not candidates:
        raise ValueError("selection needs the float row and at least one int8 variant")

    def chosen(row: ResultRow, within: bool, reason: str) -> Selection:
        return Selection(variant=row.variant, runtime=row.runtime, format=row.format,
                         within_budget=within, reason=reason)

    floor = float_row.top1 - max_accuracy_drop
    within = [r for r in candidates if r.top1 >= floor]
    if not within:
        best = max(candidates, key=lambda r: r.top1)
        return chosen(best, False, f"no variant within {max_accuracy_drop:g} top-1 points of "
                      f"float ({float_row.top1:.2f}); chose the most accurate ({best.top1:.2f}, "
                      f"in {best.runtime})")
    prefix = (f"fastest variant within {max_accuracy_drop:g} top-1 points of float "
              f"({{top1:.2f}} vs {float_row.top1:.2f}; ")
    lat = first_batch(latencies)
    timed = [lat[_key(r)] for r in within if _key(r) in lat]
    if len(timed) > 1:
        by_key = {_key(r): r for r in within}
        tied = [by_key[(x.variant, x.runtime)] for x in tied_with_fastest(timed)]
        best = min(tied, key=lambda r: (-r.top1, r.size_bytes))
        others = sorted((x for x in timed if (x.variant, x.runtime) != _key(best)),
                        key=lambda x: x.latency_ms)
        if len(tied) > 1:
            names = ", ".join(f"{r.variant} in {r.runtime}" for r in tied)
            return chosen(best, True, prefix.format(top1=best.top1) + f"{names} are equally "
                          f"fast within the noise: {margin_reason(lat[_key(tied[0])], lat[_key(tied[1])])}; "
                          "chose the most accurate, then the smallest)")
        return chosen(best, True, prefix.format(top1=best.top1) + f"in {best.runtime}: "
                      f"{margin_reason(lat[_key(best)], others[0])} against "
                      f"{others[0].variant} in {others[0].runtime}, at batch 1)")
    best = min(within, key=lambda r: (r.latency_ms if r.latency_ms is not None else float("inf"),
                                      -r.top1))
    return chosen(best, True, prefix.format(top1=best.top1) + f"in {best.runtime}: "
                  f"{format_ms(best.latency_ms)} at batch 1)")


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


def timing_warnings(rows: Sequence[ResultRow]) -> list[str]:
    """A warning naming the variants whose batch-1 timing stayed noisy after re-measuring."""
    noisy = [r for r in rows if r.noisy]
    if not noisy:
        return []
    return [f"the batch-1 timing of {', '.join(f'{r.variant} (noise ±{r.latency_noise:.0%})' for r in noisy)} "
            "stayed noisy after re-measuring (another job is using this machine?): the selection "
            "counts latency differences within the noise as ties"]
