"""The `quantize` pipeline's steps as Prefect tasks, one per quantlab.pipeline step.

Tasks pass small records (URIs, run ids, metric rows); never tensors or modules. I/O tasks
retry with backoff, unless the error is a user's mistake (bad data, checkpoint, settings) or a
refusal by the store, which a retry would meet again; deterministic compute does not retry.
Staging and the float evaluation are cached by content (tasks/caching.py). Every stage has
a timeout and tags; QAT training, the benchmark and the regression gate's timing carry the
`quantlab-compute` tag, whose concurrency limit (created by `quantlab deploy`) gives one heavy
compute stage at a time: two runs never train on one machine at once, nor time each other's load.
"""

from __future__ import annotations

import logging
import re

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from quantlab import pipeline, qat, report
from quantlab.timing import Latency
from quantlab.config import RunConfig, VariantConfig
from quantlab.data import StagedData
from quantlab.errors import QuantlabError, StoreError
from quantlab.evaluate import EvalResult
from quantlab.report import percent
from quantlab.pipeline import Outcome, RunInfo, VariantResult
from quantlab.registry import GateVerdict, ResultRow, Selection, TriggerInfo
from quantlab.sensitivity import SensitivityResult
from quantlab_tasks.caching import dataset_key, float_eval_key, log_cache_hit
from quantlab_tasks.progress import Progress


def retry_transient(task, task_run, state) -> bool:
    """Retry unexpected errors and a store that stopped answering; not a user's mistake."""
    exc = state.data
    if isinstance(exc, StoreError):
        return exc.transient
    return not isinstance(exc, QuantlabError)


IO_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5),
                  retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
HOUR = 3600
# Ceilings, in seconds, that turn a hung stage (a stalled download, a wedged worker group)
# into a failed task run; sized for ImageNet on one CPU node.
TIMEOUTS = {"validate": 0.5 * HOUR, "store": 0.25 * HOUR, "stage": 12 * HOUR,
            "evaluate": 4 * HOUR, "export": 2 * HOUR, "ptq": 8 * HOUR, "qat": 96 * HOUR,
            "bench": 2 * HOUR, "report": 0.5 * HOUR}
# A tag concurrency limit on it bounds the heavy compute stages (QAT, timing) running at once.
COMPUTE_CONCURRENCY_TAG = "quantlab-compute"


@task(name="preflight", cache_policy=NO_CACHE, tags=["quantlab", "validate"],
      timeout_seconds=TIMEOUTS["validate"])
def preflight(config: RunConfig) -> int:
    """Validate config, store, dataset layout and checkpoint; returns num_classes."""
    return pipeline.preflight(config)


@task(name="start-run", cache_policy=NO_CACHE, tags=["quantlab", "store"],
      timeout_seconds=TIMEOUTS["store"], **IO_RETRIES)
def start_run(config: RunConfig) -> RunInfo:
    """Create (or resume) the run folder in the store."""
    run = pipeline.start_run(config)
    get_run_logger().info("run %s in %s%s", run.run_id, config.store,
                          " (resumed)" if run.resumed else "")
    return run


@task(name="stage-data", cache_key_fn=dataset_key, persist_result=True,
      on_completion=[log_cache_hit("the dataset's listing is unchanged")],
      tags=["quantlab", "stage"], timeout_seconds=TIMEOUTS["stage"], **IO_RETRIES)
def stage_data(config: RunConfig) -> StagedData:
    """Bring the dataset into the local cache, verified (cached by the dataset's listing)."""
    logger = get_run_logger()
    staged = pipeline.stage(config, on_progress=lambda done, total: logger.info(
        "staged %d/%d files", done, total))
    logger.info("dataset %s: %d classes, %d train / %d val images, fingerprint %s "
                "(%d files downloaded, %.1fs)", staged.uri, len(staged.classes), staged.num_train,
                staged.num_val, staged.fingerprint[:12], staged.staged_files, staged.seconds)
    if staged.skipped:
        logger.warning("left out %d undecodable image(s): %s", len(staged.skipped),
                       ", ".join(staged.skipped))
    return staged


@task(name="evaluate-float", cache_key_fn=float_eval_key, persist_result=True,
      on_completion=[log_cache_hit("same checkpoint bytes, dataset and evaluation settings")],
      tags=["quantlab", "evaluate"], timeout_seconds=TIMEOUTS["evaluate"])
def evaluate_float(config: RunConfig, staged: StagedData) -> EvalResult:
    """Top-1/top-5/loss of the float checkpoint (cached by checkpoint and data content)."""
    result = pipeline.evaluate_float(config, pipeline.ensure_staged(config, staged))
    get_run_logger().info("float: top-1 %.2f, top-5 %s", result.top1, percent(result.top5))
    return result


@task(name="export-float", cache_policy=NO_CACHE, tags=["quantlab", "export"],
      timeout_seconds=TIMEOUTS["export"])
def export_float(config: RunConfig, staged: StagedData, run: RunInfo,
                 float_eval: EvalResult) -> VariantResult:
    """Script and store the fused float model (the benchmark's reference)."""
    return pipeline.export_float(config, pipeline.ensure_staged(config, staged), run, float_eval)


# No task timeout: PTQ runs in worker threads or on Dask, where Prefect cannot enforce one; the
# flow waits for each variant at most TIMEOUTS["ptq"] instead.
@task(name="ptq", task_run_name="ptq-{variant.name}", cache_policy=NO_CACHE,
      tags=["quantlab", "ptq"])
def ptq_variant(config: RunConfig, staged: StagedData, run: RunInfo,
                variant: VariantConfig) -> VariantResult:
    """One PTQ variant: prepare, calibrate, convert, package (TorchScript or AOTI), evaluate,
    store."""
    result = pipeline.ptq_variant(config, pipeline.ensure_staged(config, staged), run, variant)
    log_variant(result)
    return result


def log_variant(result: VariantResult) -> None:
    """A variant's accuracy, size, and how each runtime's evaluation compared."""
    logger = get_run_logger()
    logger.info("%s: top-1 %.2f, top-5 %s, %d bytes", result.variant, result.eval.top1,
                percent(result.eval.top5), result.artifact.bytes)
    for eq in result.runtimes[1:]:
        (logger.info if eq.passed is not False else logger.warning)(
            "%s in %s: top-1 %.2f; %s", result.variant, eq.runtime, eq.top1, eq.reason)
    if result.export_error:
        logger.warning("%s not exported: %s", result.variant, result.export_error)


@task(name="nncf-ptq", cache_policy=NO_CACHE, tags=["quantlab", "ptq"])
def nncf_peer(config: RunConfig, staged: StagedData, run: RunInfo) -> VariantResult:
    """The peer: NNCF's own nncf.quantize of the float model, as OpenVINO IR, evaluated."""
    result = pipeline.nncf_peer(config, pipeline.ensure_staged(config, staged), run)
    get_run_logger().info("%s: top-1 %.2f in %s, %d bytes", result.variant, result.eval.top1,
                          result.runtimes[0].runtime, result.artifact.size_bytes)
    return result


@task(name="sensitivity", cache_policy=NO_CACHE, tags=["quantlab", "ptq", "sensitivity"],
      timeout_seconds=TIMEOUTS["ptq"])
def sensitivity(config: RunConfig, staged: StagedData, run: RunInfo,
                variant: str | None = None) -> SensitivityResult:
    """Per-layer sensitivity of one PTQ variant: each layer quantized alone, ranked."""
    result = pipeline.sensitivity(config, pipeline.ensure_staged(config, staged), run, variant)
    top = ", ".join(f"{x.layer} ({x.top1_drop:.2f} pts, {x.output_sqnr_db:.1f} dB)"
                    for x in result.layers[:5])
    get_run_logger().info("%s: %d layers; most sensitive: %s", result.variant,
                          len(result.layers), top)
    return result


@task(name="ptq-fallback", task_run_name="{ranking.variant}-fallback", cache_policy=NO_CACHE,
      tags=["quantlab", "ptq"], timeout_seconds=TIMEOUTS["ptq"])
def ptq_fallback(config: RunConfig, staged: StagedData, run: RunInfo, base: VariantResult,
                 float_eval: EvalResult, ranking: SensitivityResult) -> VariantResult:
    """The PTQ variant with its most sensitive layers kept in float, until within budget."""
    result = pipeline.ptq_fallback(config, pipeline.ensure_staged(config, staged), run, base,
                                   float_eval, ranking)
    get_run_logger().info("%s: top-1 %.2f with %d layers in float: %s", result.variant,
                          result.eval.top1, len(result.float_layers),
                          ", ".join(result.float_layers) or "none")
    return result


# torchrun's own lines (glog: W1127 03:33:03.65 ...) and torch's per-rank traceback lines.
_GLOG_LEVEL = re.compile(r"^([IWEF])\d{4} ")
_RANK_TRACEBACK = re.compile(r"^\[rank\d+\]:")


def worker_line_level(line: str) -> int:
    """The log level of a line of the QAT worker group's output."""
    if _RANK_TRACEBACK.match(line):
        return logging.ERROR
    glog = _GLOG_LEVEL.match(line)
    return {"W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}.get(
        glog.group(1), logging.INFO) if glog else logging.INFO


@task(name="qat-train", task_run_name="qat-train-{backend}", cache_policy=NO_CACHE,
      tags=["quantlab", "qat", COMPUTE_CONCURRENCY_TAG], timeout_seconds=TIMEOUTS["qat"])
def train_qat(config: RunConfig, staged: StagedData, run: RunInfo,
              progress: Progress | None = None, backend: str = "eager") -> list[dict]:
    """Multi-epoch QAT of the run's QAT variant of `backend` on torch.distributed (gloo)
    workers; their output goes to this log.

    Workers log as "[rank r/N] ..."; torchrun's own lines and worker tracebacks arrive too,
    as warnings and errors.
    """
    logger = get_run_logger()

    def on_line(line: str) -> None:
        event = qat.parse_event(line)
        if event is None:
            logger.log(worker_line_level(line), line)
        elif event["event"] == "epoch" and progress is not None:
            backends = [b for _, b in config.qat_variants()]
            progress.qat_epoch(event["epoch"], config.qat.epochs, event["variant"],
                               backends.index(backend), len(backends))

    return pipeline.train_qat(config, pipeline.ensure_staged(config, staged), run,
                              on_line=on_line, backend=backend)


@task(name="qat-export", task_run_name="qat-export-{backend}", cache_policy=NO_CACHE,
      tags=["quantlab", "qat", "export"], timeout_seconds=TIMEOUTS["export"])
def export_qat(config: RunConfig, staged: StagedData, run: RunInfo,
               backend: str = "eager") -> VariantResult:
    """Convert the final QAT checkpoint to int8, package (TorchScript or AOTI), evaluate, store."""
    result = pipeline.export_qat(config, pipeline.ensure_staged(config, staged), run, backend)
    log_variant(result)
    return result


@task(name="benchmark", cache_policy=NO_CACHE, tags=["quantlab", "bench", COMPUTE_CONCURRENCY_TAG],
      timeout_seconds=TIMEOUTS["bench"])
def benchmark(config: RunConfig, run: RunInfo, results: list[VariantResult]) -> list[Latency]:
    """Time float and every int8 variant in each of its runtimes, side by side."""
    pairs = pipeline.timed_pairs(results)
    get_run_logger().info("timing %d (variant, runtime) pairs at batch sizes %s, %d threads",
                          len(pairs), ", ".join(map(str, config.timing.timed_batch_sizes)),
                          config.timing.num_threads)
    rows = pipeline.benchmark(config, run, results)
    for r in rows:
        get_run_logger().info("%s in %s, batch %d: %.3f ms (p90 %.3f), %.0f img/s", r.variant,
                              r.runtime, r.batch_size, r.latency_ms, r.latency_ms_p90,
                              r.images_per_sec)
    return rows


@task(name="regression-gate", cache_policy=NO_CACHE,
      tags=["quantlab", "gate", COMPUTE_CONCURRENCY_TAG],
      timeout_seconds=TIMEOUTS["bench"])
def regression_gate(config: RunConfig, run: RunInfo, staged: StagedData,
                    results: list[VariantResult], selected: Selection) -> GateVerdict | None:
    """Compare the selected variant with the previous best-<model>, both measured here."""
    verdict = pipeline.regression_gate(config, run, pipeline.ensure_staged(config, staged),
                                       results, selected)
    if verdict is not None:
        log = get_run_logger().info if verdict.passed else get_run_logger().error
        log("regression gate %s: %s", "passed" if verdict.passed else "FAILED", verdict.reason)
    return verdict


@task(name="report", cache_policy=NO_CACHE, tags=["quantlab", "report", "store"],
      timeout_seconds=TIMEOUTS["report"], **IO_RETRIES)
def finalize(config: RunConfig, run: RunInfo, staged: StagedData, results: list[VariantResult],
             pairs: list[ResultRow], rows: list[ResultRow], selected: Selection,
             epochs: list[dict],
             ranking: SensitivityResult | None, gate: GateVerdict | None,
             trigger: TriggerInfo | None = None) -> Outcome:
    """Report, write the manifest (last) and move the aliases; publish UI artifacts.

    The UI's report shows the plot inline (a data: URI: the UI cannot read the store) and
    links every stored artifact, the PNG included.
    """
    outcome = pipeline.finalize(config, run, staged, results, pairs, rows, selected, epochs,
                                ranking, gate, trigger)
    publish(outcome)
    return outcome


def publish(outcome: Outcome) -> None:
    """The run's comparison table and report as Prefect artifacts of the current flow run."""
    manifest = outcome.manifest
    rejected = " (rejected by the regression gate)" if manifest.status == "rejected" else ""
    create_table_artifact(key="quantlab-comparison",
                          table=report.table_rows(manifest.results, manifest.selected.variant),
                          description=f"run {manifest.run_id}: {manifest.model}, selected "
                                      f"{manifest.selected.variant} in "
                                      f"{manifest.selected.runtime}{rejected}"
                                      + "".join(f"; {line}" for line in
                                                report.verdict_lines(manifest.selected)[:1]))
    create_markdown_artifact(key="quantlab-report", markdown=outcome.ui_report,
                             description=f"run {manifest.run_id}")
    logger = get_run_logger()
    logger.info("selected %s in %s: %s", manifest.selected.variant,
                manifest.selected.runtime, manifest.selected.reason)
    for line in report.verdict_lines(manifest.selected):
        logger.info("%s", line)
