"""What each optimisation gains or loses: freeze, optimize_for_inference, channels-last, engines.

    python bench/report.py --only int8_options          # its BENCHMARKS.md section
    quantlab bench <ARGS below>                          # the same run, printed

One `quantlab bench` run (batch 1, 2 threads: the headline setting) times plain-torch
MobileNetV2 (224x224) float and int8 under every
combination of engine (x86, onednn, fbgemm), optimisation (script, freeze,
optimize_for_inference) and memory layout (contiguous, channels-last), interleaved in one
process. Each option's effect is read off against the baseline that differs from it in that
option only (int8: x86, script, contiguous; float: script, contiguous); gain = baseline
latency / option latency, so above 1 is faster. Thread settings (1 vs 2 threads) are in the
int8_speed section.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt_x, run_quantlab_bench  # noqa: E402
from quantlab import bench  # noqa: E402
from quantlab.report import markdown_table  # noqa: E402

ARGS = ["--threads", "2", "--batch-sizes", "1", "--variants", "ptq-x86", "--iterations", "60",
        "--engines", "x86,onednn,fbgemm", "--optimisations", "script,freeze,optimize_for_inference",
        "--channels-last"]
BASE = {"optimisation": "script", "channels_last": False}
OPTIONS = [  # (what, variant, change from the baseline)
    ("torch.jit.freeze", "torch-int8", {"optimisation": "freeze"}),
    ("optimize_for_inference", "torch-int8", {"optimisation": "optimize_for_inference"}),
    ("channels-last input", "torch-int8", {"channels_last": True}),
    ("onednn engine (vs x86)", "torch-int8", {"engine": "onednn"}),
    ("fbgemm engine (vs x86)", "torch-int8", {"engine": "fbgemm"}),
    ("torch.jit.freeze", "torch-float", {"optimisation": "freeze"}),
    ("optimize_for_inference", "torch-float", {"optimisation": "optimize_for_inference"}),
    ("channels-last model and input", "torch-float", {"channels_last": True}),
]


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def effects(rows: list[dict]) -> list[dict[str, str]]:
    """One line per option and batch size: latency gain and load-time gain over the baseline."""
    out = []
    for (threads, bs) in sorted({(r["num_threads"], r["batch_size"]) for r in rows}):
        here = [r for r in rows if (r["num_threads"], r["batch_size"]) == (threads, bs)]
        for what, variant, change in OPTIONS:
            base = {"variant": variant, "engine": "x86" if variant == "torch-int8" else "", **BASE}
            a, b = _find(here, **base), _find(here, **{**base, **change})
            if a is None or b is None:
                continue
            load = (a["load_ms"] / b["load_ms"]) if a["load_ms"] and b["load_ms"] else None
            out.append({"option": what, "model": "int8" if variant == "torch-int8" else "float",
                        "threads": str(threads), "batch": str(bs),
                        "baseline ms": f"{a['latency_ms']:.2f}", "with option ms": f"{b['latency_ms']:.2f}",
                        "latency gain": fmt_x(a["latency_ms"] / b["latency_ms"]),
                        "load-time gain": fmt_x(load) if load else "- (not reloadable)"})
    return out


def markdown_section() -> str:
    """BENCHMARKS.md's section (runs the benchmark)."""
    command, rows = run_quantlab_bench(ARGS)
    return "\n".join([
        "## Optimisations: what each gains or loses", "",
        f"Command: `{command}`", "",
        "Gain = baseline latency / latency with the option (above 1 is faster). Baselines: "
        "int8 = plain-torch x86, scripted, contiguous input; float = scripted, contiguous. "
        "A float model after optimize_for_inference cannot be saved and reloaded in torch 2.14, "
        "so the timing process optimises it after loading the scripted file; it has no size or "
        "load time.", "",
        markdown_table(effects(rows)), "",
        "quantlab's ptq-x86 artifact in the same run:", "",
        markdown_table(bench.formatted_figures(bench.summarize(rows))), "",
    ]) + "\n"


if __name__ == "__main__":
    print(markdown_section())
