"""Content-keyed caching of the stages worth skipping: staging and the float evaluation.

A re-run with the same float checkpoint and dataset reuses the earlier results instead of
staging and evaluating again. Keys come from content, never from a URI alone:

- staging: the dataset's listing (every file's path, size and ETag or mtime), its URI, the
  local cache folder and whether undecodable images are skipped;
- float evaluation: the checkpoint's bytes (sha256, or the ETag of an S3 object), the
  dataset's fingerprint and skipped images, the model and evaluation settings, and the code versions.

Results are persisted in Prefect's result storage (PREFECT_LOCAL_STORAGE_PATH, by default
$PREFECT_HOME/storage); PREFECT_TASKS_REFRESH_CACHE=true recomputes them. A cache hit is
logged in the task's log ("skipped: ...").
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.logging.loggers import task_run_logger

from quantlab import data, pipeline
from quantlab.config import RunConfig
from quantlab.data import StagedData
from quantlab.store import content_hash


def _key(stage: str, *parts: Any) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return f"quantlab-{stage}-{digest[:40]}"


def dataset_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Staging is skipped while the dataset's listing is unchanged (one listing, no reads)."""
    cfg: RunConfig = parameters["config"]
    fingerprint = data.dataset_fingerprint(cfg.data.uri, cfg.storage_options)
    return _key("stage", cfg.data.uri, os.path.expanduser(cfg.cache_dir), fingerprint,
                cfg.data.skip_bad_images)


def float_eval_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The float evaluation is skipped while checkpoint bytes, data and settings are unchanged."""
    cfg: RunConfig = parameters["config"]
    staged: StagedData = parameters["staged"]
    versions = {k: v for k, v in pipeline.versions().items() if k in ("quantlab", "torch", "torchvision")}
    return _key("evaluate-float", content_hash(cfg.model.checkpoint, cfg.storage_options),
                staged.fingerprint, staged.skipped, cfg.model.name, cfg.model.kwargs,
                cfg.data.model_dump(mode="json", include={"eval_batch_size", "max_eval_batches",
                                                          "transforms"}), versions)


def log_cache_hit(reason: str):
    """An on_completion hook that says, in the task's log, that a cached result was used."""
    def report_cache_hit(task, task_run: TaskRun, state: State) -> None:
        if state.name == "Cached":
            task_run_logger(task_run, task).info(
                "skipped because cached: %s, so the result of an earlier run is reused", reason)
    return report_cache_hit
