"""Rendering of a run: terminal tables, markdown, the plot and the report.

    table = rich_table(rows, selected="ptq-x86")    # what `quantlab demo` prints
    png = plot(rows, qat_epochs)                    # accuracy vs latency, QAT top-1 per epoch
    md = markdown_report(manifest, links)           # the run's report

What is selected and whether a run passes the gate is decided elsewhere (quantlab.selection,
quantlab.gate); this module only shows it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from rich import box
from rich.table import Table

from quantlab.registry import Manifest, ResultRow, Selection
from quantlab.sensitivity import FallbackStep, SensitivityResult


def rich_table(rows: Sequence[ResultRow], selected: str | None, title: str = "") -> Table:
    """The comparison as a terminal table (the one `quantlab demo` prints).

    It keeps within an 80-column terminal: two-line headers, the selected variant marked with
    a `*` that the caption explains; top-5, algorithms, backend, format and float layers are in the
    report (the CLI prints the fallback's float layers on their own line). The runtime says
    which stack made a variant: `aoti` runs PT2E packages, the others eager mode's artifacts.
    """
    float_rt = next((r.runtime for r in rows if r.method == "float"), None)
    notes = (["* selected"] if selected else []) + (
        ["! noisy timing"] if any(r.noisy for r in rows) else []) + (
        [f"speed-up against float in {float_rt}, the fastest float runtime"] if float_rt else []) + (
        ["agree: % of val images with float's top-1, SQNR: logits against float's"])
    table = Table(title=title or None, caption=", ".join(notes) or None, box=box.SIMPLE_HEAD,
                  padding=(0, 1), collapse_padding=True, pad_edge=False)
    for col in ("variant", "runtime", "top-1\n%", "agree\n%", "SQNR\ndB", "size\nMB",
                "latency\nms", "speed\nup"):
        table.add_column(col, justify="left" if col in ("variant", "runtime") else "right",
                         no_wrap=True)
    for r, cells in zip(rows, table_rows(rows, None)):
        for extra in ("backend", "format", "algorithms", "noise", "top-5 %", "vs export",
                      "vs TorchScript float", "float layers"):
            del cells[extra]  # in the report and UI; the terminal keeps to 80 columns
        cells["variant"] += " *" if r.variant == selected else ""
        table.add_row(*cells.values(), style="bold" if r.variant == selected else None)
    return table


def verdict_lines(selection: Selection) -> list[str]:
    """The verdict for people: its sentence, the CPU, and the int8 / float ratio at each timed
    batch size (what the terminal, the report and the Prefect UI show)."""
    v = selection.verdict
    if v is None:
        return []
    lines = [f"verdict at serving batch {v.serving_batch_size}: {v.sentence}"
             + (" (the timing stayed noisy: re-measure on a quiet machine)" if v.noisy else "")]
    if v.cpu:
        lines.append(f"CPU: {v.cpu}")
    for s in v.speedups:
        if s.speedup is None:
            lines.append(f"batch {s.batch_size}: no int8 pair within the budget was timed")
            continue
        beyond = "faster beyond the noise" if s.beyond_noise else "not faster beyond the noise"
        noise = f"noise ±{s.noise:.0%}" if s.noise is not None else "noise unknown"
        lines.append(f"batch {s.batch_size}: best int8 {s.int8_variant} in {s.int8_runtime} "
                     f"{s.int8_ms:.3f} ms vs float in {s.float_runtime} {s.float_ms:.3f} ms: "
                     f"{s.speedup:.2f}x ({noise}; {beyond}{', noisy' if s.noisy else ''})")
    return lines


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
                "observers frozen", "img/s"):  # of one QAT variant (pipeline.qat_epochs)
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
            "runtime": r.runtime,
            "backend": r.backend,
            "format": r.format,
            "algorithms": r.algorithms or "-",
            "top-1 %": f"{r.top1:.2f}",
            "top-5 %": percent(r.top5),
            "agree %": percent(r.float_agreement) if r.method != "float" else "-",
            "vs export": ("-" if r.agreement is None else
                          f"{r.agreement:.2f}" + ("" if r.equivalent is not False else " DIVERGED")),
            "SQNR dB": f"{r.sqnr_db:.1f}" if r.sqnr_db is not None else "-",
            "size MB": f"{r.size_bytes / 1e6:.3f}",
            "latency ms": format_ms(r.latency_ms).removesuffix(" ms") + (" !" if r.noisy else ""),
            "noise": f"±{r.latency_noise:.0%}" if r.latency_noise is not None else "-",
            "speed-up": f"{r.speedup:.2f}x" if r.speedup else "-",
            "vs TorchScript float": (f"{r.speedup_vs_torchscript:.2f}x"
                                     if r.speedup_vs_torchscript else "-"),
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
    """PNG: top-1 against latency (serving batch) per variant, and the int8 top-1 of each QAT
    epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        if r.latency_ms is None:
            continue
        ax1.scatter(r.latency_ms, r.top1, s=60, marker="s" if r.method == "float" else "o")
        ax1.annotate(r.variant, (r.latency_ms, r.top1), textcoords="offset points", xytext=(5, 5))
    ax1.set_xlabel("latency at the serving batch size (ms)")
    ax1.set_ylabel("top-1 (%)")
    ax1.set_title("accuracy against latency")
    ax1.grid(alpha=0.3)
    by_variant: dict[str, list[dict]] = {}
    for e in sorted(qat_epochs, key=lambda e: e["epoch"]):
        by_variant.setdefault(e.get("variant") or "qat", []).append(e)
    for variant, epochs in by_variant.items():
        ax2.plot([e["epoch"] for e in epochs], [e["eval_top1"] for e in epochs], marker="o",
                 label=f"{variant}: int8 val top-1")
    if by_variant:
        float_row = next((r for r in rows if r.method == "float"), None)
        if float_row:
            ax2.axhline(float_row.top1, color="gray", linestyle="--", label="float")
        ax2.set_xticks(sorted({e["epoch"] for e in qat_epochs}))
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
        "Each variant in its fastest runtime. agree %: val images with float's top-1 class; "
        "vs export: with the variant's own TorchScript artifact; SQNR: logits against float's; "
        "latency at the serving batch size; speed-up: against float in "
        f"{manifest.float_runtime or 'torch'}, the run's fastest float runtime. Every (variant, "
        "runtime) pair is under \"Runtimes\" below.",
        "",
        f"**Selected: `{manifest.selected.variant}` in {manifest.selected.runtime}** "
        f"({budget} the budget of {manifest.max_accuracy_drop:g} top-1 points): "
        f"{manifest.selected.reason}.",
        "",
    ]
    verdict = verdict_lines(manifest.selected)
    if verdict:
        lines += [f"**Verdict**: {verdict[0].split(': ', 1)[1]}", ""]
        lines += [f"- {line}" for line in verdict[1:]] + [""]
    if manifest.selected.load_snippet:
        lines += ["```python", manifest.selected.load_snippet, "```", ""]
    lines += [f"**Warning**: {w}." for w in manifest.warnings] + ([""] if manifest.warnings else [])
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
        if not any(s.within_budget for s in steps):
            lines += [f"No step reached the budget; the search stopped after "
                      f"{steps[-1].num_float_layers} float layers, and the fallback keeps the "
                      f"fewest ({len(kept)}) that reached its best top-1, "
                      f"{max(s.top1 for s in steps):.2f}: more float layers that gain nothing "
                      "only cost speed and size.", ""]
    if manifest.runtime_results:
        lines += ["## Runtimes", "", "Every (variant, runtime) pair evaluated on val/ and timed "
                  "side by side in one process.", "",
                  markdown_table(table_rows(manifest.runtime_results, None)), ""]
    lines += ["## Artifacts", ""]
    if "manifest" in links:
        lines += [f"In `{links['manifest'].rsplit('/', 1)[0]}/`:", ""]
    lines += ["| variant | format | sha256 | bytes | location |", "|---|---|---|---|---|"]
    for a in manifest.artifacts + manifest.exports:
        # a variant's own artifact (TorchScript or AOTI) is linked by its name, exports by format
        own = a in manifest.artifacts
        link = links.get(a.variant if own else f"{a.variant} ({a.format})", a.path)
        lines.append(f"| {a.variant} | {a.format} | `{a.sha256[:16]}…` | {a.size_bytes:,} | "
                     f"[{a.path}]({link}) |")
    lines += [""] + [f"- {label}: [{links[name]}]({links[name]})"
                     for name, label in (("plot", "plot (PNG)"), ("markdown", "this report"),
                                         ("manifest", "manifest (sha256 of every artifact)"))
                     if name in links]
    lines += ["", f"Fetch a model, verified: `quantlab pull {manifest.run_id} --variant best "
                  f"--store {manifest.config.get('store', '<store>')}` (the selected format, "
                  f"{manifest.selected.format}; `--format torchscript|onnx|openvino` for another)"]
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


def data_uri(png: bytes) -> str:
    """A PNG as a data: URI, so that a report shows it where the store cannot be read."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def percent(value: float | None) -> str:
    """An accuracy for people: '97.77', or '-' where there is none (top-5 of <= 5 classes)."""
    return "-" if value is None else f"{value:.2f}"


def format_ms(ms: float | None) -> str:
    """A latency for people: '0.378 ms', or '-' when there is none."""
    return f"{ms:.3f} ms" if ms is not None else "-"
