"""Checkpoint events: emit them to the Prefect API, and what a run that an event started does
with the store's seen-set (quantlab.checkpoints) before and after it quantizes.

`emit` is what `quantlab announce`, the watcher flow and the quantize flow call; the event's
shape (name, resource, payload) is quantlab.checkpoints.event_spec's.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL
from pydantic import BaseModel, Field

from quantlab.checkpoints import (
    DUPLICATE,
    QUANTIZED,
    REJECTED,
    CheckpointRegistry,
    already_handled,
    event_spec,
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


@task(name="claim-checkpoint", cache_policy=NO_CACHE, tags=["quantlab", "store"],
      timeout_seconds=TIMEOUTS["store"], **IO_RETRIES)
def claim(config: RunConfig, trigger: CheckpointTrigger) -> str | None:
    """The checkpoint's sha256 if this run should quantize it; None if it was already
    quantized or rejected (logged, and an `already-quantized` event), unless forced."""
    logger = get_run_logger()
    seen = _registry(config)
    uri = config.model.checkpoint
    sha256 = trigger.sha256 or seen.identify(uri, options=config.storage_options)
    record, _ = seen.remember(sha256, uri, config.model.name, trigger.event_id)
    why = already_handled(record)
    if why and not trigger.force:
        logger.info("checkpoint %s (sha256 %s): %s; nothing to do (force: true re-quantizes it)",
                    uri, sha256[:12], why)
        emit(DUPLICATE, sha256, config.model.name, uri, run_id=record.run_id,
             outcome=record.outcome, message=why, event_id=trigger.event_id)
        return None
    if why:
        logger.info("checkpoint %s: %s; re-quantizing it (forced)", uri, why)
        seen.reset(sha256, trigger.event_id)
    return sha256


@task(name="record-checkpoint", cache_policy=NO_CACHE, tags=["quantlab", "store"],
      timeout_seconds=TIMEOUTS["store"], **IO_RETRIES)
def record_outcome(config: RunConfig, sha256: str, run_id: str | None = None,
                   reason: str | None = None) -> None:
    """Remember the checkpoint as quantized (run_id) or rejected (reason), and say so in an event."""
    seen, uri, model = _registry(config), config.model.checkpoint, config.model.name
    seen.remember(sha256, uri, model)
    if reason is not None:
        seen.mark_rejected(sha256, reason)
        get_run_logger().error("checkpoint %s rejected: %s", uri, reason)
        emit(REJECTED, sha256, model, uri, reason=reason.splitlines()[0])
    else:
        seen.mark_quantized(sha256, run_id)
        emit(QUANTIZED, sha256, model, uri, run_id=run_id)
