"""RunConfig: the tutorial's defaults, presets, and clear errors for bad values."""

import pytest

from quantlab.config import (PTQ_PRESETS, QATConfig, RunConfig, load_config, merge_overrides,
                             parse_config)
from quantlab.errors import ConfigError

BASE = {"model": {"checkpoint": "float.pth"}, "data": {"uri": "data/"}}


def test_defaults_follow_the_tutorial():
    cfg = parse_config(BASE)
    assert [v.name for v in cfg.variants] == ["ptq-minmax", "ptq-x86"]
    assert all(v.num_calibration_batches == 32 for v in cfg.variants)
    assert (cfg.qat.epochs, cfg.qat.freeze_bn_after, cfg.qat.freeze_observers_after) == (8, 4, 5)
    assert cfg.qat.name == "qat-x86" and cfg.qat.nproc_per_node == 2
    t = cfg.data.transforms
    assert (t.input_size, t.eval_resize) == (224, 256)


def test_variants_by_preset_name_or_mapping():
    cfg = parse_config({**BASE, "variants": ["ptq-x86", {"name": "onednn-minmax", "engine": "onednn",
                                                         "activation_observer": "minmax",
                                                         "num_calibration_batches": 4}]})
    assert cfg.variants[0] == PTQ_PRESETS["ptq-x86"]
    assert cfg.variants[1].engine == "onednn" and cfg.variants[1].num_calibration_batches == 4


@pytest.mark.parametrize("patch, needle", [
    ({"model": {"name": "vgg16", "checkpoint": "x"}}, "unknown model 'vgg16'; valid: mobilenet_v2"),
    ({"variants": ["ptq-fast"]}, "unknown variant 'ptq-fast'; presets: ptq-minmax, ptq-x86"),
    ({"variants": [{"name": "v", "engine": "tpu"}]}, "unknown engine 'tpu'; valid: x86, fbgemm"),
    ({"qat": {"epochs": 0}}, "qat.epochs"),
    ({"qat": {"epochs": 3, "freeze_bn_after": 5}}, "freeze_bn_after=5 is beyond the run's 3 epochs"),
    ({"qat": {"epochs": 1, "freeze_observers_after": 2}},
     "qat.freeze_observers_after=2 is beyond the run's 1 epochs; valid: 1..1"),
    ({"qat": {"freeze_bn_after": 0}}, "qat.freeze_bn_after"),
    ({"qat": {"nproc_per_node": 0}}, "qat.nproc_per_node"),
    ({"data": {"uri": "d", "batch_size": 0}}, "data.batch_size"),
    ({"storage_options": {"secret": "hunter2"}}, "must not hold credentials (secret)"),
    ({"bogus": 1}, "bogus: unknown setting"),
    ({"sensitivity": {"variant": "ptq-nope"}}, "sensitivity.variant 'ptq-nope' is not one of the "
                                               "run's PTQ variants; valid: ptq-minmax, ptq-x86"),
    ({"sensitivity": {"max_float_layers": 0}}, "sensitivity.max_float_layers"),
    ({"gate": {"max_latency_increase": -0.1}}, "gate.max_latency_increase"),
    # backend pt2e: X86InductorQuantizer's settings only; mixed precision is eager-only
    ({"variants": [{"name": "p", "backend": "pt2e", "engine": "qnnpack"}]},
     "variant p (backend pt2e): engine 'qnnpack' is not available; valid: x86"),
    ({"variants": [{"name": "p", "backend": "pt2e", "weight_observer": "minmax"}]},
     "weight_observer 'minmax' is not available (X86InductorQuantizer quantizes weights per "
     "channel only); valid: per_channel_minmax"),
    ({"variants": [{"name": "p", "backend": "pt2e", "activation_observer": "percentile"}]},
     "activation_observer 'percentile' is not available; valid: histogram, minmax"),
    ({"variants": [{"name": "p", "backend": "pt2e", "bias_correction": True}]},
     "cross_layer_equalization and bias_correction work on eager modules only"),
    ({"variants": [{"name": "p", "backend": "tflite"}]}, "unknown backend 'tflite'; valid: eager, pt2e"),
    ({"variants": ["ptq-x86", "pt2e-x86"], "sensitivity": {"variant": "pt2e-x86"}},
     "sensitivity.variant 'pt2e-x86' is a backend pt2e variant: per-layer sensitivity and the "
     "float fallback work on eager modules only; valid: ptq-x86, auto"),
    ({"qat": {"backends": ["eager", "pt2e"], "engine": "onednn"}},
     "qat.engine 'onednn' is not available with qat.backends pt2e (X86InductorQuantizer); "
     "valid: x86"),
    ({"dask_address": "http://sched:8787"}, "dask_address 'http://sched:8787' must be a scheduler "
                                            "address: HOST:PORT or PROTOCOL://HOST:PORT with PROTOCOL one of tcp"),
])
def test_bad_values_name_the_value_and_the_valid_ones(patch, needle):
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, **patch})
    assert needle in str(e.value)
    assert "hunter2" not in str(e.value)


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: resnet18, checkpoint: r18.pth}\ndata: {uri: /data}\n"
                    "qat: {epochs: 4, freeze_bn_after: 2, freeze_observers_after: 3}\n")
    cfg = load_config(str(path), {"qat.epochs": 5, "store": "s3://b/p", "model.name": None})
    assert cfg.model.name == "resnet18" and cfg.qat.epochs == 5 and cfg.store == "s3://b/p"
    assert (cfg.qat.freeze_bn_after, cfg.qat.freeze_observers_after) == (2, 3)  # as set
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_pt2e_variants_beside_the_eager_ones():
    cfg = parse_config({**BASE, "variants": ["ptq-minmax", "ptq-x86", "pt2e-x86",
                                             {"name": "pt2e-minmax", "backend": "pt2e",
                                              "activation_observer": "minmax"}],
                        "qat": {"backends": ["eager", "pt2e"]}})
    assert [v.backend for v in cfg.variants] == ["eager", "eager", "pt2e", "pt2e"]
    assert cfg.sensitivity_variant == "ptq-x86"  # the last eager variant, not a PT2E one
    assert cfg.qat_variants() == [("qat-x86", "eager"), ("qat-pt2e-x86", "pt2e")]
    assert cfg.variant_names() == ["ptq-minmax", "ptq-x86", "pt2e-x86", "pt2e-minmax",
                                   "ptq-x86-fallback", "qat-x86", "qat-pt2e-x86"]
    assert cfg.backends == {"eager", "pt2e"}
    with pytest.raises(ConfigError, match="unique .* qat-pt2e-x86"):
        parse_config({**BASE, "variants": [{"name": "qat-pt2e-x86", "backend": "pt2e"}],
                      "qat": {"backends": ["pt2e"]}})


def test_variant_names_are_unique():
    with pytest.raises(ConfigError, match="unique"):
        parse_config({**BASE, "variants": ["ptq-x86", "ptq-x86"]})
    with pytest.raises(ConfigError, match="unique"):
        parse_config({**BASE, "qat": {"name": "ptq-x86"}})


def test_preset_names_are_in_the_json_schema():
    """Prefect validates deployment parameters against the schema: `variants: [ptq-x86]` passes."""
    import jsonschema

    schema = RunConfig.model_json_schema()
    jsonschema.validate({**BASE, "variants": ["ptq-x86", {"name": "mine"}],
                         "dask_address": "tcp://10.0.0.5:8786"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**BASE, "variants": ["ptq-fast"]}, schema)


def test_sensitivity_and_fallback_follow_the_ptq_variants():
    cfg = parse_config(BASE)
    assert (cfg.sensitivity_variant, cfg.fallback_name) == ("ptq-x86", "ptq-x86-fallback")
    assert cfg.variant_names() == ["ptq-minmax", "ptq-x86", "ptq-x86-fallback", "qat-x86"]
    assert cfg.gate.enabled and cfg.max_accuracy_drop == 1.0
    cfg = parse_config({**BASE, "variants": ["ptq-minmax"], "sensitivity": {"fallback": False}})
    assert (cfg.sensitivity_variant, cfg.fallback_name) == ("ptq-minmax", None)
    cfg = parse_config({**BASE, "variants": []})  # nothing to analyse: no sensitivity, no error
    assert (cfg.sensitivity_variant, cfg.variant_names()) == (None, ["qat-x86"])
    with pytest.raises(ConfigError, match="unique"):
        parse_config({**BASE, "variants": ["ptq-x86", {"name": "ptq-x86-fallback"}],
                      "sensitivity": {"variant": "ptq-x86"}})


def test_settings_renamed_in_0_2_still_read_under_their_old_names():
    from quantlab.config import QATConfig, parse_config

    assert QATConfig(world_size=3).nproc_per_node == 3
    cfg = parse_config({"model": {"checkpoint": "x.pth"}, "data": {"uri": "d"},
                        "bench": {"num_threads": 1}})
    assert cfg.timing.num_threads == 1
    with pytest.raises(ConfigError, match="give timing only"):
        parse_config({"model": {"checkpoint": "x.pth"}, "data": {"uri": "d"}, "bench": {},
                      "timing": {}})


# -- the QAT schedule: the tutorial's freeze points, scaled to the epochs asked for ----------
@pytest.mark.parametrize("epochs, bn, observers", [
    (1, 1, 1),   # nothing to freeze within the run: the freeze follows its only epoch
    (2, 1, 1),   # one epoch before, one after
    (3, 2, 2),
    (4, 2, 3),
    (8, 4, 5),   # the tutorial's
    (16, 8, 10),
])
def test_unset_freeze_points_scale_with_the_epochs(epochs, bn, observers):
    q = parse_config({**BASE, "qat": {"epochs": epochs}}).qat
    assert (q.freeze_bn_after, q.freeze_observers_after) == (bn, observers)
    assert "freeze_bn_after" not in q.model_fields_set  # still "scale with epochs"
    # null (a YAML `freeze_bn_after: null`, a Prefect form left empty) means the same
    q = parse_config({**BASE, "qat": {"epochs": epochs, "freeze_bn_after": None,
                                      "freeze_observers_after": None}}).qat
    assert (q.freeze_bn_after, q.freeze_observers_after) == (bn, observers)


def test_freeze_points_set_explicitly_are_kept_or_refused():
    q = QATConfig(epochs=3, freeze_observers_after=3)  # the scaled default would be 2
    assert (q.freeze_bn_after, q.freeze_observers_after) == (2, 3)
    q = QATConfig(epochs=8, freeze_bn_after=1, freeze_observers_after=8)
    assert (q.freeze_bn_after, q.freeze_observers_after) == (1, 8)
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "qat": {"epochs": 2, "freeze_bn_after": 4}})
    assert str(e.value) == ("invalid config: qat: qat.freeze_bn_after=4 is beyond the run's 2 "
                            "epochs; valid: 1..2")
    # A dumped config (a QAT job file, a Prefect parameter) reads back as the same schedule.
    q = QATConfig(epochs=3)
    assert QATConfig.model_validate_json(q.model_dump_json()) == q


def test_quantlab_run_with_one_qat_epoch_validates(tmp_path):
    """`quantlab run run.yaml --qat-epochs 1` (and without a YAML file): the CLI's own override
    path, with the default schedule, validates; a freeze point the YAML sets beyond it does not."""
    from quantlab_cli.app import config_overrides

    overrides = config_overrides(qat_epochs=1, checkpoint="float.pth", data="data/", model=None)
    q = parse_config(merge_overrides({}, overrides)).qat
    assert (q.epochs, q.freeze_bn_after, q.freeze_observers_after) == (1, 1, 1)
    path = tmp_path / "run.yaml"
    path.write_text("model: {checkpoint: float.pth}\ndata: {uri: data/}\n"
                    "qat: {epochs: 8, lr: 0.0001}\n")
    q = load_config(str(path), config_overrides(qat_epochs=1)).qat
    assert (q.epochs, q.freeze_bn_after, q.freeze_observers_after) == (1, 1, 1)
    q = load_config(str(path), config_overrides(qat_epochs=2)).qat
    assert (q.epochs, q.freeze_bn_after, q.freeze_observers_after) == (2, 1, 1)
    path.write_text("model: {checkpoint: float.pth}\ndata: {uri: data/}\n"
                    "qat: {epochs: 8, freeze_bn_after: 4}\n")
    with pytest.raises(ConfigError, match=r"qat.freeze_bn_after=4 is beyond the run's 1 epochs"):
        load_config(str(path), config_overrides(qat_epochs=1))
