"""int8 against float, and quantlab's artifact against plain torch: `quantlab bench` with defaults.

    quantlab bench                                      # the figures, printed and stored
    python bench/report.py --only int8_speed            # its BENCHMARKS.md section

MobileNetV2 at 224x224, 1 and 2 threads, batch 1 and 8: quantlab's float and PTQ artifacts
(built by the pipeline's functions; int8 loaded under x86 and onednn) next to plain-torch
float and int8 (freeze and optimize_for_inference, engines x86 and onednn), timed interleaved
in one fresh torch-only process (models loaded afresh per thread count and batch size). See
quantlab/bench.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt_x, run_quantlab_bench  # noqa: E402
from quantlab import bench  # noqa: E402
from quantlab.report import markdown_table  # noqa: E402

ARGS: list[str] = []  # the defaults: mobilenet_v2, 224, threads 1,2, batch sizes 1,8


def markdown_section() -> str:
    """BENCHMARKS.md's section (runs the benchmark)."""
    command, rows = run_quantlab_bench(ARGS)
    figures = bench.summarize(rows)
    head = next((f for f in figures if (f.variant, f.engine, f.num_threads, f.batch_size)
                 == ("ptq-x86", "x86", 2, 1)), figures[0])
    lines = [
        "## int8 vs float, and quantlab vs plain torch", "",
        f"Command: `{command}` (about {len(rows)} timed rows; random weights and random "
        "calibration inputs: timing does not depend on the values).", "",
        f"Headline, {head.variant} at batch {head.batch_size}, {head.num_threads} threads:", "",
        f"- int8 vs float TorchScript (the pipeline's float artifact): **{fmt_x(head.speedup)}** "
        f"({head.float_ms:.2f} ms -> {head.latency_ms:.2f} ms; the issue's target: at least 5x, "
        f"{'met' if head.speedup >= 5 else 'not met'} on this CPU)",
        f"- int8 vs the fastest float of the run ({head.best_float}): "
        f"**{fmt_x(head.speedup_vs_best_float)}**",
        f"- quantlab's artifact / fastest plain-torch int8 ({head.reference}): "
        f"**{head.vs_reference:.3f}** (target: at most 1.05, "
        f"{'met' if head.vs_reference <= 1.05 else 'not met'})",
        f"- size: int8 file is **{100 * head.size_ratio:.1f}%** of float (target: at most 27%, "
        f"{'met' if head.size_ratio <= 0.27 else 'not met'})", "",
        *[f"At batch {f.batch_size}, {f.num_threads} threads, {f.variant} loaded under {f.engine}: "
          f"{fmt_x(f.speedup)} vs float, {fmt_x(f.speedup_vs_best_float)} vs the fastest float, "
          f"{f.vs_reference:.3f} of the fastest plain-torch int8 ({f.reference})."
          for f in figures if f.variant == head.variant and f.num_threads == head.num_threads
          and f.batch_size != head.batch_size], "",
        "All settings (speed-ups against quantlab's float artifact; 'fastest float' is the "
        "fastest float model of the run, the fair baseline):", "",
        markdown_table(bench.formatted_figures(figures)), "",
        "Every model timed (load time: median `torch.jit.load`, and peak RSS while loading "
        "and running, both in a fresh torch-only process at the largest thread count):", "",
        markdown_table(bench.formatted_rows(rows)),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_section())
