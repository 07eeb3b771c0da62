"""A quantize run that a checkpoint event started, under a real Prefect API: the store's
seen-set ends a duplicate at once, and a bad checkpoint is rejected and remembered."""

import hashlib

import pytest

from quantlab.checkpoints import CheckpointRegistry
from quantlab.errors import CheckpointError
from quantlab.store import Store
from quantlab_flows.quantize import quantize
from quantlab_tasks.events import CheckpointTrigger


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
    # announced again: the run ends at once instead of failing again
    assert quantize(tiny_config, checkpoint=str(bad), trigger=trigger) is None
    forced = trigger.model_copy(update={"force": True})
    with pytest.raises(CheckpointError):
        quantize(tiny_config, checkpoint=str(bad), trigger=forced)
