"""The `quantlab-watch` flow: find float checkpoints that landed under watched prefixes and
emit one `quantlab.checkpoint.landed` event for each new content.

    python flows/watch.py s3://quantlab/lab mobilenet_v2 s3://models/mobilenet_v2/

Deployed as `quantlab-watch/checkpoints` (deploy/prefect.yaml) on a short interval schedule;
the `quantize` deployment's trigger turns each event into a run. What was seen is remembered
in the store (quantlab.checkpoints: by content sha256, with a URI+ETag index so that an
unchanged object is not read again), not only in Prefect's database: the same bytes under
another key, or a checkpoint that was rejected, produce no event; one whose run failed (or
ended without recording an outcome) is announced again, until it has failed
quantlab.checkpoints.MAX_FAILURES times in a row.
"""

from __future__ import annotations

import sys

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from quantlab.checkpoints import LANDED, SUFFIXES, CheckpointRegistry, NewCheckpoint
from quantlab.store import Store
from quantlab_tasks import setup_logging
from quantlab_tasks.events import emit, flow_run_ended
from quantlab_tasks.steps import IO_RETRIES, TIMEOUTS


@task(name="discover-checkpoints", cache_policy=NO_CACHE, tags=["quantlab", "store"],
      timeout_seconds=TIMEOUTS["store"], **IO_RETRIES)
def discover(store: str, model: str, prefixes: list[str],
             suffixes: tuple[str, ...]) -> list[NewCheckpoint]:
    """List each prefix once; the checkpoints whose content the store has not seen, or whose
    last run failed."""
    return CheckpointRegistry(Store(store)).discover(prefixes, model, suffixes,
                                                     ended=flow_run_ended)


@flow(name="quantlab-watch")
def watch(store: str, model: str, prefixes: list[str],
          suffixes: tuple[str, ...] = SUFFIXES) -> list[str]:
    """Emit one `quantlab.checkpoint.landed` event per new checkpoint, or per checkpoint whose
    last run failed; returns their URIs.

    `store`: the quantlab store whose seen-set is consulted (the quantize deployment's);
    `model`: the architecture, which the event's resource is labelled with (the quantize
    deployment for that model matches it); `prefixes`: where training writes checkpoints.
    """
    setup_logging()
    logger = get_run_logger()
    found = discover(store, model, prefixes, tuple(suffixes))
    for new in found:
        sent = emit(LANDED, new.sha256, new.model, new.uri, source="watcher", force=False)
        what = f"{new.failed_earlier}; retrying" if new.failed_earlier else "new"
        logger.info("checkpoint %s (sha256 %s): %s; emitted %s, event id %s", new.uri,
                    new.sha256[:12], what, LANDED, sent["id"])
    if not found:
        logger.info("no new checkpoint under %s", ", ".join(prefixes))
    return [new.uri for new in found]


if __name__ == "__main__":
    from quantlab_flows import set_prefect_defaults

    set_prefect_defaults()
    watch(sys.argv[1], sys.argv[2], sys.argv[3:])
