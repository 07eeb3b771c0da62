"""Which variant a run ships: the comparison rows and the choice under the accuracy budget.

    rows = comparison(results, latencies)          # one ResultRow per variant, float first
    chosen = select(rows, max_accuracy_drop=1.0)   # fastest int8 variant within the budget
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from quantlab.timing import Latency, margin_reason, tied_with_fastest
from quantlab.registry import ResultRow, Selection
from quantlab.report import format_ms


def first_batch(latencies: Sequence[Latency]) -> dict[str, Latency]:
    """Each variant's latency at the smallest batch size measured (batch 1), by variant."""
    smallest = min((lat.batch_size for lat in latencies), default=None)
    return {x.variant: x for x in latencies if x.batch_size == smallest}


def comparison(results: Sequence[dict], latencies: Sequence[Latency]) -> list[ResultRow]:
    """Rows for float and every int8 variant; latency and speed-up at batch 1 (or the smallest).

    `results` items carry variant, method, top1, top5, size_bytes (and optional float_layers).
    """
    lat = first_batch(latencies)
    float_ms = lat["float"].latency_ms if "float" in lat else None
    rows = []
    for r in results:
        x = lat.get(r["variant"])
        ms = x.latency_ms if x else None
        rows.append(ResultRow(variant=r["variant"], method=r["method"], top1=r["top1"],
                              top5=r["top5"], size_bytes=r["size_bytes"], latency_ms=ms,
                              speedup=(float_ms / ms) if (ms and float_ms) else None,
                              float_layers=r.get("float_layers", []),
                              algorithms=r.get("algorithms", ""),
                              latency_noise=x.noise if x else None,
                              noisy=bool(x and x.noisy)))
    return sorted(rows, key=lambda row: ["float", "ptq", "qat"].index(row.method))  # stable


def select(rows: Sequence[ResultRow], max_accuracy_drop: float,
           latencies: Sequence[Latency] = ()) -> Selection:
    """The fastest int8 variant (batch-1 latency) whose top-1 is within the budget of float.

    With the measured `latencies`, "fastest" must hold beyond the noise: variants that the
    fastest does not beat by more than the measured noise (quantlab.timing.tied_with_fastest)
    count as equally fast, and among them the most accurate, then the smallest, is chosen.
    If none is within budget, the most accurate int8 variant, marked as outside the budget.
    """
    float_row = next((r for r in rows if r.method == "float"), None)
    candidates = [r for r in rows if r.method != "float"]
    if float_row is None or not candidates:
        raise ValueError("selection needs the float row and at least one int8 variant")
    floor = float_row.top1 - max_accuracy_drop
    within = [r for r in candidates if r.top1 >= floor]
    if not within:
        best = max(candidates, key=lambda r: r.top1)
        return Selection(variant=best.variant, within_budget=False,
                         reason=f"no variant within {max_accuracy_drop:g} top-1 points of float "
                                f"({float_row.top1:.2f}); chose the most accurate ({best.top1:.2f})")
    prefix = (f"fastest variant within {max_accuracy_drop:g} top-1 points of float "
              f"({{top1:.2f}} vs {float_row.top1:.2f}; ")
    lat = first_batch(latencies)
    timed = [lat[r.variant] for r in within if r.variant in lat]
    if len(timed) > 1:
        by_name = {r.variant: r for r in within}
        tied = [by_name[x.variant] for x in tied_with_fastest(timed)]
        best = min(tied, key=lambda r: (-r.top1, r.size_bytes))
        others = sorted((x for x in timed if x.variant != best.variant),
                        key=lambda x: x.latency_ms)
        if len(tied) > 1:
            names = ", ".join(r.variant for r in tied)
            return Selection(variant=best.variant, within_budget=True, reason=(
                prefix.format(top1=best.top1) + f"{names} are equally fast within the noise: "
                f"{margin_reason(lat[tied[0].variant], lat[tied[1].variant])}; chose the most "
                "accurate, then the smallest)"))
        return Selection(variant=best.variant, within_budget=True, reason=(
            prefix.format(top1=best.top1) + f"{margin_reason(lat[best.variant], others[0])} "
            f"against {others[0].variant}, at batch 1)"))
    best = min(within, key=lambda r: (r.latency_ms if r.latency_ms is not None else float("inf"),
                                      -r.top1))
    return Selection(variant=best.variant, within_budget=True,
                     reason=prefix.format(top1=best.top1) + f"{format_ms(best.latency_ms)} at batch 1)")


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
