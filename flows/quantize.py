"""The `quantize` flow: float checkpoint + ImageFolder data -> int8 TorchScript models.

    python flows/quantize.py run.yaml        # a local run against the ephemeral Prefect API
    quantlab run run.yaml                     # the same, through the CLI

Stages: validate, stage data (every image decoded; only then does the run start in the
store), float baseline, PTQ variants in parallel, per-layer sensitivity
and the float-fallback variant, multi-epoch QAT on gloo workers, convert and script,
benchmark, regression gate, report. The run's manifest is written last. If the gate finds a
regression against the previous best-<model>, the run is recorded as rejected (`best` stays)
and the flow run fails with the gate's reason.
Staging and the float evaluation are reused from an earlier run with the same content. The PTQ
variants fan out on the flow's threads, or over a Dask cluster when `config.dask_address` is set.
"""

from __future__ import annotations

import sys

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from quantlab import pipeline
from quantlab.config import RunConfig
from quantlab.errors import RegressionError
from quantlab.pipeline import Outcome
from quantlab_tasks import setup_logging, steps
from quantlab_tasks.progress import Progress
from quantlab_tasks.runners import fan_out


def with_flow_run_id(config: RunConfig) -> RunConfig:
    """Without a run id, the run takes its id from the flow run, which keeps its id when it is
    retried: a retry resumes the same run (its QAT checkpoints) instead of starting afresh."""
    if config.run_id is None and flow_run.id is not None:
        return config.model_copy(update={"run_id": f"flow-{flow_run.id}"})
    return config


@flow(name="quantize", task_runner=ThreadPoolTaskRunner(max_workers=4))
def quantize(config: RunConfig, validated: bool = False) -> Outcome:
    """Quantize a float classifier with PTQ and QAT, benchmark, and store everything.

    `validated`: the caller has already run the preflight checks (`quantlab run` does, before
    Prefect starts); a scheduled or triggered run leaves it False.
    """
    setup_logging()
    config = with_flow_run_id(config)
    progress = Progress(run_label=config.model.name)
    if not validated:
        steps.preflight(config)
    progress.done("validate")
    staged = steps.stage_data(config)  # decodes every image: bad data fails before any write
    progress.done("stage")
    run = steps.start_run(config)
    float_eval = steps.evaluate_float(config, staged)
    results = [steps.export_float(config, staged, run, float_eval)]
    progress.done("float")

    with fan_out(config.dask_address) as submit:
        ptq = [submit(steps.ptq_variant, config=config, staged=staged, run=run, variant=v)
               for v in config.variants]
        results += [f.result(timeout=steps.TIMEOUTS["ptq"]) for f in ptq]
    progress.done("ptq")
    ranking = None
    if config.sensitivity_variant:
        ranking = steps.sensitivity(config, staged, run)
        if config.fallback_name:
            base = next(r for r in results if r.variant == ranking.variant)
            results.append(steps.ptq_fallback(config, staged, run, base, float_eval, ranking))
    progress.done("fallback")

    epochs: list[dict] = []
    if config.qat.enabled:
        epochs = steps.train_qat(config, staged, run, progress)
        progress.done("qat")
        results.append(steps.export_qat(config, staged, run))
    progress.done("qat-export")

    latencies = steps.benchmark(config, run, [r.artifact for r in results])
    progress.done("benchmark")
    rows, selected = pipeline.select(config, results, latencies)
    gate = None
    if config.gate.enabled:
        gate = steps.regression_gate(config, run, staged, results, selected)
    progress.done("gate")
    outcome = steps.finalize(config, run, staged, results, rows, selected, epochs, ranking, gate)
    progress.done("report")
    if gate is not None and not gate.passed:
        raise RegressionError(f"run {run.run_id} rejected, best-{config.model.name} not moved: "
                              f"{gate.reason}")
    return outcome


if __name__ == "__main__":
    from quantlab.config import load_config

    quantize(load_config(sys.argv[1]))
