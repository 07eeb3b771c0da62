"""The `quantlab` command as a user runs it, on a completed run (bad input: test_bad_input.py)."""

import os
import subprocess
import sys

from tests.test_flow import completed_run  # noqa: F401 (shared session fixture)


def quantlab(*args, cwd=None, columns=200):
    return subprocess.run([sys.executable, "-m", "quantlab.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "COLUMNS": str(columns)})


def test_runs_show_and_pull(completed_run, tmp_path):  # noqa: F811
    cfg, result = completed_run
    out = quantlab("runs", "--store", cfg.store, columns=80)
    assert out.returncode == 0, out.stderr
    # whole, even in a narrow terminal: users copy run ids into `show` and `pull`
    assert result["run_id"] in out.stdout and "mobilenet_v2" in out.stdout
    out = quantlab("show", "latest", "--store", cfg.store)
    assert out.returncode == 0 and result["selected"] in out.stdout and "sha256" in out.stdout
    out = quantlab("pull", "latest", "--variant", "best", "--dest", str(tmp_path / "m.pt"),
                   "--store", cfg.store)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.pt").stat().st_size > 0
