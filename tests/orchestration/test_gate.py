"""The regression gate under a real Prefect API: a worse model fails the flow, `best` stays."""

import pytest
import torch
from quantlab_cli.app import app
from typer.testing import CliRunner

from quantlab import models, registry
from quantlab.store import Store
from tests.support import make_config


def test_a_regression_fails_the_flow_and_leaves_best_unmoved(prefect, tiny_dataset,
                                                               tiny_checkpoint, tmp_path):
    from quantlab_flows.quantize import quantize

    def config(checkpoint):  # lean: QAT and sensitivity are not the point here
        cfg = make_config(tiny_dataset, checkpoint, str(tmp_path / "store"), str(tmp_path / "cache"))
        return cfg.model_copy(update={
            "variants": cfg.variants[1:],  # ptq-x86
            "qat": cfg.qat.model_copy(update={"enabled": False}),
            "sensitivity": cfg.sensitivity.model_copy(update={"enabled": False})})

    first = quantize(config(tiny_checkpoint))
    store = Store(str(tmp_path / "store"))
    m1 = registry.load_manifest(store, first.manifest.run_id)
    assert m1.status == "succeeded" and m1.gate.passed and "no previous best-mobilenet_v2" in first.manifest.gate.reason
    assert registry.resolve(store, "best-mobilenet_v2") == first.manifest.run_id

    # An untrained model of the same architecture: top-1 collapses to chance.
    untrained = tmp_path / "untrained.pth"
    torch.manual_seed(1)
    torch.save(models.build("mobilenet_v2", num_classes=3, width_mult=0.25).state_dict(), untrained)
    state = quantize(config(str(untrained)), return_state=True)
    assert state.is_failed()
    assert "RegressionError" in state.message and "best-mobilenet_v2 not moved" in state.message
    second = registry.resolve(store, "latest")
    assert second != first.manifest.run_id
    m2 = registry.load_manifest(store, second)
    assert m2.status == "rejected" and not m2.gate.passed
    assert m2.gate.previous_run_id == first.manifest.run_id and m2.gate.same_dataset
    assert "points below the previous best's" in m2.gate.reason
    assert m2.gate.previous_top1 == next(r.top1 for r in m1.results if r.variant == m1.selected.variant)
    for alias in ("best", "best-mobilenet_v2"):
        assert registry.resolve(store, alias) == first.manifest.run_id
    assert registry.resolve(store, "latest-mobilenet_v2") == second
    report = store.read_bytes(f"runs/{second}/report/report.md").decode()
    assert "Regression gate FAILED" in report

    out = CliRunner().invoke(app, ["show", "latest", "--store", str(tmp_path / "store")],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "rejected" in out.output and "FAILED" in out.output
    out = CliRunner().invoke(app, ["runs", "--store", str(tmp_path / "store")], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "rejected" in out.output and "succeeded" in out.output


def test_a_rejected_run_exits_3_with_the_reason(monkeypatch, capsys):
    from quantlab_cli import app as cli

    from quantlab.errors import RegressionError

    def rejected(**_):
        raise RegressionError("run r2 rejected, best-mobilenet_v2 not moved: top-1 fell")

    monkeypatch.setattr(cli, "app", rejected)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 3 and "best-mobilenet_v2 not moved" in capsys.readouterr().err
