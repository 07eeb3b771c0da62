"""The `quantize` flow: float checkpoint + ImageFolder data -> int8 models (TorchScript, AOTI, ONNX, OpenVINO IR).

    python flows/quantize.py run.yaml        # a local run against the ephemeral Prefect API
    quantlab run run.yaml                     # the same, through the CLI

Stages: validate, stage data (every image decoded; only then does the run start in the
store), float baseline, PTQ variants and the nncf-ptq peer in parallel (eager ones scripted
and exported to ONNX and OpenVINO IR and checked in every runtime, PT2E ones compiled to
AOTInductor packages), per-layer sensitivity and the float-fallback variant, multi-epoch QAT
on gloo workers (a variant per backend), convert and package,
benchmark, regression gate, report. The run's manifest is written last. If the gate finds a
regression against the previous best-<model>, the run is recorded as rejected (`best` stays)
and the flow run fails with the gate's reason.
Staging and the float evaluation are reused from an earlier run with the same content. The PTQ
variants fan out on the flow's threads, or over a Dask cluster when `config.dask_address` is set.
A run that a `quantlab.checkpoint.landed` event started (the deployment's trigger) takes the
event's checkpoint and claims it in the store's seen-set first (quantlab.checkpoints), then
records what became of it there: quantized, rejected (a bad checkpoint) or failed (anything
else, tried again on its next announcement); its manifest records what triggered it.
"""

from __future__ import annotations

import sys

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from quantlab import pipeline
from quantlab.config import RunConfig
from quantlab.errors import CheckpointError, RegressionError
from quantlab.pipeline import Outcome
from quantlab_tasks import events, setup_logging, steps
from quantlab_tasks.events import CheckpointTrigger
from quantlab_tasks.progress import Progress
from quantlab_tasks.runners import fan_out


def with_flow_run_id(config: RunConfig) -> RunConfig:
    """Without a run id, the run takes its id from the flow run, which keeps its id when it is
    retried: a retry resumes the same run (its QAT checkpoints) instead of starting afresh."""
    if config.run_id is None and flow_run.id is not None:
        return config.model_copy(update={"run_id": f"flow-{flow_run.id}"})
    return config


def with_checkpoint(config: RunConfig, checkpoint: str | None) -> RunConfig:
    """The config with the float checkpoint that an event named (None: the config's own)."""
    if not checkpoint:
        return config
    return config.model_copy(update={"model": config.model.model_copy(
        update={"checkpoint": checkpoint})})


@flow(name="quantize", task_runner=ThreadPoolTaskRunner(max_workers=4))
def quantize(config: RunConfig, validated: bool = False, checkpoint: str | None = None,
             trigger: CheckpointTrigger | None = None) -> Outcome | None:
    """Quantize a float classifier with PTQ and QAT, benchmark, and store everything.

    `validated`: the caller has already run the preflight checks (`quantlab run` does, before
    Prefect starts); a scheduled or triggered run leaves it False.
    `checkpoint`: a float checkpoint URI that replaces the config's (a deployment trigger
    templates it from a `quantlab.checkpoint.landed` event); `trigger`: that event. A
    triggered run first claims the content in the store's seen-set: content already quantized
    (or rejected) ends the run at once with a log line and an event, unless `trigger.force`,
    and so does content that another run is quantizing (pending in run R), forced or not.
    """
    setup_logging()
    config = with_flow_run_id(with_checkpoint(config, checkpoint))
    if trigger is None:
        return _stages(config, validated)
    sha256 = events.claim(config, trigger)
    if sha256 is None:
        return None
    try:
        return _stages(config, validated, trigger, sha256)
    except Exception as e:  # Prefect's cancellation and termination signals are not: the
        # claim of a run they end goes stale, and the next trigger or watcher pass takes it over
        try:
            events.record_outcome(config, sha256, "failed", run_id=config.run_id,
                                  reason=events.failure_reason(e))
        except Exception as unrecorded:  # the run's own error is the one to see; the next
            # trigger of the content takes this finished run's claim over
            get_run_logger().warning("outcome of checkpoint %s not recorded: %s",
                                     config.model.checkpoint, events.failure_reason(unrecorded))
        raise


def _stages(config: RunConfig, validated: bool, trigger: CheckpointTrigger | None = None,
            sha256: str | None = None) -> Outcome:
    """The pipeline, validate to report; a triggered run records its checkpoint's outcome."""
    progress = Progress(run_label=config.model.name)
    if not validated:
        try:
            steps.preflight(config)
        except CheckpointError as e:  # bad file, wrong classes: remembered, not retried
            if sha256 is not None:
                events.record_outcome(config, sha256, "rejected", reason=str(e))
            raise
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
        if config.nncf_peer:
            ptq.append(submit(steps.nncf_peer, config=config, staged=staged, run=run))
        results += [f.result(timeout=steps.TIMEOUTS["ptq"]) for f in ptq]
    progress.done("ptq")
    ranking = None
    base_name = pipeline.sensitivity_base(config, results, float_eval)
    if base_name:
        ranking = steps.sensitivity(config, staged, run, base_name)
        if config.fallback_name:
            base = next(r for r in results if r.variant == ranking.variant)
            results.append(steps.ptq_fallback(config, staged, run, base, float_eval, ranking))
    progress.done("fallback")

    epochs: list[dict] = []
    for _, backend in config.qat_variants():  # qat-x86 (eager), then qat-pt2e-x86 (pt2e)
        epochs += steps.train_qat(config, staged, run, progress, backend)
    progress.done("qat")
    for _, backend in config.qat_variants():
        results.append(steps.export_qat(config, staged, run, backend))
    progress.done("qat-export")

    latencies = steps.benchmark(config, run, results)
    progress.done("benchmark")
    pairs, rows, selected = pipeline.select(config, results, latencies)
    gate = None
    if config.gate.enabled:
        gate = steps.regression_gate(config, run, staged, results, selected)
    progress.done("gate")
    outcome = steps.finalize(config, run, staged, results, pairs, rows, selected, epochs,
                             ranking, gate, events.trigger_info(trigger, sha256))
    progress.done("report")
    if sha256 is not None:
        events.record_outcome(config, sha256, "quantized", run_id=run.run_id)
    if gate is not None and not gate.passed:
        raise RegressionError(f"run {run.run_id} rejected, best-{config.model.name} not moved: "
                              f"{gate.reason}")
    return outcome


if __name__ == "__main__":
    from quantlab.config import load_config
    from quantlab_flows import set_prefect_defaults

    set_prefect_defaults()
    quantize(load_config(sys.argv[1]))
