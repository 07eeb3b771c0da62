"""Checkpoint events: emit them to the Prefect API, and what a run that an event started does
with the store's seen-set (quantlab.checkpoints) before and after it quantizes: `claim` the
content first (or end at once), then `record_outcome` (quantized, rejected, or failed).

`emit` is what `quantlab announce`, the watcher flow and the quantize flow call; the event's
shape (name, resource, payload) is quantlab.checkpoints.event_spec's.
"""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from pydantic import BaseModel, Field

from quantlab.checkpoints import (
    DUPLICATE,
    FAILED,
    QUANTIZED,
    REJECTED,
    CheckpointRecord,
    CheckpointRegistry,
    already_handled,
    event_spec,
    failed_earlier,
)
from quantlab.config import RunConfig
from quantlab.registry import TriggerInfo
from quantlab.store import Store
from quantlab_tasks.steps import IO_RETRIES, TIMEOUTS


def api_url() -> str | None:
    """The Prefect API that events go to; None: an ephemeral API that ends with this process."""
    return PREFECT_API_URL.value() or None


def emit(event: str, sha256: str, model: str, uri: str, flush: bool = False,
         **payload: Any) -> dict[str, Any]:
    """Emit one checkpoint event; returns what was emitted (id, event, resource, payload).

    `flush`: wait until the event has been sent (a short-lived process such as the CLI exits
    right after; Prefect's events worker sends in the background).
    """
    spec = event_spec(event, sha256, model, uri, **payload)
    sent = emit_event(**spec)
    if flush:
        EventsWorker.drain_all(timeout=30)
    return {"id": str(sent.id) if sent is not None else None, **spec}


class CheckpointTrigger(BaseModel):
    """The `trigger` parameter of a quantize run that a checkpoint event started (prefect.yaml
    templates it from the event: `{{ event.id }}`, `{{ event.payload.sha256 }}`, ...)."""

    source: Literal["announce", "watcher"]
    event_id: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")   # None: hashed by the run
    force: bool = False                                          # re-quantize the same content


def trigger_info(trigger: CheckpointTrigger | None, sha256: str | None = None) -> TriggerInfo:
    """What the manifest records: the event that started the run, or schedule / manual."""
    if trigger is not None:
        return TriggerInfo(kind=trigger.source, event_id=trigger.event_id,
                           checkpoint_sha256=sha256 or trigger.sha256)
    ctx = FlowRunContext.get()
    scheduled = bool(ctx and ctx.flow_run and ctx.flow_run.auto_scheduled)
    return TriggerInfo(kind="schedule" if scheduled else "manual", checkpoint_sha256=sha256)


def _registry(config: RunConfig) -> CheckpointRegistry:
    return CheckpointRegistry(Store(config.store, config.storage_options))


def failure_reason(error: BaseException) -> str:
    """The one line a failed run records: the exception's type and its message's first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def flow_run_ended(flow_run_id: str) -> str | None:
    """How the flow run ended ("Crashed", "not found", ...), or None while it may still run:
    a run that claimed a checkpoint and ended without an outcome (killed, cancelled) is stale."""
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except ObjectNotFound:
        return "not found"
    except Exception as e:  # the API is unreachable: count the claim as live, start nothing
        get_run_logger().warning("flow run %s not read (%s): taken as still running",
                                 flow_run_id, failure_reason(e))
        return None
    return state.name if state is not None and state.is_final() else None


@task(name="claim-checkpoint", cache_policy=NO_CACHE, tags=["quantlab", "store"],
      timeout_seconds=TIMEOUTS["store"], **IO_RETRIES)
def claim(config: RunConfig, trigger: CheckpointTrigger) -> str | None:
    """The checkpoint's sha256, now claimed by this run, if it should quantize it; None (logged,
    and an `already-quantized` event) if it was quantized or rejected (unless forced) or is
    pending in another run that is still going (forced or not: never two at once)."""
    logger = get_run_logger()
    seen = _registry(config)
    uri = config.model.checkpoint
    sha256 = trigger.sha256 or seen.identify(uri, options=config.storage_options)
    record, _ = seen.remember(sha256, uri, config.model.name, trigger.event_id)
    me = str(flow_run.id)
    if record.flow_run_id != me:  # (== me: this flow run's own claim, and the run is retried)
        record = seen.release_if_ended(record, flow_run_ended)  # a claim of a dead run: failed
        if failed := failed_earlier(record):
            logger.info("checkpoint %s (sha256 %s): %s; retrying", uri, sha256[:12], failed)
        elif why := already_handled(record):
            if record.outcome == "pending" or not trigger.force:  # never two runs at once
                return _nothing_to_do(config, sha256, record, trigger)
            logger.info("checkpoint %s: %s; re-quantizing it (forced)", uri, why)
    seen.claim(sha256, config.run_id or f"flow-{me}", me, trigger.event_id)
    # Two runs that claimed at once: the store keeps the last write; only its run goes on.
    if (record := seen.get(sha256)).flow_run_id != me:
        return _nothing_to_do(config, sha256, record, trigger)
    return sha256


def _nothing_to_do(config: RunConfig, sha256: str, record: CheckpointRecord,
                   trigger: CheckpointTrigger) -> None:
    why, uri = already_handled(record), config.model.checkpoint
    hint = "" if record.outcome == "pending" else " (force: true re-quantizes it)"
    get_run_logger().info("checkpoint %s (sha256 %s): %s; nothing to do%s", uri, sha256[:12],
                          why, hint)
    emit(DUPLICATE, sha256, config.model.name, uri, run_id=record.run_id,
         outcome=record.outcome, message=why, event_id=trigger.event_id)


@task(name="record-checkpoint", cache_policy=NO_CACHE, tags=["quantlab", "store"],
      timeout_seconds=TIMEOUTS["store"], **IO_RETRIES)
def record_outcome(config: RunConfig, sha256: str,
                   outcome: Literal["quantized", "rejected", "failed"], run_id: str | None = None,
                   reason: str | None = None) -> None:
    """Remember what became of the checkpoint, and say so in an event: quantized as run_id,
    rejected (a bad checkpoint: not retried) or failed (anything else: tried again), with the
    reason. A failure is recorded only while this run's claim stands: not over an outcome the
    run recorded already (rejected; quantized before the gate failed it), nor over a run that
    took the claim over."""
    seen, uri, model = _registry(config), config.model.checkpoint, config.model.name
    logger = get_run_logger()
    record, _ = seen.remember(sha256, uri, model)
    if outcome == "failed":
        if record.outcome != "pending" or record.flow_run_id != str(flow_run.id):
            return
        record = seen.mark_failed(sha256, run_id, reason)
        logger.error("checkpoint %s: run %s failed (%s); the next announcement of it retries it",
                     uri, run_id, record.reason)
        emit(FAILED, sha256, model, uri, run_id=run_id, reason=record.reason)
    elif outcome == "rejected":
        seen.mark_rejected(sha256, reason)
        logger.error("checkpoint %s rejected: %s", uri, reason)
        emit(REJECTED, sha256, model, uri, reason=reason.splitlines()[0])
    else:
        seen.mark_quantized(sha256, run_id)
        emit(QUANTIZED, sha256, model, uri, run_id=run_id)
