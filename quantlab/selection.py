"""Which variant a run ships: the comparison rows and the choice under the accuracy budget.

    rows = comparison(results, latencies)          # one ResultRow per variant, float first
    chosen = select(rows, max_accuracy_drop=1.0)   # fastest int8 variant within the budget
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from quantlab.bench import Latency
from quantlab.registry import ResultRow, Selection
from quantlab.report import format_ms


def comparison(results: Sequence[dict], latencies: Sequence[Latency]) -> list[ResultRow]:
    """Rows for float and every int8 variant; latency and speed-up at batch 1 (or the smallest).

    `results` items carry variant, method, top1, top5, size_bytes (and optional float_layers).
    """
    smallest = min((lat.batch_size for lat in latencies), default=None)
    lat = {x.variant: x.latency_ms for x in latencies if x.batch_size == smallest}
    float_ms = lat.get("float")
    rows = []
    for r in results:
        ms = lat.get(r["variant"])
        rows.append(ResultRow(variant=r["variant"], method=r["method"], top1=r["top1"],
                              top5=r["top5"], size_bytes=r["size_bytes"], latency_ms=ms,
                              speedup=(float_ms / ms) if (ms and float_ms) else None,
                              float_layers=r.get("float_layers", []),
                              algorithms=r.get("algorithms", "")))
    return sorted(rows, key=lambda row: ["float", "ptq", "qat"].index(row.method))  # stable


def select(rows: Sequence[ResultRow], max_accuracy_drop: float) -> Selection:
    """The fastest int8 variant (batch-1 latency) whose top-1 is within the budget of float.

    If none is within budget, the most accurate int8 variant, marked as outside the budget.
    """
    float_row = next((r for r in rows if r.method == "float"), None)
    candidates = [r for r in rows if r.method != "float"]
    if float_row is None or not candidates:
        raise ValueError("selection needs the float row and at least one int8 variant")
    floor = float_row.top1 - max_accuracy_drop
    within = [r for r in candidates if r.top1 >= floor]
    if within:
        best = min(within, key=lambda r: (r.latency_ms if r.latency_ms is not None else float("inf"),
                                          -r.top1))
        return Selection(variant=best.variant, within_budget=True,
                         reason=f"fastest variant within {max_accuracy_drop:g} top-1 points of "
                                f"float ({best.top1:.2f} vs {float_row.top1:.2f}; "
                                f"{format_ms(best.latency_ms)} at batch 1)")
    best = max(candidates, key=lambda r: r.top1)
    return Selection(variant=best.variant, within_budget=False,
                     reason=f"no variant within {max_accuracy_drop:g} top-1 points of float "
                            f"({float_row.top1:.2f}); chose the most accurate ({best.top1:.2f})")


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
