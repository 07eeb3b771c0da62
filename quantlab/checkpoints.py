"""The float checkpoints a store has seen: by content, with what became of each.

A training job writes checkpoints under prefixes (`s3://models/mobilenet_v2/2026-12-01/model.pth`);
`quantlab announce` or the watcher flow tells Prefect about each new one, and the `quantize`
flow records the outcome here. Identity is the sha256 of the bytes, so the same content under
another key is the same checkpoint, quantized once:

    <store>/checkpoints/content/<sha256>.json   one record per content: model, URIs, outcome
    <store>/checkpoints/uris/<sha256 of URI>.json   URI -> (ETag, sha256): an unchanged object
                                                is not downloaded again to hash it

    seen = CheckpointRegistry(Store("s3://quantlab/lab"))
    for new in seen.discover(["s3://models/mobilenet_v2/"], model="mobilenet_v2"):
        ...  # emit one event per new content (flows/watch.py)
    seen.mark_quantized(sha256, run_id="20261201-013000-ab12cd")

Outcomes:
- pending: announced; once a run has claimed it (`claim`), that run is quantizing it, and a
  second trigger of the same content ends at once ("already pending in run R");
- quantized (as run R: promoted or not, the gate decides): not announced again unless forced;
- rejected (the checkpoint failed validation, with the one-line reason): likewise;
- failed (its run failed for another reason, with the one-line reason): tried again, by the
  watcher's next pass (while it has failed fewer than MAX_FAILURES times in a row) and by
  `quantlab announce` without --force.
Nothing here imports prefect.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from quantlab.config import NAME_PATTERN
from quantlab.errors import CheckpointError, NotFoundError
from quantlab import store as st
from quantlab.store import PREFLIGHT_RETRY_DELAYS, Store, list_files, normalize_uri

log = logging.getLogger(__name__)
PREFIX = "checkpoints"
SUFFIXES = (".pth", ".pt")          # what the watcher takes for a float checkpoint
# Prefect event names (built here as plain dicts; tasks/ emits them).
LANDED = "quantlab.checkpoint.landed"                    # a new checkpoint: quantize it
DUPLICATE = "quantlab.checkpoint.already-quantized"     # same content again: nothing to do
REJECTED = "quantlab.checkpoint.rejected"                # it failed validation
QUANTIZED = "quantlab.checkpoint.quantized"              # the run finished
FAILED = "quantlab.checkpoint.failed"                    # the run failed: tried again
SOURCES = ("announce", "watcher")                        # who emitted a `landed` event
Outcome = Literal["pending", "quantized", "rejected", "failed"]
# Runs of one content that may fail in a row before the watcher stops announcing it again on
# every pass (a failure that repeats would otherwise cost a run every pass, for ever);
# `quantlab announce` retries it regardless.
MAX_FAILURES = 3


class CheckpointRecord(BaseModel):
    """One checkpoint content and what became of it."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model: str = Field(pattern=NAME_PATTERN)
    uris: list[str]                          # every URI it was seen under, first first
    outcome: Outcome = "pending"
    run_id: str | None = None                # quantized as, failed in, or (pending) claimed by
    flow_run_id: str | None = None           # pending: the Prefect flow run that claimed it
    reason: str | None = None                # why it was rejected, or its run failed (one line)
    failures: int = 0                        # runs of it that failed in a row
    event_id: str | None = None              # the event that announced it
    first_seen: datetime
    updated_at: datetime


class UriEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str
    etag: str                                # "" where the backend has none: always re-hash
    sha256: str


class NewCheckpoint(BaseModel):
    """A checkpoint to announce, found under a watched prefix: content the store had not seen,
    or whose last run failed (`failed_earlier` says how)."""

    uri: str
    sha256: str
    model: str
    failed_earlier: str | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def split_uri(uri: str) -> tuple[str, str]:
    """(parent folder URI, file name) of an object URI or local path."""
    uri = normalize_uri(uri)
    parent, name = posixpath.split(uri.rstrip("/"))
    if not name:
        raise CheckpointError(f"checkpoint {uri!r} names a folder, not a file")
    return parent, name


def sha256_of(uri: str, options: dict[str, Any] | None = None,
              retry_delays: tuple[float, ...] = PREFLIGHT_RETRY_DELAYS) -> str:
    """The sha256 of an object's bytes, streamed in 1 MiB chunks.

    Gives up after a few seconds on an endpoint that does not answer; a missing object is a
    NotFoundError naming the URI.
    """
    return st.sha256_of(uri, options, retry_delays)


def etag_of(uri: str, options: dict[str, Any] | None = None) -> str:
    """The object's ETag (or size+mtime of a local file); NotFoundError if it does not exist."""
    files = list_files(uri, options)
    if len(files) != 1:
        raise NotFoundError(f"checkpoint {uri} does not exist (or is a folder); expected one file")
    return files[0].etag


def already_handled(record: CheckpointRecord | None) -> str | None:
    """Why a checkpoint needs no new run ("already quantized as run R", "rejected earlier: ...",
    "already pending in run R": a run claimed it and has recorded no outcome yet), or None
    (unseen, announced but not claimed, or failed: quantize it)."""
    if record is None or record.outcome == "failed":
        return None
    if record.outcome == "pending":
        return f"already pending in run {record.run_id}" if record.flow_run_id else None
    if record.outcome == "quantized":
        return f"already quantized as run {record.run_id}"
    return f"rejected earlier: {record.reason}"


def failed_earlier(record: CheckpointRecord | None) -> str | None:
    """"failed earlier: <reason>" for a checkpoint whose last run failed (to be retried), or None."""
    if record is None or record.outcome != "failed":
        return None
    return f"failed earlier: {record.reason}"


def event_spec(event: str, sha256: str, model: str, uri: str, **payload: Any) -> dict[str, Any]:
    """The keyword arguments of prefect.events.emit_event for a checkpoint event.

    The resource is the content (`quantlab.checkpoint.<sha256>`), labelled with the model, so
    that a deployment's trigger matches `quantlab.model`. The payload holds URIs, hashes and
    names only: never credentials or storage options.
    """
    return {"event": event,
            "resource": {"prefect.resource.id": f"quantlab.checkpoint.{sha256}",
                         "prefect.resource.name": uri, "quantlab.model": model},
            "payload": {"checkpoint": uri, "sha256": sha256, "model": model, **payload}}


class CheckpointRegistry:
    """The seen-set of a store: checkpoint contents, their URIs, and their outcomes."""

    def __init__(self, store: Store):
        self.store = store

    # -- paths ---------------------------------------------------------------------------
    @staticmethod
    def _record_path(sha256: str) -> str:
        return f"{PREFIX}/content/{sha256}.json"

    @staticmethod
    def _uri_path(uri: str) -> str:
        return f"{PREFIX}/uris/{hashlib.sha256(normalize_uri(uri).encode()).hexdigest()}.json"

    # -- reads ---------------------------------------------------------------------------
    def get(self, sha256: str) -> CheckpointRecord | None:
        """The record of a content, or None if the store has not seen it."""
        rel = self._record_path(sha256)
        if not self.store.exists(rel):
            return None
        return CheckpointRecord.model_validate(self.store.read_json(rel))

    def records(self) -> list[CheckpointRecord]:
        """Every record, oldest first (one listing of checkpoints/content/)."""
        out = [CheckpointRecord.model_validate(self.store.read_json(f"{PREFIX}/content/{f.relpath}"))
               for f in self.store.find(f"{PREFIX}/content") if f.relpath.endswith(".json")]
        return sorted(out, key=lambda r: r.first_seen)

    def identify(self, uri: str, etag: str | None = None,
                 options: dict[str, Any] | None = None) -> str:
        """The sha256 of the object at `uri`; hashed only if its ETag changed since last time.

        `etag`: from a listing the caller already made (the watcher's); None: look it up.
        """
        uri = normalize_uri(uri)
        if etag is None:
            etag = etag_of(uri, options)
        rel = self._uri_path(uri)
        if etag and self.store.exists(rel):
            known = UriEntry.model_validate(self.store.read_json(rel))
            if known.etag == etag:
                return known.sha256
        sha256 = sha256_of(uri, options)
        self.store.write_json(rel, UriEntry(uri=uri, etag=etag, sha256=sha256).model_dump())
        return sha256

    # -- writes --------------------------------------------------------------------------
    def remember(self, sha256: str, uri: str, model: str,
                 event_id: str | None = None) -> tuple[CheckpointRecord, bool]:
        """Record `uri` as holding content `sha256`; returns (record, whether the content is new).

        A new content is recorded as pending; a known one gains the URI and keeps its outcome.
        """
        uri = normalize_uri(uri)
        record = self.get(sha256)
        now = _now()
        if record is None:
            record = CheckpointRecord(sha256=sha256, model=model, uris=[uri], event_id=event_id,
                                      first_seen=now, updated_at=now)
            self._write(record)
            return record, True
        if uri not in record.uris:
            record = record.model_copy(update={"uris": [*record.uris, uri], "updated_at": now})
            self._write(record)
        return record, False

    def reset(self, sha256: str, event_id: str | None = None) -> CheckpointRecord:
        """Back to pending, claimed by no run (a forced re-quantization, or a failed one tried
        again); the URIs and the count of failures are kept."""
        record = self._require(sha256)
        return self._update(record, outcome="pending", run_id=None, flow_run_id=None, reason=None,
                            event_id=event_id or record.event_id)

    def claim(self, sha256: str, run_id: str, flow_run_id: str,
              event_id: str | None = None) -> CheckpointRecord:
        """Pending, claimed by run `run_id` (Prefect flow run `flow_run_id`), which quantizes it
        now; a second trigger of the content meanwhile ends at once."""
        record = self._require(sha256)
        return self._update(record, outcome="pending", run_id=run_id, flow_run_id=flow_run_id,
                            reason=None, event_id=event_id or record.event_id)

    def mark_quantized(self, sha256: str, run_id: str) -> CheckpointRecord:
        """The content was quantized as run `run_id` (whether the gate promoted it or not)."""
        return self._set(sha256, outcome="quantized", run_id=run_id, flow_run_id=None,
                         reason=None, failures=0)

    def mark_rejected(self, sha256: str, reason: str) -> CheckpointRecord:
        """The content failed validation: remembered, so it is not tried again unless forced."""
        return self._set(sha256, outcome="rejected", run_id=None, flow_run_id=None,
                         reason=_one_line(reason))

    def mark_failed(self, sha256: str, run_id: str | None, reason: str) -> CheckpointRecord:
        """Run `run_id` failed on the content for another reason than the checkpoint itself:
        it is tried again (`discover`, `quantlab announce`)."""
        record = self._require(sha256)
        return self._update(record, outcome="failed", run_id=run_id, flow_run_id=None,
                            reason=_one_line(reason), failures=record.failures + 1)

    def release_if_ended(self, record: CheckpointRecord,
                         ended: Callable[[str], str | None]) -> CheckpointRecord:
        """The record as it stands: if it was pending in a flow run that has ended (killed or
        cancelled before it recorded an outcome) and the store still says so, that run is
        recorded as failed, so the content is tried again.

        `ended(flow_run_id)`: how a flow run ended ("Crashed"), None while it may still run.
        """
        if record.outcome != "pending" or not record.flow_run_id:
            return record
        if (how := ended(record.flow_run_id)) is None:
            return record
        current = self._require(record.sha256)
        if current.outcome != "pending" or current.flow_run_id != record.flow_run_id:
            return current  # it recorded an outcome meanwhile
        return self.mark_failed(record.sha256, record.run_id,
                                f"run {record.run_id} ended ({how}) without recording an outcome")

    def discover(self, prefixes: list[str], model: str, suffixes: tuple[str, ...] = SUFFIXES,
                 options: dict[str, Any] | None = None,
                 ended: Callable[[str], str | None] | None = None) -> list[NewCheckpoint]:
        """Checkpoints under `prefixes` to announce, now remembered: content the store has not
        seen, and content whose last run failed (fewer than MAX_FAILURES times in a row), which
        goes back to pending so that the next pass does not announce it again meanwhile.

        `ended`: see `release_if_ended` (the watcher asks Prefect): a content pending in a run
        that ended without recording an outcome counts as failed, and is announced again.

        One recursive (paginated) listing per prefix; an object whose ETag is unchanged since
        it was last hashed is not read again, and one that changed is hashed again (new bytes
        under the same key are a new content). The same content under two keys is one
        checkpoint (the first key, in listing order).
        """
        found: list[NewCheckpoint] = []
        for prefix in prefixes:
            root = normalize_uri(prefix).rstrip("/")
            for f in list_files(root, options):
                if not f.relpath.endswith(suffixes):
                    continue
                uri = f"{root}/{f.relpath}"
                sha256 = self.identify(uri, f.etag, options)
                record, new = self.remember(sha256, uri, model)
                if ended:
                    record = self.release_if_ended(record, ended)
                failed = failed_earlier(record)
                if failed and record.failures >= MAX_FAILURES:
                    log.debug("%s: %s, %d times in a row: not announced again (quantlab "
                              "announce retries it)", uri, failed, record.failures)
                elif new or failed:
                    if failed:
                        self.reset(sha256)
                    found.append(NewCheckpoint(uri=uri, sha256=sha256, model=model,
                                               failed_earlier=failed))
                elif why := already_handled(record):
                    log.debug("%s: %s", uri, why)
        return found

    def _require(self, sha256: str) -> CheckpointRecord:
        record = self.get(sha256)
        if record is None:
            raise NotFoundError(f"checkpoint content {sha256} is not in {self.store.uri(PREFIX)}")
        return record

    def _set(self, sha256: str, **update: Any) -> CheckpointRecord:
        return self._update(self._require(sha256), **update)

    def _update(self, record: CheckpointRecord, **update: Any) -> CheckpointRecord:
        record = record.model_copy(update={**update, "updated_at": _now()})
        self._write(record)
        return record

    def _write(self, record: CheckpointRecord) -> None:
        self.store.write_json(self._record_path(record.sha256), record.model_dump(mode="json"))


def _one_line(reason: str) -> str:
    lines = reason.strip().splitlines()
    return lines[0] if lines else reason
