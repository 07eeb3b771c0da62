"""The store's seen-set of float checkpoints (quantlab.checkpoints), against a local folder,
memory:// and S3: identity by content, the URI+ETag index, outcomes, claims, discovery and
the re-discovery of failed ones."""

import hashlib
import json

import pytest

from quantlab import checkpoints
from quantlab.checkpoints import (
    MAX_FAILURES,
    CheckpointRegistry,
    already_handled,
    event_spec,
    failed_earlier,
)
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


def test_claims_failures_and_their_count(lab):
    models, seen = lab
    models.write_bytes("m/a.pth", A)
    uri = models.uri("m/a.pth")
    seen.remember(seen.identify(uri), uri, "mobilenet_v2")
    claimed = seen.claim(sha(A), "run-1", "fr-1", event_id="e1")
    assert claimed.outcome == "pending" and claimed.flow_run_id == "fr-1"
    assert already_handled(claimed) == "already pending in run run-1"
    failed = seen.mark_failed(sha(A), "run-1", "StoreError: s3 unreachable\ntraceback ...")
    assert failed.outcome == "failed" and failed.flow_run_id is None and failed.failures == 1
    assert already_handled(failed) is None                      # failed: quantize it again
    assert failed_earlier(failed) == "failed earlier: StoreError: s3 unreachable"
    assert failed_earlier(claimed) is None
    retried = seen.reset(sha(A))                                # announced again
    assert retried.outcome == "pending" and already_handled(retried) is None
    seen.claim(sha(A), "run-2", "fr-2")
    assert seen.mark_failed(sha(A), "run-2", "boom").failures == 2
    seen.claim(sha(A), "run-3", "fr-3")
    done = seen.mark_quantized(sha(A), "run-3")
    assert done.failures == 0 and done.flow_run_id is None and done.reason is None


def test_discover_announces_a_failed_content_again_until_it_fails_too_often(lab):
    models, seen = lab
    models.write_bytes("mnv2/a/model.pth", A)
    prefix, uri = models.uri("mnv2/"), models.uri("mnv2/a/model.pth")
    assert [f.uri for f in seen.discover([prefix], "mobilenet_v2")] == [uri]
    for attempt in range(1, MAX_FAILURES + 1):
        seen.claim(sha(A), f"run-{attempt}", f"fr-{attempt}")
        seen.mark_failed(sha(A), f"run-{attempt}", f"RuntimeError: attempt {attempt}")
        again = seen.discover([prefix], "mobilenet_v2")
        if attempt < MAX_FAILURES:
            assert [(f.uri, f.failed_earlier) for f in again] == [
                (uri, f"failed earlier: RuntimeError: attempt {attempt}")]
            assert seen.get(sha(A)).outcome == "pending"          # announced: pending again
            assert seen.discover([prefix], "mobilenet_v2") == []  # so not twice
        else:
            assert again == []                                     # failed too often in a row
            assert seen.get(sha(A)).failures == MAX_FAILURES
    # new bytes under the same key: a new checkpoint, announced as new
    models.write_bytes("mnv2/a/model.pth", B)
    assert [(f.sha256, f.failed_earlier) for f in seen.discover([prefix], "mobilenet_v2")] == [
        (sha(B), None)]


def test_discover_announces_a_content_whose_claiming_run_ended_without_an_outcome(lab):
    models, seen = lab
    models.write_bytes("mnv2/a/model.pth", A)
    prefix = models.uri("mnv2/")
    seen.discover([prefix], "mobilenet_v2")
    seen.claim(sha(A), "run-1", "fr-1")
    asked = []

    def still_running(flow_run_id):
        asked.append(flow_run_id)
        return None
    assert seen.discover([prefix], "mobilenet_v2", ended=still_running) == []
    assert asked == ["fr-1"] and seen.get(sha(A)).flow_run_id == "fr-1"
    (again,) = seen.discover([prefix], "mobilenet_v2", ended=lambda flow_run_id: "Crashed")
    assert again.failed_earlier == ("failed earlier: run run-1 ended (Crashed) without "
                                    "recording an outcome")
    record = seen.get(sha(A))
    assert record.outcome == "pending" and record.flow_run_id is None and record.failures == 1


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


def test_a_run_that_records_its_outcome_while_asked_about_keeps_it(lab):
    """The claiming run finishes between the read of its claim and the question whether it
    ended: its outcome stands, it is not recorded as failed."""
    models, seen = lab
    models.write_bytes("mnv2/a/model.pth", A)
    seen.discover([models.uri("mnv2/")], "mobilenet_v2")
    claimed = seen.claim(sha(A), "run-1", "fr-1")

    def finishes_meanwhile(flow_run_id):
        seen.mark_quantized(sha(A), "run-1")
        return "Completed"
    record = seen.release_if_ended(claimed, finishes_meanwhile)
    assert record.outcome == "quantized" and record.failures == 0
    assert seen.get(sha(A)).outcome == "quantized"
    assert seen.discover([models.uri("mnv2/")], "mobilenet_v2") == []
