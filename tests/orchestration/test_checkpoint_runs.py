"""A quantize run that a checkpoint event started, under a real Prefect API: the store's
seen-set ends a duplicate at once, a bad checkpoint is rejected and remembered, a run that
fails for another reason is recorded as failed and tried again, and a second trigger while
the first run is in flight starts nothing."""

import hashlib

import pytest

from quantlab import pipeline
from quantlab.checkpoints import CheckpointRegistry
from quantlab.errors import CheckpointError
from quantlab.store import Store, normalize_uri
from quantlab_flows.quantize import quantize
from quantlab_flows.watch import watch
from quantlab_tasks.events import CheckpointTrigger


def quick(config):
    """One PTQ variant, no QAT, no sensitivity, no gate: a complete run in seconds."""
    return config.model_copy(update={
        "variants": config.variants[:1],
        "qat": config.qat.model_copy(update={"enabled": False}),
        "sensitivity": config.sensitivity.model_copy(update={"enabled": False}),
        "gate": config.gate.model_copy(update={"enabled": False})})


def raising(error: Exception):
    """A stand-in for a pipeline step that fails with `error`."""
    def step(*args, **kwargs):
        raise error
    return step


def test_content_already_quantized_starts_no_work(prefect, tiny_config, tiny_checkpoint, tmp_path):
    data = open(tiny_checkpoint, "rb").read()
    copy = tmp_path / "elsewhere" / "model.pth"
    copy.parent.mkdir()
    copy.write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    seen = CheckpointRegistry(Store(tiny_config.store))
    seen.remember(sha256, tiny_checkpoint, "mobilenet_v2")
    seen.mark_quantized(sha256, "run-earlier")
    trigger = CheckpointTrigger(source="watcher", event_id="e-1")   # no sha256: the run hashes
    assert quantize(tiny_config, checkpoint=str(copy), trigger=trigger) is None
    record = seen.get(sha256)
    assert record.outcome == "quantized" and record.run_id == "run-earlier"
    assert record.uris == [tiny_checkpoint, str(copy)]
    assert not Store(tiny_config.store).list_dir("runs")              # no run was started


def test_a_bad_checkpoint_fails_the_run_and_is_remembered(prefect, tiny_config, tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a torch file")
    sha256 = hashlib.sha256(bad.read_bytes()).hexdigest()
    trigger = CheckpointTrigger(source="announce", event_id="e-2", sha256=sha256)
    with pytest.raises(CheckpointError, match="is not a torch file"):
        quantize(tiny_config, checkpoint=str(bad), trigger=trigger)
    record = CheckpointRegistry(Store(tiny_config.store)).get(sha256)
    assert record.outcome == "rejected" and "is not a torch file" in record.reason
    assert record.failures == 0                                     # rejected, not failed
    # announced again: the run ends at once instead of failing again
    assert quantize(tiny_config, checkpoint=str(bad), trigger=trigger) is None
    forced = trigger.model_copy(update={"force": True})
    with pytest.raises(CheckpointError):
        quantize(tiny_config, checkpoint=str(bad), trigger=forced)


def test_a_run_that_fails_midway_is_announced_again_and_then_quantized(
        prefect, tiny_config, tiny_checkpoint, tmp_path, monkeypatch):
    config = quick(tiny_config)
    models = tmp_path / "models"
    landed = models / "2026-12-01" / "model.pth"
    landed.parent.mkdir(parents=True)
    landed.write_bytes(open(tiny_checkpoint, "rb").read())
    uri, sha256 = normalize_uri(str(landed)), hashlib.sha256(landed.read_bytes()).hexdigest()
    seen = CheckpointRegistry(Store(config.store))

    def passes():
        return watch(config.store, "mobilenet_v2", [str(models)])
    assert passes() == [uri]
    trigger = CheckpointTrigger(source="watcher", event_id="e-1", sha256=sha256)
    with monkeypatch.context() as m:  # the PTQ step dies after the run has started
        m.setattr(pipeline, "ptq_variant", raising(RuntimeError("worker lost\nits traceback")))
        with pytest.raises(RuntimeError, match="worker lost"):
            quantize(config, checkpoint=uri, trigger=trigger)
    record = seen.get(sha256)
    assert record.outcome == "failed" and record.reason == "RuntimeError: worker lost"
    assert record.failures == 1 and record.run_id.startswith("flow-")
    assert Store(config.store).list_dir("runs")                      # it failed mid-way
    assert passes() == [uri]                                         # announced again,
    assert passes() == []                                            # once
    outcome = quantize(config, checkpoint=uri, trigger=trigger.model_copy(
        update={"event_id": "e-2"}))
    record = seen.get(sha256)
    assert record.outcome == "quantized" and record.run_id == outcome.manifest.run_id
    assert record.failures == 0 and outcome.manifest.trigger.kind == "watcher"
    assert passes() == []


def test_a_second_trigger_while_the_first_run_is_pending_starts_nothing(
        prefect, tiny_config, tiny_checkpoint, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    sha256 = hashlib.sha256(open(tiny_checkpoint, "rb").read()).hexdigest()
    seen = CheckpointRegistry(Store(tiny_config.store))
    seen.remember(sha256, tiny_checkpoint, "mobilenet_v2")
    with get_client(sync_client=True) as client:  # the first run, still going
        first = client.create_flow_run(flow(name="quantize")(lambda: None), state=Running())
    seen.claim(sha256, "run-first", str(first.id))
    # forced or not, never two at once: a second run that went past its claim would preflight
    monkeypatch.setattr(pipeline, "preflight", raising(AssertionError("a second run started")))
    for force in (False, True):
        trigger = CheckpointTrigger(source="announce", sha256=sha256, force=force)
        assert quantize(tiny_config, trigger=trigger) is None
        assert seen.get(sha256).run_id == "run-first"
    record = seen.get(sha256)
    assert record.outcome == "pending" and record.flow_run_id == str(first.id)
    assert not Store(tiny_config.store).list_dir("runs")
    # The first run's process dies without recording an outcome: the next trigger takes over
    # (and here fails at once, with its own reason).
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(first.id, Crashed(), force=True)
    monkeypatch.setattr(pipeline, "preflight", raising(OSError("dataset share not mounted")))
    with pytest.raises(OSError, match="not mounted"):
        quantize(tiny_config, trigger=CheckpointTrigger(source="announce", sha256=sha256))
    record = seen.get(sha256)
    assert record.outcome == "failed" and record.run_id != "run-first"
    assert record.reason == "OSError: dataset share not mounted"
    assert record.failures == 2                     # the first run's, then this one's
