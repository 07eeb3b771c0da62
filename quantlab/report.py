"""The comparison of a run: table rows, the variant chosen under the accuracy budget, the
regression gate's rule, a plot and the markdown report.

    rows = comparison(results, latencies)          # one ResultRow per variant, float first
    chosen = select(rows, max_accuracy_drop=1.0)   # fastest int8 variant within the budget
    verdict = judge(...)                           # may this run replace best-<model>?
    png = plot(rows, qat_epochs)                   # accuracy vs latency, QAT top-1 per epoch
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich.table import Table

from quantlab.bench import Latency
from quantlab.registry import GateVerdict, Manifest, ResultRow, Selection
from quantlab.sensitivity import FallbackStep, SensitivityResult


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
                              float_layers=r.get("float_layers", [])))
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
                                f"{_ms(best.latency_ms)} at batch 1)")
    best = max(candidates, key=lambda r: r.top1)
    return Selection(variant=best.variant, within_budget=False,
                     reason=f"no variant within {max_accuracy_drop:g} top-1 points of float "
                            f"({float_row.top1:.2f}); chose the most accurate ({best.top1:.2f})")


def judge(top1: float, latency_ms: float, previous_top1: float, previous_latency_ms: float, *,
          previous_run_id: str, previous_variant: str, same_dataset: bool,
          max_accuracy_drop: float, max_latency_increase: float,
          latency_attempts: int = 1) -> GateVerdict:
    """The regression gate's rule: fail if top-1 fell more than `max_accuracy_drop` points
    below the previous best, or batch-1 latency rose more than `max_latency_increase`
    (a fraction). Both pairs of numbers must come from the same data and the same machine.
    """
    drop = previous_top1 - top1
    ratio = latency_ms / previous_latency_ms
    problems = []
    if drop > max_accuracy_drop:
        problems.append(f"top-1 {top1:.2f} is {drop:.2f} points below the previous best's "
                        f"{previous_top1:.2f} (allowed: {max_accuracy_drop:g})")
    if ratio > 1.0 + max_latency_increase:
        problems.append(f"batch-1 latency {latency_ms:.3f} ms is {ratio:.2f}x the previous "
                        f"best's {previous_latency_ms:.3f} ms (allowed: "
                        f"{1.0 + max_latency_increase:.2f}x; lowest of {latency_attempts} "
                        "measurements)")
    data = ("same dataset" if same_dataset else
            "the dataset changed since (other fingerprint); both evaluated on this run's val/")
    where = (f"previous best {previous_run_id}/{previous_variant}, measured side by side in "
             f"this run ({data})")
    if problems:
        reason = "regression against the " + where + ": " + "; ".join(problems)
    else:
        reason = (f"no regression against the {where}: top-1 {top1:.2f} vs {previous_top1:.2f}, "
                  f"batch-1 latency {ratio:.2f}x")
    return GateVerdict(passed=not problems, reason=reason, previous_run_id=previous_run_id,
                       previous_variant=previous_variant, same_dataset=same_dataset,
                       previous_top1=previous_top1, top1=top1,
                       previous_latency_ms=previous_latency_ms, latency_ms=latency_ms,
                       latency_attempts=latency_attempts,
                       max_accuracy_drop=max_accuracy_drop,
                       max_latency_increase=max_latency_increase)


def rich_table(rows: Sequence[ResultRow], selected: str | None, title: str = "") -> Table:
    """The comparison as a terminal table (the one `quantlab demo` prints).

    It keeps within an 80-column terminal: two-line headers, and the selected variant marked
    with a `*` that the caption explains.
    """
    table = Table(title=title or None, caption="* selected" if selected else None)
    for col in ("variant", "top-1\n%", "top-5\n%", "size\nMB", "latency\nms", "speed\nup",
                "float\nlayers"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for r, cells in zip(rows, table_rows(rows, None)):
        cells["variant"] += " *" if r.variant == selected else ""
        table.add_row(*cells.values(), style="bold" if r.variant == selected else None)
    return table


def dict_table(rows: Sequence[dict[str, str]], title: str = "", num_left: int = 1) -> Table:
    """Formatted rows as a terminal table; the first `num_left` columns are left-aligned."""
    table = Table(title=title or None)
    for i, col in enumerate(rows[0] if rows else ()):
        table.add_column(col, justify="left" if i < num_left else "right", no_wrap=i < num_left)
    for r in rows:
        table.add_row(*[str(v) for v in r.values()])
    return table


def epochs_table(qat_epochs: Sequence[dict], title: str = "") -> Table:
    """A run's `qat_epochs` rows as a terminal table (what `quantlab qat` prints)."""
    table = Table(title=title or None)
    for col in ("epoch", "world size", "train loss", "train top-1 %", "int8 top-1 %", "BN frozen",
                "observers frozen", "img/s"):
        table.add_column(col, justify="right")
    for e in sorted(qat_epochs, key=lambda e: e["epoch"]):
        table.add_row(str(e["epoch"]), str(e["world_size"]), f"{e['train_loss']:.4f}",
                      f"{e['train_top1']:.2f}", f"{e['eval_top1']:.2f}", "yes" if e["bn_frozen"] else "no",
                      "yes" if e["observer_frozen"] else "no", f"{e['images_per_sec']:.1f}")
    return table


def table_rows(rows: Sequence[ResultRow], selected: str | None) -> list[dict[str, str]]:
    """Formatted rows (strings), shared by the terminal table, markdown and Prefect artifacts."""
    out = []
    for r in rows:
        out.append({
            "variant": r.variant + (" (selected)" if r.variant == selected else ""),
            "top-1 %": f"{r.top1:.2f}",
            "top-5 %": f"{r.top5:.2f}",
            "size MB": f"{r.size_bytes / 1e6:.3f}",
            "latency ms": _ms(r.latency_ms).removesuffix(" ms"),
            "speed-up": f"{r.speedup:.2f}x" if r.speedup else "-",
            "float layers": "all" if r.method == "float" else str(len(r.float_layers)),
        })
    return out


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: Sequence[ResultRow], qat_epochs: Sequence[dict]) -> bytes:
    """PNG: top-1 against batch-1 latency per variant, and the int8 top-1 of each QAT epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        if r.latency_ms is None:
            continue
        ax1.scatter(r.latency_ms, r.top1, s=60, marker="s" if r.method == "float" else "o")
        ax1.annotate(r.variant, (r.latency_ms, r.top1), textcoords="offset points", xytext=(5, 5))
    ax1.set_xlabel("latency, batch 1 (ms)")
    ax1.set_ylabel("top-1 (%)")
    ax1.set_title("accuracy against latency")
    ax1.grid(alpha=0.3)
    epochs = sorted(qat_epochs, key=lambda e: e["epoch"])
    if epochs:
        ax2.plot([e["epoch"] for e in epochs], [e["eval_top1"] for e in epochs], marker="o",
                 label="int8 val top-1")
        float_row = next((r for r in rows if r.method == "float"), None)
        if float_row:
            ax2.axhline(float_row.top1, color="gray", linestyle="--", label="float")
        ax2.set_xticks([e["epoch"] for e in epochs])
        ax2.legend()
    ax2.set_xlabel("QAT epoch")
    ax2.set_ylabel("top-1 (%)")
    ax2.set_title("QAT: converted int8 model per epoch")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def sensitivity_rows(result: SensitivityResult) -> list[dict[str, str]]:
    """The ranked sensitivity table, formatted (most sensitive first)."""
    return [{"rank": str(r.rank), "layer": f"`{r.layer}`", "op": r.op_type,
             "params": f"{r.num_params:,}", "top-1 drop": f"{r.top1_drop:.2f}",
             "layer SQNR dB": f"{r.layer_sqnr_db:.1f}", "output SQNR dB": f"{r.output_sqnr_db:.1f}"}
            for r in result.layers]


def markdown_report(manifest: Manifest, links: dict[str, str], plot_image: str | None = None,
                    sensitivity: SensitivityResult | None = None,
                    fallback: tuple[str, Sequence[FallbackStep]] | None = None) -> str:
    """The run's report: results, the choice and why, the regression gate, the per-layer
    sensitivity and the float fallback's search, config, dataset, where artifacts live.

    `links` maps variants (and plot, markdown, manifest) to where they are stored;
    `plot_image` is the plot's image source when it differs from its link (a data: URI makes
    the report self-contained, e.g. in the Prefect UI, which cannot read the store).
    """
    rows = table_rows(manifest.results, manifest.selected.variant)
    budget = "within" if manifest.selected.within_budget else "OUTSIDE"
    lines = [
        f"# quantlab run `{manifest.run_id}`",
        "",
        f"Model **{manifest.model}**, input {manifest.input_size}x{manifest.input_size}, "
        f"finished {manifest.finished_at:%Y-%m-%d %H:%M:%S} UTC.",
        "",
        markdown_table(rows),
        "",
        f"**Selected: `{manifest.selected.variant}`** ({budget} the budget of "
        f"{manifest.max_accuracy_drop:g} top-1 points): {manifest.selected.reason}.",
        "",
    ]
    if manifest.gate is not None:
        verdict = "passed" if manifest.gate.passed else "FAILED: `best` was not moved"
        lines += [f"**Regression gate {verdict}**: {manifest.gate.reason}.", ""]
    if plot_image or "plot" in links:
        lines += [f"![accuracy against latency; QAT top-1 per epoch]({plot_image or links['plot']})", ""]
    if sensitivity is not None:
        lines += [f"## Per-layer sensitivity of `{sensitivity.variant}`", "",
                  f"Each layer quantized alone, the rest in float, on {sensitivity.num_images} "
                  f"calibration images (float top-1 there: {sensitivity.float_top1:.2f}); most "
                  "sensitive first. Method: quantlab/sensitivity.py.", "",
                  markdown_table(sensitivity_rows(sensitivity)), ""]
    if fallback is not None:
        name, steps = fallback
        kept = next(r for r in manifest.results if r.variant == name).float_layers
        lines += [f"## Float fallback `{name}`", "",
                  f"Kept in float: {', '.join(f'`{n}`' for n in kept) or 'none'}. Greedy search, "
                  "most sensitive layer first, until val top-1 is within the budget:", "",
                  markdown_table([{"float layers": str(s.num_float_layers),
                                   "added": f"`{s.added}`" if s.added else "-",
                                   "top-1 %": f"{s.top1:.2f}",
                                   "within budget": "yes" if s.within_budget else "no"}
                                  for s in steps]), ""]
    lines += ["## Artifacts", ""]
    if "manifest" in links:
        lines += [f"In `{links['manifest'].rsplit('/', 1)[0]}/`:", ""]
    lines += ["| variant | sha256 | bytes | location |", "|---|---|---|---|"]
    for a in manifest.artifacts:
        lines.append(f"| {a.variant} | `{a.sha256[:16]}…` | {a.bytes:,} | "
                     f"[{a.path}]({links.get(a.variant, a.path)}) |")
    lines += [""] + [f"- {label}: [{links[name]}]({links[name]})"
                     for name, label in (("plot", "plot (PNG)"), ("markdown", "this report"),
                                         ("manifest", "manifest (sha256 of every artifact)"))
                     if name in links]
    lines += ["", f"Fetch a model, verified: `quantlab pull {manifest.run_id} --variant best "
                  f"--store {manifest.config.get('store', '<store>')}`"]
    lines += ["", "## Dataset", "",
              f"`{manifest.dataset.uri}`: {len(manifest.dataset.classes)} classes, "
              f"{manifest.dataset.num_train} train / {manifest.dataset.num_val} val images, "
              f"fingerprint `{manifest.dataset.fingerprint[:16]}…`", "",
              "## Versions", "", ", ".join(f"{k} {v}" for k, v in manifest.versions.items()), "",
              "## Config", "", "```json", _json(manifest.config), "```"]
    return "\n".join(lines)


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def _ms(ms: float | None) -> str:
    return f"{ms:.3f} ms" if ms is not None else "-"
