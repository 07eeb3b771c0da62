"""Staging and the float evaluation are cached by content: a re-run skips them, and says so."""

import pathlib
import shutil

import torch
from quantlab_tasks.caching import dataset_key, float_eval_key

from quantlab import pipeline
from quantlab.config import FormatsConfig
from tests.support import make_config, write_tiny_dataset


def task_states_and_logs(flow_run_id) -> tuple[dict[str, str], list[str]]:
    """{task run name: state name} and the log lines of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}, [log.message for log in logs]


def test_rerun_skips_staging_and_float_evaluation(completed_run, tmp_path):
    from quantlab_flows.quantize import quantize

    cfg, first = completed_run
    # Same checkpoint and data; a smaller run (no QAT, one variant, no sensitivity, regression
    # gate or exports) is enough to show the cache. Its own store: the shared run's aliases
    # stay put.
    cfg = cfg.model_copy(update={"store": str(tmp_path / "store"), "variants": cfg.variants[:1],
                                 "formats": FormatsConfig(export=(), nncf_peer=False),
                                 "qat": cfg.qat.model_copy(update={"enabled": False}),
                                 "sensitivity": cfg.sensitivity.model_copy(update={"enabled": False}),
                                 "gate": cfg.gate.model_copy(update={"enabled": False})})
    state = quantize(cfg, return_state=True)
    assert state.is_completed()
    assert state.result().manifest.run_id != first.manifest.run_id
    states, logs = task_states_and_logs(state.state_details.flow_run_id)
    cached = sorted(name.rsplit("-", 1)[0] for name, s in states.items() if s == "Cached")
    assert cached == ["evaluate-float", "stage-data"]
    assert states["ptq-ptq-minmax"] == "Completed" and len(states) == 8
    skipped = [line for line in logs if line.startswith("skipped because cached")]
    assert len(skipped) == 2 and any("checkpoint bytes" in line for line in skipped)


def test_cache_keys_follow_content_not_uris(tiny_dataset, tiny_checkpoint, tmp_path):
    data = write_tiny_dataset(str(tmp_path / "data"))
    ckpt = str(tmp_path / "float.pth")
    shutil.copy(tiny_checkpoint, ckpt)
    cfg = make_config(data, ckpt, str(tmp_path / "store"), str(tmp_path / "cache"))
    staged = pipeline.stage(cfg)
    eval_key = float_eval_key(None, {"config": cfg, "staged": staged})
    stage_key = dataset_key(None, {"config": cfg})

    shutil.copy(tiny_checkpoint, ckpt)  # same bytes, new mtime: same key
    assert float_eval_key(None, {"config": cfg, "staged": staged}) == eval_key
    state = torch.load(ckpt, weights_only=True)
    state["classifier.1.bias"] += 1.0
    torch.save(state, ckpt)  # same URI, different bytes: evaluate again
    assert float_eval_key(None, {"config": cfg, "staged": staged}) != eval_key
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval_batch_size": 7})})
    assert float_eval_key(None, {"config": other, "staged": staged}) != eval_key

    assert dataset_key(None, {"config": cfg}) == stage_key
    (tmp_path / "data" / "val" / "cross" / "extra.png").write_bytes(
        (tmp_path / "data" / "val" / "cross" / "000.png").read_bytes())
    assert dataset_key(None, {"config": cfg}) != stage_key


def test_cached_stage_result_is_restaged_when_its_copy_is_gone(tiny_config, s3_bucket, tmp_path):
    from quantlab.store import Store

    uri, src = f"s3://{s3_bucket}/shapes", pathlib.Path(tiny_config.data.uri)
    Store(uri).write_many({f.relpath: (src / f.relpath).read_bytes()
                           for f in pipeline.data.list_dataset(str(src))})
    cfg = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"uri": uri})})
    staged = pipeline.stage(cfg)
    shutil.rmtree(staged.local_path)
    again = pipeline.ensure_staged(cfg, staged)
    assert again.local_path == staged.local_path and again.staged_files == staged.num_train + staged.num_val
