"""The `quantlab` command as a user runs it: subprocesses, exit codes, one-line errors."""

import os
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("args, needle", [
    (["run", "--model", "vgg16", "--checkpoint", "x.pth", "--data", "d"],
     "unknown model 'vgg16'; valid: mobilenet_v2"),
    (["run", "--checkpoint", "x.pth"], "data: required setting is missing"),
    (["run", "--model", "mobilenet_v2", "--checkpoint", "x.pth", "--data", "d", "--qat-epochs", "0"],
     "qat.epochs"),
    (["show", "nope"], "'nope' is neither a complete run nor an alias"),
])
def test_bad_input_is_one_line_without_traceback(args, needle, tmp_path):
    out = quantlab(*args, "--store", str(tmp_path / "store"))
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "store" / "runs").exists()


def test_missing_checkpoint_fails_before_any_work(tiny_dataset, tmp_path):
    out = quantlab("run", "--model", "mobilenet_v2", "--checkpoint", str(tmp_path / "nope.pth"),
                   "--data", tiny_dataset, "--store", str(tmp_path / "store"))
    assert out.returncode == 2, out.stderr
    assert f"checkpoint {tmp_path / 'nope.pth'} does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "store" / "runs").exists()


def test_run_reads_config_given_with_the_config_option(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {name: vgg16, checkpoint: x.pth}\ndata: {uri: d}\n")
    out = quantlab("run", "--config", str(config), "--store", str(tmp_path / "store"))
    assert out.returncode == 2
    assert "unknown model 'vgg16'" in out.stderr
