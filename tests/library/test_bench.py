"""`quantlab bench` on a tiny model: it builds, times, profiles, stores and prints (no timing asserted)."""

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys

from quantlab import benchsuite, metrics
from quantlab.bench import cpu_model_and_flags
from quantlab.store import Store

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_command_runs_stores_and_prints(tmp_path):
    store = str(tmp_path / "store")
    out = subprocess.run(
        [sys.executable, "-m", "quantlab_cli.app", "bench", "--input-size", "32", "--num-classes", "3",
         "--model-arg", "width_mult=0.25", "--threads", "1", "--batch-sizes", "1,2",
         "--variants", "ptq-x86", "--engines", "x86", "--optimisations", "freeze,optimize_for_inference",
         "--warmup", "1", "--iterations", "10", "--store", store],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"})
    assert out.returncode == 0, out.stderr
    assert "random weights" in out.stdout and "ptq-x86" in out.stdout
    assert "torch-int8 x86 freeze" in out.stdout and "vs fastest plain-torch int8" in out.stdout

    rows = metrics.read_rows(Store(store), "benchmarks")
    # quantlab: float, ptq-x86; plain: float and int8 x {freeze, ofi}; x 2 batch sizes
    assert len(rows) == 6 * 2 and len({r["run_id"] for r in rows}) == 1
    by = {(r["variant"], r["optimisation"], r["batch_size"]): r for r in rows}
    assert {r["source"] for r in rows} == {"quantlab", "torch"}
    assert all(r["weights"] == "random" and r["calibration"] == "random" for r in rows)
    assert all(r["cpu"] and "[" in r["cpu"] and r["torch_version"] for r in rows)
    flags = cpu_model_and_flags()[1]
    assert all((r["cpu_avx2"], r["cpu_avx512_vnni"], r["cpu_amx"]) == tuple(
        f in flags for f in ("avx2", "avx512_vnni", "amx_int8")) for r in rows)
    assert "int8 ISA flags" in out.stdout
    assert all(r["latency_ms_p90"] >= r["latency_ms"] >= r["latency_ms_min"] > 0 for r in rows)
    assert {r["engine"] for r in rows if "int8" in r["variant"] or "ptq" in r["variant"]} == {"x86"}
    # A float model after optimize_for_inference does not survive save/load: timed in memory.
    for r in rows:
        if (r["variant"], r["optimisation"]) == ("torch-float", "optimize_for_inference"):
            assert r["size_bytes"] is None and r["load_ms"] is None and r["peak_rss_mb"] is None
        else:
            assert r["size_bytes"] > 0 and r["load_ms"] > 0
            assert r["peak_rss_mb"] >= r["peak_rss_delta_mb"] > 0
    assert by[("ptq-x86", "freeze", 1)]["size_bytes"] < by[("float", "freeze", 1)]["size_bytes"] / 2

    figures = benchsuite.summarize(rows)
    assert {(f.variant, f.batch_size) for f in figures} == {
        ("ptq-x86", bs) for bs in (1, 2)}
    assert all(f.reference.startswith("torch-int8 x86") and f.vs_reference > 0 for f in figures)


def test_summary_ratios():
    def row(variant, source, ms, size=None, engine="", optimisation="script"):
        return {"variant": variant, "source": source, "engine": engine, "optimisation": optimisation,
                "channels_last": False, "num_threads": 2, "batch_size": 1, "latency_ms": ms,
                "size_bytes": size}

    rows = [row("float", "quantlab", 20.0, 1000), row("ptq-x86", "quantlab", 5.0, 260, "x86"),
            row("torch-float", "torch", 16.0, optimisation="optimize_for_inference"),
            row("torch-int8", "torch", 4.0, engine="onednn", optimisation="freeze"),
            row("torch-int8", "torch", 6.0, engine="x86")]
    (f,) = benchsuite.summarize(rows)
    assert (f.speedup, f.speedup_vs_best_float, f.vs_reference, f.size_ratio) == (4.0, 3.2, 1.25, 0.26)
    assert f.best_float == "torch-float ofi" and f.reference == "torch-int8 onednn freeze"


def test_reference_is_independent_of_quantlab():
    tree = ast.parse((ROOT / "quantlab" / "reference.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported and all(m.split(".")[0] in ("torch", "copy", "collections", "__future__")
                            for m in imported), imported


def test_report_finds_every_bench_script():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    found = report.contributors()
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"report", "_common"}
    assert set(found) == scripts and list(found)[:3] == report.SECTIONS
    assert found["int8_speed"] is None and found["staging"].startswith("Staging throughput")
    assert "| CPU |" in report.machine() and "avx512_vnni" in report.machine()
