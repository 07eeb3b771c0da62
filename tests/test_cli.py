"""The `quantlab` command as a user runs it, on a completed run (bad input: test_bad_input.py)."""

import os
import subprocess
import sys

from tests.test_flow import completed_run  # noqa: F401 (shared session fixture)


def quantlab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "quantlab.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def test_runs_show_and_pull(completed_run, tmp_path):  # noqa: F811
    cfg, result = completed_run
    out = quantlab("runs", "--store", cfg.store)
    assert out.returncode == 0, out.stderr
    assert result["run_id"] in out.stdout and "mobilenet_v2" in out.stdout
    out = quantlab("show", "latest", "--store", cfg.store)
    assert out.returncode == 0 and result["selected"] in out.stdout and "sha256" in out.stdout
    out = quantlab("pull", "latest", "--variant", "best", "--dest", str(tmp_path / "m.pt"),
                   "--store", cfg.store)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.pt").stat().st_size > 0
