"""The `quantize` flow: float checkpoint + ImageFolder data -> int8 TorchScript models.

    python flows/quantize.py run.yaml        # a local run against the ephemeral Prefect API
    quantlab run run.yaml                     # the same, through the CLI

Stages: validate, stage data, float baseline, PTQ variants in parallel, multi-epoch QAT on
gloo workers, convert and script, benchmark, report. The run's manifest is written last.
Staging and the float evaluation are reused from an earlier run with the same content. The PTQ
variants fan out on the flow's threads, or over a Dask cluster when `config.dask_address` is set.
"""

from __future__ import annotations

import sys

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from quantlab.config import RunConfig
from tasks import stages
from tasks.progress import Progress
from tasks.runners import fan_out


def with_flow_run_id(config: RunConfig) -> RunConfig:
    """Without a run id, the run takes its id from the flow run, which keeps its id when it is
    retried: a retry resumes the same run (its QAT checkpoints) instead of starting afresh."""
    if config.run_id is None and flow_run.id is not None:
        return config.model_copy(update={"run_id": f"flow-{flow_run.id}"})
    return config


@flow(name="quantize", task_runner=ThreadPoolTaskRunner(max_workers=4))
def quantize(config: RunConfig) -> dict:
    """Quantize a float classifier with PTQ and QAT, benchmark, and store everything."""
    config = with_flow_run_id(config)
    progress = Progress(run_label=config.model.name)
    num_classes = stages.preflight(config)
    progress.done("validate")
    run = stages.start_run(config)
    staged = stages.stage_data(config)
    progress.done("stage")
    float_eval = stages.evaluate_float(config, staged)
    results = [stages.export_float(config, staged, run, float_eval)]
    progress.done("float")

    with fan_out(config.dask_address) as submit:
        ptq = [submit(stages.ptq_variant, config=config, staged=staged, run=run, variant=v)
               for v in config.variants]
        results += [f.result(timeout=stages.TIMEOUTS["ptq"]) for f in ptq]
    progress.done("ptq")

    epochs: list[dict] = []
    if config.qat.enabled:
        epochs = stages.train_qat(config, staged, run, num_classes, progress)
        progress.done("qat")
        results.append(stages.export_qat(config, staged, run, num_classes))
    progress.done("qat-export")

    latencies = stages.benchmark(config, run, [r.artifact for r in results])
    progress.done("benchmark")
    manifest = stages.finalize(config, run, staged, results, latencies, epochs)
    progress.done("report")
    return {"run_id": run.run_id, "store": config.store, "selected": manifest.selected.variant,
            "results": [r.model_dump() for r in manifest.results]}


if __name__ == "__main__":
    from quantlab.config import load_config

    quantize(load_config(sys.argv[1]))
