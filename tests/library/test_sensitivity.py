"""Per-layer sensitivity and the float fallback (no Prefect); selection: test_selection.py."""

import pytest
import torch
from torch.ao.nn import intrinsic as nni
from torch.ao.nn import quantized as nnq
from torch.ao.nn.intrinsic import quantized as nniq

from quantlab import metrics, pipeline, registry
from quantlab.backend import get_backend
from quantlab.evaluate import EvalResult
from quantlab.sensitivity import chosen_step, greedy_fallback
from quantlab.store import Store
from tests.support import make_config

INT8_LAYERS = (nnq.Conv2d, nnq.Linear, nniq.ConvReLU2d)
FLOAT_LAYERS = (torch.nn.Conv2d, torch.nn.Linear, nni.ConvReLU2d)


@pytest.fixture(scope="module")
def ranked(tiny_dataset, tiny_checkpoint, tmp_path_factory):
    """One run with the ptq-x86 variant and its sensitivity, shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("sensitivity")
    cfg = make_config(tiny_dataset, tiny_checkpoint, str(tmp / "store"), str(tmp / "cache"))
    cfg = cfg.model_copy(update={"sensitivity": cfg.sensitivity.model_copy(
        update={"max_float_layers": 2})})
    run = pipeline.start_run(cfg)
    staged = pipeline.stage(cfg)
    pipeline.export_float(cfg, staged, run, pipeline.evaluate_float(cfg, staged))
    base = pipeline.ptq_variant(cfg, staged, run, cfg.variant("ptq-x86"))
    return (cfg, run, staged, base), pipeline.sensitivity(cfg, staged, run)


def test_sensitivity_has_a_ranked_row_per_quantized_layer(ranked):
    (cfg, run, staged, _), result = ranked
    int8 = pipeline._quantize(cfg, staged, cfg.variant("ptq-x86"))
    quantized = [n for n, m in int8.named_modules() if isinstance(m, INT8_LAYERS)]
    rows = metrics.read_rows(Store(cfg.store), "sensitivity", run.run_id)
    assert sorted(r["layer"] for r in rows) == sorted(quantized) and len(quantized) > 50
    assert sorted(r["rank"] for r in rows) == list(range(1, len(quantized) + 1))
    assert {r["variant"] for r in rows} == {"ptq-x86"}
    assert {r["op_type"] for r in rows} == {"ConvReLU2d", "Conv2d", "Linear"}
    keys = [(-x.top1_drop, x.output_sqnr_db) for x in result.layers]
    assert keys == sorted(keys)
    assert result.num_images == 16  # 2 calibration batches of 8
    for x in result.layers:
        assert x.top1_drop == pytest.approx(result.float_top1 - x.top1)
        # int8 adds noise to every layer: finite and positive SQNR, not a copy of float
        assert 0 < x.layer_sqnr_db < 80 and 0 < x.output_sqnr_db < 80


def test_fallback_keeps_the_most_sensitive_layers_in_float(ranked, monkeypatch):
    from quantlab import sensitivity

    (cfg, run, staged, base), result = ranked
    unreachable = EvalResult(top1=100.0 + cfg.max_accuracy_drop + 1, top5=100, loss=0,
                             num_images=24)
    # The mechanism for a chosen step (its layers float, the rest int8), taking the search's
    # last step; which step is chosen is test_greedy_fallback_stops_when_float_layers_buy_nothing.
    monkeypatch.setattr(sensitivity, "chosen_step", lambda steps: steps[-1])
    cfg = cfg.model_copy(update={"sensitivity": cfg.sensitivity.model_copy(update={"patience": 5})})
    r = pipeline.ptq_fallback(cfg, staged, run, base, unreachable, result)
    assert r.variant == "ptq-x86-fallback" and r.method == "ptq"
    assert r.float_layers == [x.layer for x in result.layers[:2]]
    assert [s.num_float_layers for s in r.fallback_steps] == [0, 1, 2]
    assert [s.added for s in r.fallback_steps[1:]] == r.float_layers
    assert not any(s.within_budget for s in r.fallback_steps)
    assert r.fallback_steps[-1].top1 == r.eval.top1
    # In the TorchScript artifact exactly that many layers compute in float; the rest is int8.
    # (It is frozen: submodules and their names are inlined into one graph, so count the ops.)
    module = registry.load_artifact(pipeline.store_of(cfg), run.run_id, r.artifact)
    ops = [n.kind() for n in module.graph.nodes()]
    assert sum(k in ("aten::conv2d", "aten::_convolution", "aten::linear") for k in ops) == 2
    assert any(k.startswith("quantized::conv2d") for k in ops)
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_fallback_keeps_nothing_in_float_when_the_base_meets_the_budget(ranked):
    (cfg, run, staged, base), result = ranked
    float_eval = EvalResult(top1=base.eval.top1, top5=100, loss=0, num_images=24)
    r = pipeline.ptq_fallback(cfg, staged, run, base, float_eval, result)
    assert r.float_layers == [] and len(r.fallback_steps) == 1
    assert r.fallback_steps[0].within_budget and r.eval.top1 == base.eval.top1


def test_float_islands_anywhere_in_the_model(tiny_config):
    from quantlab import models

    backend = get_backend()
    model = pipeline.load_float(tiny_config, 3)
    layers = backend.quantizable_layers(models.fuse(pipeline.load_float(tiny_config, 3), False))
    # the first layer (after QuantStub), one whose output feeds a residual FloatFunctional add,
    # and the classifier (before DeQuantStub)
    chosen = [layers[0].name, "features.3.conv.2", layers[-1].name]
    assert model.features[3].use_res_connect and chosen[1] in {x.name for x in layers}
    observed = backend.prepare_ptq(model, tiny_config.variant("ptq-x86"), chosen)
    observed(torch.randn(4, 3, 32, 32))
    int8 = backend.convert(observed, "x86")
    for name in chosen:
        assert isinstance(int8.get_submodule(f"{name}.module"), FLOAT_LAYERS)
    assert sum(isinstance(m, INT8_LAYERS) for m in int8.modules()) == len(layers) - 3
    assert int8(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(Exception, match="not quantizable layers of this model; valid: classifier"):
        backend.prepare_ptq(pipeline.load_float(tiny_config, 3), tiny_config.variant("ptq-x86"),
                            ["features.nope"])


def test_greedy_fallback_adds_layers_in_rank_order_until_the_budget():
    accuracy = {0: 90.0, 1: 92.0, 2: 94.5, 3: 96.0, 4: 97.0}
    calls = []

    def top1_with(layers):
        calls.append(layers)
        return accuracy[len(layers)]

    steps = greedy_fallback(["a", "b", "c", "d", "e"], top1_with, 90.0, 95.0, max_float_layers=4)
    assert calls == [["a"], ["a", "b"], ["a", "b", "c"]]
    assert [(s.num_float_layers, s.added, s.within_budget) for s in steps] == [
        (0, None, False), (1, "a", False), (2, "b", False), (3, "c", True)]
    limited = greedy_fallback(["a", "b", "c"], top1_with, 90.0, 99.0, max_float_layers=2)
    assert [s.num_float_layers for s in limited] == [0, 1, 2] and not limited[-1].within_budget
    assert greedy_fallback(["a"], top1_with, 96.0, 95.0, 4)[-1].num_float_layers == 0


def test_greedy_fallback_stops_when_float_layers_buy_nothing():
    """Seen by a user: 8 float layers at top-1 30.00 each, a slower, larger model for nothing."""
    top1 = {0: 30.0, 1: 30.0, 2: 31.0, 3: 31.0, 4: 31.0, 5: 40.0}
    steps = greedy_fallback(list("abcdefgh"), lambda layers: top1[len(layers)], 30.0, 80.0,
                            max_float_layers=8, patience=2)
    assert [s.num_float_layers for s in steps] == [0, 1, 2, 3, 4]  # 3 and 4 gained nothing
    assert chosen_step(steps).num_float_layers == 2  # the fewest that reached 31.0
    flat = greedy_fallback(list("abcdefgh"), lambda layers: 30.0, 30.0, 80.0, 8, patience=2)
    assert len(flat) == 3 and chosen_step(flat).num_float_layers == 0


def test_auto_picks_the_most_accurate_variant_outside_the_budget(tiny_config):
    from quantlab.registry import ArtifactEntry

    cfg = tiny_config.model_copy(update={"sensitivity": tiny_config.sensitivity.model_copy(
        update={"variant": "auto"})})
    assert "ptq-minmax-fallback" in cfg.variant_names()

    def result(name, top1):
        return pipeline.VariantResult(
            variant=name, method="ptq", engine="x86", eval=EvalResult(top1=top1, top5=None,
                                                                      loss=0, num_images=1),
            artifact=ArtifactEntry(variant=name, method="ptq", path=f"artifacts/{name}/m.pt",
                                   sha256="0" * 64, bytes=1, engine="x86"))

    float_eval = EvalResult(top1=90.0, top5=None, loss=0, num_images=1)
    outside = [result("ptq-minmax", 70.0), result("ptq-x86", 85.0)]
    assert pipeline.sensitivity_base(cfg, outside, float_eval) == "ptq-x86"
    within = [result("ptq-minmax", 89.5), result("ptq-x86", 89.8)]
    assert pipeline.sensitivity_base(cfg, within, float_eval) == "ptq-x86"  # the last variant
    mixed = [result("ptq-minmax", 80.0), result("ptq-x86", 89.8)]
    assert pipeline.sensitivity_base(cfg, mixed, float_eval) == "ptq-minmax"
