"""The `quantlab` command as a user runs it, on a completed run (bad input: test_bad_input.py)."""

import os
import subprocess
import sys

import pytest

from tests.support import run_quantlab as quantlab


def test_runs_show_and_pull(completed_run, tmp_path):
    cfg, result = completed_run
    out = quantlab("runs", "--store", cfg.store, columns=80)
    assert out.returncode == 0, out.stderr
    # whole, even in a narrow terminal: users copy run ids into `show` and `pull`
    assert result.manifest.run_id in out.stdout and "mobilenet_v2" in out.stdout
    out = quantlab("show", "latest", "--store", cfg.store)
    assert out.returncode == 0 and result.manifest.selected.variant in out.stdout and "sha256" in out.stdout
    out = quantlab("pull", "latest", "--variant", "best", "--dest", str(tmp_path / "m.pt"),
                   "--store", cfg.store)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.pt").stat().st_size > 0


def test_output_to_a_pipe_or_file_keeps_tables_whole(completed_run):
    cfg, result = completed_run
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-m", "quantlab_cli.app", "show", "latest", "--store",
                          cfg.store], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "\u2026" not in out.stdout.split("\nselected ")[0]  # the table: no cell cut short
    assert "latency" in out.stdout and result.manifest.selected.variant in out.stdout
    # the verdict, whole: its CPU flags ("[avx2,...]") are text, not terminal markup
    verdict = result.manifest.selected.verdict
    assert f"verdict at serving batch 1: {verdict.sentence}" in " ".join(out.stdout.split())
    assert f"CPU: {verdict.cpu}\n" in out.stdout and verdict.cpu.endswith("]")


def test_pull_best_of_a_run_outside_its_budget_warns(completed_run, tmp_path):
    from quantlab.store import Store

    cfg, result = completed_run
    store, rel = Store(cfg.store), f"runs/{result.manifest.run_id}/manifest.json"
    original = store.read_bytes(rel)
    manifest = result.manifest.model_copy(update={"selected": result.manifest.selected.model_copy(
        update={"within_budget": False})})
    try:
        store.write_bytes(rel, manifest.model_dump_json().encode())
        out = quantlab("pull", result.manifest.run_id, "--dest", str(tmp_path), "--store", cfg.store)
        assert out.returncode == 0 and "outside its accuracy budget" in out.stderr
    finally:
        store.write_bytes(rel, original)


def test_pull_of_a_diverged_export_exits_2_unless_forced(completed_run, tmp_path):
    """The run's manifest, rewritten to say ptq-x86's ONNX diverged in ONNX Runtime: refused
    in one line naming the agreement, nothing written; --force pulls it with a warning; a
    manifest from before the check's figures pulls it without a word."""
    from quantlab import registry
    from quantlab.store import Store

    cfg, result = completed_run
    run_id = result.manifest.run_id
    store, rel = Store(cfg.store), f"runs/{run_id}/manifest.json"
    original = store.read_bytes(rel)
    m = registry.load_manifest(store, run_id)

    def with_rows(change) -> bytes:
        rows = [change(r) for r in m.runtime_results]
        return m.model_copy(update={"runtime_results": rows}).model_dump_json().encode()

    reason = "top-1 agrees with the TorchScript artifact on 91.20% of images (< 98%)"
    diverged = with_rows(lambda r: r.model_copy(update={
        "equivalent": False, "agreement": 91.2, "check": reason})
        if (r.variant, r.runtime) == ("ptq-x86", "onnxruntime") else r)
    before_check = with_rows(lambda r: r.model_copy(update={"equivalent": None,
                                                            "agreement": None, "check": None}))
    args = ("pull", run_id, "--variant", "ptq-x86", "--format", "onnx", "--store", cfg.store)
    pulled = tmp_path / f"mobilenet_v2-ptq-x86-{run_id}.onnx"
    try:
        store.write_bytes(rel, diverged)
        out = quantlab(*args, "--dest", str(tmp_path))
        assert out.returncode == 2, out.stderr
        assert out.stderr.splitlines() == [
            f"error: ptq-x86's onnx export failed its check in onnxruntime: {reason}; "
            "--force pulls it anyway"]
        assert list(tmp_path.iterdir()) == []
        out = quantlab(*args, "--dest", str(tmp_path), "--force")
        assert out.returncode == 0, out.stderr
        assert out.stderr.splitlines() == [
            f"warning: ptq-x86's onnx export failed its check in onnxruntime: {reason}; "
            "pulled anyway (--force)"]
        assert [p.name for p in tmp_path.iterdir()] == [pulled.name]
        pulled.unlink()
        store.write_bytes(rel, before_check)
        out = quantlab(*args, "--dest", str(tmp_path))
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert pulled.stat().st_size > 0
    finally:
        store.write_bytes(rel, original)


CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "quantlab")
BAD_VALUES = {"demo": ["--qat-epochs", "abc"], "run": ["--qat-epochs", "abc"],
              "qat": ["run.yaml", "--run-id", "r1", "--epochs", "abc"],
              "pull": ["latest", "--variant"], "bench": ["--input-size", "abc"],
              "deploy": ["--qat-slots", "0"], "serve": ["--qat-slots", "abc"],
              "runs": ["--store"], "show": []}


@pytest.mark.parametrize("command", sorted(BAD_VALUES))
def test_usage_errors_are_one_line_and_exit_2(command, tmp_path):
    """The README's promise, for every subcommand, through the installed console script."""
    for args in ([command, "--no-such-option"], [command, *BAD_VALUES[command]]):
        out = subprocess.run([CONSOLE_SCRIPT, *args], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, out.stderr)
        assert f"quantlab {command} --help" in lines[0] and "Traceback" not in out.stderr
