"""The store's seen-set of float checkpoints (quantlab.checkpoints), against a local folder,
memory:// and S3: identity by content, the URI+ETag index, outcomes, discovery."""

import hashlib
import json

import pytest

from quantlab import checkpoints
from quantlab.checkpoints import CheckpointRegistry, already_handled, event_spec
from quantlab.errors import NotFoundError
from quantlab.store import Store

A, B = b"float checkpoint A" * 1000, b"float checkpoint B" * 1000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def lab(store_uri):
    """(models store where training writes, registry in the quantlab store)."""
    models = Store(store_uri.rstrip("/") + "/models")
    return models, CheckpointRegistry(Store(store_uri.rstrip("/") + "/lab"))


def test_discover_finds_each_content_once_and_remembers_it(lab):
    models, seen = lab
    models.write_many({"mnv2/2026-12-01/model.pth": A, "mnv2/2026-12-01/notes.txt": b"x",
                       "mnv2/2026-12-02/model.pth": A, "mnv2/2026-12-03/model.pt": B})
    prefix = models.uri("mnv2/")
    found = seen.discover([prefix], model="mobilenet_v2")
    # the same bytes under two keys are one checkpoint: the first key in listing order
    assert [(f.uri, f.sha256) for f in found] == [
        (models.uri("mnv2/2026-12-01/model.pth"), sha(A)),
        (models.uri("mnv2/2026-12-03/model.pt"), sha(B))]
    record = seen.get(sha(A))
    assert record.outcome == "pending" and record.model == "mobilenet_v2"
    assert record.uris == [models.uri("mnv2/2026-12-01/model.pth"),
                           models.uri("mnv2/2026-12-02/model.pth")]
    assert seen.discover([prefix], model="mobilenet_v2") == []   # nothing new the second time
    models.write_bytes("mnv2/2026-12-04/model.pth", A)            # same bytes, new key
    assert seen.discover([prefix], model="mobilenet_v2") == []
    assert len(seen.get(sha(A)).uris) == 3
    models.write_bytes("mnv2/2026-12-05/model.pth", A + b"!")     # new content
    assert [f.sha256 for f in seen.discover([prefix], "mobilenet_v2")] == [sha(A + b"!")]
    assert {r.sha256 for r in seen.records()} == {sha(A), sha(B), sha(A + b"!")}


def test_an_unchanged_object_is_not_hashed_again(lab, monkeypatch):
    models, seen = lab
    models.write_bytes("m/model.pth", A)
    uri = models.uri("m/model.pth")
    assert seen.identify(uri) == sha(A)
    hashed = []
    real = checkpoints.sha256_of
    monkeypatch.setattr(checkpoints, "sha256_of", lambda u, o=None: hashed.append(u) or real(u, o))
    assert seen.identify(uri) == sha(A)
    # ETag (S3) or size+mtime (local) unchanged: the index answers; memory:// keeps neither
    assert hashed == ([] if checkpoints.etag_of(uri) else [uri])
    hashed.clear()
    models.write_bytes("m/model.pth", B)                      # overwritten: ETag changes
    assert seen.identify(uri) == sha(B) and hashed == [uri]


def test_outcomes_quantized_rejected_and_forced_reset(lab):
    models, seen = lab
    models.write_bytes("m/a.pth", A)
    uri = models.uri("m/a.pth")
    record, new = seen.remember(seen.identify(uri), uri, "mobilenet_v2", event_id="e1")
    assert new and already_handled(record) is None
    seen.mark_quantized(sha(A), "run-1")
    assert already_handled(seen.get(sha(A))) == "already quantized as run run-1"
    _, new = seen.remember(sha(A), uri, "mobilenet_v2")
    assert not new
    seen.mark_rejected(sha(A), "checkpoint has 10 classes but the dataset 3\nmore detail")
    assert already_handled(seen.get(sha(A))) == ("rejected earlier: checkpoint has 10 classes "
                                                 "but the dataset 3")
    reset = seen.reset(sha(A), event_id="e2")
    assert reset.outcome == "pending" and reset.reason is None and reset.event_id == "e2"
    assert reset.uris == [uri]
    with pytest.raises(NotFoundError, match="is not in"):
        seen.mark_quantized(sha(B), "run-2")


def test_a_missing_checkpoint_is_a_clear_error(lab):
    models, seen = lab
    with pytest.raises(NotFoundError, match="no such|does not exist"):
        seen.identify(models.uri("nope/model.pth"))


def test_events_name_the_content_and_carry_no_credentials(lab, monkeypatch):
    monkeypatch.setenv("QUANTLAB_STORAGE_OPTIONS", json.dumps({"secret": "s3cr3t-value"}))
    spec = event_spec(checkpoints.LANDED, sha(A), "mobilenet_v2", "s3://models/m/model.pth",
                      source="announce", force=False)
    assert spec["resource"]["prefect.resource.id"] == f"quantlab.checkpoint.{sha(A)}"
    assert spec["resource"]["quantlab.model"] == "mobilenet_v2"
    assert spec["payload"] == {"checkpoint": "s3://models/m/model.pth", "sha256": sha(A),
                               "model": "mobilenet_v2", "source": "announce", "force": False}
    assert "s3cr3t" not in json.dumps(spec) and "testing-secret" not in json.dumps(spec)
