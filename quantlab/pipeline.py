"""The steps of a quantize run, as plain functions over URIs and small records.

Each step reads its inputs from the store or the staged dataset, writes its outputs to the
store, and returns a small pydantic record; tensors and modules never cross a step boundary.
The Prefect tasks in tasks/ wrap these one to one; a notebook can call them in order:

    cfg = load_config("run.yaml")
    preflight(cfg)                                  # all cheap validation, before any work
    staged = stage(cfg)                             # + every image decoded; nothing stored yet
    run = start_run(cfg)
    float_eval = evaluate_float(cfg, staged)
    results = [export_float(cfg, staged, run, float_eval)]
    results += [ptq_variant(cfg, staged, run, v) for v in cfg.variants]
    ranking = sensitivity(cfg, staged, run, sensitivity_base(cfg, results, float_eval))
    base = next(r for r in results if r.variant == ranking.variant)
    results.append(ptq_fallback(cfg, staged, run, base, float_eval, ranking))  # fallback_name
    for name, backend in cfg.qat_variants():        # qat-x86 (eager), qat-pt2e-x86 (pt2e)
        train_qat(cfg, staged, run, backend=backend)
        results.append(export_qat(cfg, staged, run, backend))
    results.append(nncf_peer(cfg, staged, run))      # cfg.formats.nncf_peer: NNCF's own PTQ
    latencies = benchmark(cfg, run, results)        # each variant in each of its runtimes
    pairs, rows, selected = select(cfg, results, latencies)
    verdict = regression_gate(cfg, run, staged, results, selected)
    outcome = finalize(cfg, run, staged, results, pairs, rows, selected, ranking=ranking,
                       gate=verdict)
    # outcome.manifest.status == "rejected" when the gate failed: `best` was not moved

Each variant is made by its backend (quantlab.backend: `eager`, the tutorial's eager mode, a
TorchScript artifact; `pt2e`, torchao's PT2E, an AOTInductor package) and evaluated as the
artifact it ships. The policies live in their own modules: PTQ in quantlab.ptq, the choice in
quantlab.selection, the regression gate in quantlab.gate.
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
import os
import platform
import tempfile
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Literal

import torch
from pydantic import BaseModel

import numpy as np

from quantlab import (__version__, algorithms, data, export, formats, installed_versions, metrics,
                      models, onnx_export, qat, registry, report, runtimes)
from quantlab import gate as gate_policy
from quantlab import sensitivity as sens
from quantlab.backend import backend_for, check_engine, get_backend
from quantlab.formats import Equivalence
from quantlab.timing import Latency, TimedFile, measure_files, table_row
from quantlab.config import RunConfig, VariantConfig
from quantlab.data import StagedData
from quantlab.distributed import launch
from quantlab.errors import ConfigError, DataError, NotFoundError
from quantlab.evaluate import EvalResult, evaluate, result_of_logits
from quantlab.ptq import calibrate, calibration_loader, quantize_ptq
from quantlab.registry import (ArtifactEntry, DatasetInfo, GateVerdict, Manifest, ResultRow,
                               Selection, TriggerInfo)
from quantlab.selection import (comparison, fastest_per_variant, float_baseline_warnings,
                                timing_warnings)
from quantlab.selection import select as select_variant
from quantlab.sensitivity import FallbackStep, LayerSensitivity, SensitivityResult
from quantlab.store import PREFLIGHT_RETRY_DELAYS, Store

log = logging.getLogger("quantlab.pipeline")


class RunInfo(BaseModel):
    run_id: str
    created_at: datetime
    resumed: bool = False


class VariantResult(BaseModel):
    """A variant's accuracy and its stored artifact."""

    variant: str
    method: Literal["float", "ptq", "qat"]
    engine: str | None
    eval: EvalResult                        # of its artifact (`artifact`), on val/
    artifact: ArtifactEntry                 # what its backend ships: TorchScript or AOTI
    backend: str = "eager"                  # eager | pt2e (quantlab.backend)
    float_layers: list[str] = []            # layers kept in float (the fallback variant)
    fallback_steps: list[FallbackStep] = [] # the fallback's greedy search, step 0 = its base
    checkpoint_layout: str | None = None    # float: what the checkpoint held (models.read_state_dict)
    algorithms: str = ""                    # e.g. "minmax+cle+bc" (VariantConfig.algorithms)
    exports: list[ArtifactEntry] = []       # its ONNX and OpenVINO IR files (formats.export;
                                            # eager variants only)
    runtimes: list[Equivalence] = []        # evaluated on val/ in each runtime, the artifact's first
    export_error: str | None = None         # why it could not be exported (it stays TorchScript)

    def entry_for(self, runtime: str) -> ArtifactEntry:
        """The artifact file a runtime runs."""
        fmt = runtimes.format_for(runtime)
        return next(a for a in [self.artifact, *self.exports] if a.format == fmt)


class Outcome(BaseModel):
    """What a finished run tells its caller: the manifest, and the report as the UI shows it."""

    manifest: Manifest
    store: str
    most_sensitive: list[LayerSensitivity] = []   # the five most sensitive layers, if analysed
    ui_report: str = ""                          # the markdown report with the plot inlined


def store_of(cfg: RunConfig) -> Store:
    """The run's store (each step builds it once and passes it on)."""
    return Store(cfg.store, cfg.storage_options)


# -- before any work -----------------------------------------------------------------------
def preflight(cfg: RunConfig) -> int:
    """Validate everything cheap to check, before any expensive work; returns num_classes.

    Engines this CPU supports, a writable store, the dataset's layout (class folders of train/
    and val/), and the checkpoint (exists, loads with weights_only, fits the architecture and
    the dataset's number of classes). Writes nothing. Storage calls give up after a few
    seconds here: an endpoint that does not answer yet is more likely a wrong URL than a fault.
    Images are decoded later, by `stage`, which reads them anyway.
    """
    eager_qat = any(b == "eager" for _, b in cfg.qat_variants())
    for engine in ({v.engine for v in cfg.variants if v.backend == "eager"}
                   | ({cfg.qat.engine} if eager_qat else set())):
        check_engine(engine)
    Store(cfg.store, cfg.storage_options, PREFLIGHT_RETRY_DELAYS).check_writable()
    dataset = Store(cfg.data.uri, cfg.storage_options, PREFLIGHT_RETRY_DELAYS)
    if not dataset.list_dir(""):
        raise DataError(f"dataset {dataset.root} does not exist or is empty; expected "
                        "train/<class>/<image> and val/<class>/<image>")
    splits = {s: dataset.list_dir(s) for s in data.SPLITS}
    for split, classes in splits.items():
        if not classes:
            raise DataError(f"dataset {dataset.root} has no {split}/ folder with class folders; "
                            f"expected {split}/<class>/<image>")
    data.check_same_classes(splits["train"], splits["val"], dataset.root)
    data.check_no_empty_classes(splits, data.list_dataset(cfg.data.uri, cfg.storage_options),
                                dataset.root)
    num_classes = len(splits["train"])
    model = load_float(cfg, num_classes)
    if "pt2e" in cfg.backends:  # torch.export must export the model; this CPU must lower it
        from quantlab import pt2e

        pt2e.preflight(cfg.model.name, model,
                       next((v for v in cfg.variants if v.backend == "pt2e"), None),
                       cfg.data.transforms.input_size)
    if any(v.cross_layer_equalization for v in cfg.variants):
        # Traced here, once, not while PTQ variants calibrate in parallel (algorithms._PAIRS);
        # a model torch.fx cannot trace fails now, with one line.
        algorithms.equalization_pairs(models.fuse(model, is_qat=False))
    return num_classes


def start_run(cfg: RunConfig) -> RunInfo:
    """Create the run (runs/<id>/run.json), or resume an incomplete one with the same id."""
    store = store_of(cfg)
    if cfg.run_id:
        rel = f"{registry.run_dir(cfg.run_id)}/run.json"
        if store.exists(f"{registry.run_dir(cfg.run_id)}/manifest.json"):
            raise ConfigError(f"run {cfg.run_id} already completed; choose a new run id")
        if store.exists(rel):
            info = RunInfo.model_validate({**store.read_json(rel), "resumed": True})
            log.info("resuming run %s (created %s)", info.run_id, info.created_at)
            return info
        info = RunInfo(run_id=cfg.run_id, created_at=metrics.now())
    else:
        now = metrics.now()
        info = RunInfo(run_id=f"{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}", created_at=now)
    store.write_json(f"{registry.run_dir(info.run_id)}/run.json",
                     {**info.model_dump(mode="json", exclude={"resumed"}),
                      "model": cfg.model.name, "config": cfg.model_dump(mode="json")})
    return info


# -- data and the float baseline -----------------------------------------------------------
def stage(cfg: RunConfig, on_progress: Callable[[int, int], None] | None = None) -> StagedData:
    """Bring the dataset into the local cache (or fingerprint it in place when it is local),
    and decode every image once (see data.stage)."""
    return data.stage(cfg.data.uri, cfg.cache_dir, cfg.storage_options, on_progress,
                      skip_bad_images=cfg.data.skip_bad_images)


def ensure_staged(cfg: RunConfig, staged: StagedData) -> StagedData:
    """`staged` if its local copy is on this machine, else the dataset staged again here.

    A stage result can come from an earlier run (a cached task) or from another machine (a
    Dask worker): its local copy may be gone or elsewhere. Restaging checks the content too.
    """
    if os.path.isdir(staged.local_path):
        return staged
    log.info("staged copy %s is not on this machine; staging %s again", staged.local_path,
             staged.uri)
    again = stage(cfg)
    if again.fingerprint != staged.fingerprint:
        raise DataError(f"dataset {staged.uri} changed during the run (fingerprint "
                        f"{staged.fingerprint[:12]} became {again.fingerprint[:12]}); start a new run")
    return again


def load_float(cfg: RunConfig, num_classes: int) -> torch.nn.Module:
    """The float model with the run's checkpoint loaded (validated against the architecture)."""
    return models.load_float_model(cfg.model.name, num_classes, cfg.model.checkpoint,
                                   cfg.storage_options, **cfg.model.kwargs)


def val_loader(cfg: RunConfig, staged: StagedData):
    return data.loader(staged, cfg.data, "val", train=False)


def _evaluate(cfg: RunConfig, staged: StagedData,
              model: torch.nn.Module) -> tuple[EvalResult, torch.Tensor]:
    """A model's val/ accuracy and its val/ logits."""
    logits: list[torch.Tensor] = []
    result = evaluate(model, val_loader(cfg, staged), cfg.data.max_eval_batches, logits=logits)
    return result, torch.cat(logits)


def evaluate_float(cfg: RunConfig, staged: StagedData) -> EvalResult:
    """Top-1/top-5/loss of the float checkpoint on val/ (a pure function of its inputs)."""
    model = load_float(cfg, len(staged.classes))
    return evaluate(model, val_loader(cfg, staged), cfg.data.max_eval_batches)


def export_float(cfg: RunConfig, staged: StagedData, run: RunInfo,
                 float_eval: EvalResult) -> VariantResult:
    """Script the fused float model (the benchmark's reference) and store it."""
    model, layout = models.load_float_checkpoint(cfg.model.name, len(staged.classes),
                                                 cfg.model.checkpoint, cfg.storage_options,
                                                 **cfg.model.kwargs)
    if layout != "a state_dict":
        log.info("checkpoint %s: loaded %s", cfg.model.checkpoint, layout)
    store, fused = store_of(cfg), models.fuse(model, is_qat=False)
    logits, _ = _store_float_logits(cfg, staged, store, run, fused)
    result = _store_variant(cfg, store, run, staged, "float", "float", "eager", None, fused, "",
                            evaluated=(float_eval, torch.from_numpy(logits)))
    return result.model_copy(update={"checkpoint_layout": layout})


FLOAT_LOGITS = "evaluation/float-val-logits.npz"  # in the run folder: float's logits on val/


def _store_float_logits(cfg: RunConfig, staged: StagedData, store: Store, run: RunInfo,
                        fused: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Float's val/ logits and labels, computed and stored for the run's comparisons."""
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    evaluate(fused, val_loader(cfg, staged), cfg.data.max_eval_batches, logits=outputs,
             labels=targets)
    logits, labels = torch.cat(outputs).numpy(), torch.cat(targets).numpy()
    buf = io.BytesIO()
    np.savez(buf, logits=logits, labels=labels)
    store.write_bytes(f"{registry.run_dir(run.run_id)}/{FLOAT_LOGITS}", buf.getvalue())
    return logits, labels


def float_val_logits(cfg: RunConfig, staged: StagedData, store: Store,
                     run: RunInfo) -> tuple[np.ndarray, np.ndarray]:
    """Float's val/ logits and the labels, as `export_float` stored them for this run (or
    computed and stored now, for a step run on its own, e.g. `quantlab qat`)."""
    rel = f"{registry.run_dir(run.run_id)}/{FLOAT_LOGITS}"
    if not store.exists(rel):
        fused = models.fuse(load_float(cfg, len(staged.classes)), is_qat=False)
        return _store_float_logits(cfg, staged, store, run, fused)
    with np.load(io.BytesIO(store.read_bytes(rel))) as z:
        return z["logits"], z["labels"]


# -- PTQ -----------------------------------------------------------------------------------
def ptq_variant(cfg: RunConfig, staged: StagedData, run: RunInfo,
                variant: VariantConfig) -> VariantResult:
    """Prepare (eager: fuse; pt2e: torch.export), insert observers, calibrate, convert to
    int8; package (TorchScript or AOTI), evaluate the package, store."""
    return _store_variant(cfg, store_of(cfg), run, staged, variant.name, "ptq", variant.backend,
                          variant.engine, _quantize(cfg, staged, variant), variant.algorithms)


def _quantize(cfg: RunConfig, staged: StagedData, variant: VariantConfig,
              float_layers: list[str] | tuple = ()) -> torch.nn.Module:
    """A PTQ variant's int8 model (with `float_layers` kept in float)."""
    return quantize_ptq(load_float(cfg, len(staged.classes)), variant,
                        calibration_loader(cfg, staged, variant.num_calibration_batches),
                        float_layers, cfg.data.transforms.input_size)


# -- per-layer sensitivity and the float fallback ------------------------------------------
def sensitivity_base(cfg: RunConfig, results: list[VariantResult],
                     float_eval: EvalResult) -> str | None:
    """The PTQ variant to analyse and patch: the configured one, or with `sensitivity.variant:
    auto` the most accurate PTQ variant outside the accuracy budget (the one the selection would
    otherwise have to reject), else the last of `variants`. None: no sensitivity in this run."""
    if cfg.sensitivity_variant != "auto":
        return cfg.sensitivity_variant
    floor = float_eval.top1 - cfg.max_accuracy_drop
    eager = [v.name for v in cfg.variants if v.backend == "eager"]  # mixed precision is eager-only
    outside = [r for r in results if r.variant in eager and r.eval.top1 < floor]
    if outside:
        return max(outside, key=lambda r: r.eval.top1).variant
    return eager[-1]


def sensitivity(cfg: RunConfig, staged: StagedData, run: RunInfo,
                variant_name: str | None = None) -> SensitivityResult:
    """Rank the layers of a PTQ variant (default `cfg.sensitivity_variant`) by the harm of
    quantizing each alone.

    Method in quantlab/sensitivity.py. Stores one `sensitivity` row per quantizable layer.
    """
    variant_name = variant_name or cfg.sensitivity_variant
    if variant_name in (None, "auto"):
        raise ConfigError("this run has no sensitivity analysis (sensitivity.enabled is false "
                          "or there is no PTQ variant), or its variant is not chosen yet "
                          "(sensitivity.variant: auto; see sensitivity_base)")
    variant = cfg.variant(variant_name)
    backend = get_backend()
    float_model = load_float(cfg, len(staged.classes))
    observed = backend.prepare_isolated(copy.deepcopy(float_model), variant)
    calibrate(observed, calibration_loader(cfg, staged, variant.num_calibration_batches))
    isolated = backend.convert(observed, variant.engine)
    fused = models.fuse(float_model, is_qat=False)
    layers = backend.quantizable_layers(fused)
    num_batches = cfg.sensitivity.num_batches or variant.num_calibration_batches
    # The first batches of the calibration images, held in memory: every layer sees the same.
    batches = list(itertools.islice(calibration_loader(cfg, staged, num_batches), num_batches))
    result = sens.measure(fused, {x.name: isolated.get_submodule(x.name) for x in layers},
                          layers, batches, variant=variant.name)
    metrics.write_rows(store_of(cfg), "sensitivity", [
        {**r.model_dump(), "run_id": run.run_id, "variant": variant.name,
         "model": cfg.model.name, "num_images": result.num_images} for r in result.layers],
        run.run_id, variant.name, run.created_at)
    return result


def ptq_fallback(cfg: RunConfig, staged: StagedData, run: RunInfo, base: VariantResult,
                 float_eval: EvalResult, ranking: SensitivityResult) -> VariantResult:
    """`<variant>-fallback`: the base PTQ variant with its most sensitive layers kept in float.

    Layers are added in rank order, one per step (prepare with them in float, calibrate,
    convert, evaluate on val/ as every variant is), until val top-1 is within
    `max_accuracy_drop` of float, `sensitivity.max_float_layers` is reached, or
    `sensitivity.patience` steps in a row gained nothing. The chosen step's model is stored
    (sensitivity.chosen_step): the first within budget, else the fewest float layers that
    reached the best top-1; when the base variant meets the budget it keeps no layer in float.
    """
    variant = cfg.variant(ranking.variant)
    name = f"{ranking.variant}-fallback"
    built: dict[int, tuple[torch.nn.Module, EvalResult, torch.Tensor]] = {}

    def top1_with(layers: list[str]) -> float:
        built.clear()  # only the newest model is kept
        int8 = _quantize(cfg, staged, variant, layers)
        built[len(layers)] = (int8, *_evaluate(cfg, staged, int8))
        log.info("%s with %d float layers (+%s): top-1 %.2f", name, len(layers),
                 layers[-1], built[len(layers)][1].top1)
        return built[len(layers)][1].top1

    steps = sens.greedy_fallback([x.layer for x in ranking.layers], top1_with, base.eval.top1,
                                 float_eval.top1 - cfg.max_accuracy_drop,
                                 cfg.sensitivity.max_float_layers, cfg.sensitivity.patience)
    float_layers = [x.layer for x in ranking.layers[:sens.chosen_step(steps).num_float_layers]]
    if len(float_layers) in built:
        int8, *evaluated = built[len(float_layers)]
    else:
        int8, evaluated = _quantize(cfg, staged, variant, float_layers), None
    stored = _store_variant(cfg, store_of(cfg), run, staged, name, "ptq", variant.backend,
                            variant.engine, int8, f"{variant.algorithms}+fallback",
                            evaluated=tuple(evaluated) if evaluated else None)
    return stored.model_copy(update={"float_layers": float_layers, "fallback_steps": steps})


# -- QAT -----------------------------------------------------------------------------------
def train_qat(cfg: RunConfig, staged: StagedData, run: RunInfo,
              on_line: Callable[[str], None] = print, backend: str = "eager") -> list[dict]:
    """Launch this node's QAT workers (torchrun, gloo) for the run's QAT variant of `backend`
    (eager: qat-x86, pt2e: qat-pt2e-x86) and wait; returns that variant's epoch rows.

    One node by default; with `qat.nnodes` and `qat.rdzv_endpoint`, this node's part of a
    multi-node job (every node calls this with the same config and run). Resumes from the
    run's newest checkpoint in the store; launches nothing when every epoch is done.
    """
    q, store = cfg.qat, store_of(cfg)
    name = q.variant_name(backend)
    if qat.is_trained(store, run.run_id, q.epochs, backend):
        on_line(f"all {q.epochs} QAT epochs of {name} in run {run.run_id} are already done")
        return qat_epochs(store, run, name)
    num_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    num_threads = q.nproc_per_node * (q.threads_per_worker + cfg.data.num_workers)
    if num_cores and num_threads > num_cores:
        log.warning("QAT: %d workers x (%d threads + %d loader processes) on %d cores "
                    "oversubscribes this node", q.nproc_per_node, q.threads_per_worker,
                    cfg.data.num_workers, num_cores)
    job = qat.QatJob(config=cfg, staged=staged, run_id=run.run_id, run_date=run.created_at,
                     num_classes=len(staged.classes), backend=backend)
    with tempfile.TemporaryDirectory(prefix="quantlab-qat-") as tmp:
        path = os.path.join(tmp, "job.json")
        with open(path, "w") as f:
            f.write(job.model_dump_json())
        launch("quantlab.qat", ["--job", path], nproc_per_node=q.nproc_per_node,
               threads_per_worker=q.threads_per_worker, nnodes=q.nnodes,
               rdzv_endpoint=q.rdzv_endpoint,
               rdzv_id=(q.rdzv_id or run.run_id) + ("" if backend == "eager" else f"-{backend}"),
               rdzv_timeout=q.rdzv_timeout, max_restarts=q.max_restarts, on_line=on_line)
    return qat_epochs(store, run, name)


def qat_epochs(store: Store, run: RunInfo, variant: str | None = None) -> list[dict]:
    """The run's `qat_epochs` rows (of one QAT variant, or all), in epoch order."""
    rows = metrics.read_rows(store, "qat_epochs", run.run_id)
    # rows written before QAT variants were recorded have no variant: kept (they are eager)
    rows = [r for r in rows if variant is None or r["variant"] in (variant, None)]
    return sorted(rows, key=lambda r: (r["variant"] or "", r["epoch"]))


def export_qat(cfg: RunConfig, staged: StagedData, run: RunInfo,
               backend: str = "eager") -> VariantResult:
    """Convert the final QAT checkpoint of `backend`'s QAT variant to int8, package it
    (TorchScript or AOTI), evaluate the package on val/, store it."""
    store, epochs = store_of(cfg), cfg.qat.epochs
    if not qat.is_trained(store, run.run_id, epochs, backend):
        raise NotFoundError(f"run {run.run_id} has {cfg.qat.variant_name(backend)} checkpoints "
                            f"up to epoch {qat.latest_checkpoint(store, run.run_id, backend)} of "
                            f"{epochs}; train first")
    model = qat.build_qat_model(cfg, len(staged.classes), backend)
    quant = backend_for(cfg, backend)
    qat.restore(model, qat.load_checkpoint(store, run.run_id, epochs, backend), backend=quant)
    int8 = quant.convert(model, cfg.qat.engine)
    return _store_variant(cfg, store, run, staged, cfg.qat.variant_name(backend), "qat", backend,
                          cfg.qat.engine, int8, "qat")


# -- storing, benchmarking, choosing, reporting -----------------------------------------------
def _store_variant(cfg: RunConfig, store: Store, run: RunInfo, staged: StagedData,
                   variant: str, method: str, backend: str, engine: str | None,
                   model: torch.nn.Module, algorithms: str,
                   evaluated: tuple[EvalResult, torch.Tensor] | None = None) -> VariantResult:
    """Package a model the way its backend ships it (TorchScript; AOTI for pt2e) and store
    the artifact; evaluate the package on val/ (`evaluated`: the model's result and logits,
    used when the package runs the model itself); export a TorchScript model to the run's
    other formats and store them; evaluate it in every runtime against float (and each export
    against the artifact); one `evaluations` row per runtime."""
    package = backend_for(cfg, backend).package(
        model, engine, on_line=lambda line: log.info("%s: %s", variant, line))
    if evaluated is None or package.runner is not model:
        evaluated = _evaluate(cfg, staged, package.runner)
    result, logits = evaluated
    entry = ArtifactEntry(variant=variant, method=method,
                          path=registry.artifact_path(variant, package.format),
                          sha256=export.sha256(package.data), bytes=len(package.data),
                          format=package.format, engine=engine,
                          optimisation=package.optimisation, made_by=package.made_by,
                          runtimes=runtimes.runtimes_for(package.format, engine))
    store.write_bytes(f"{registry.run_dir(run.run_id)}/{entry.path}", package.data)
    exports, export_error = [], None
    if cfg.formats.export and package.format == "torchscript":  # exports are of eager modules
        try:
            files = (formats.export_float(model, cfg.data.transforms.input_size)
                     if method == "float" else
                     formats.export_int8(model, engine, cfg.data.transforms.input_size))
        except onnx_export.ExportError as e:
            export_error = str(e)
            log.warning("%s: not exported (it stays TorchScript only): %s", variant, e)
        else:
            exports = [e for e in formats.artifact_entries(files, variant, method, engine)
                       if e.format in cfg.formats.export]
            for e in exports:
                _store_files(store, run, e, files)
    stored = VariantResult(variant=variant, method=method, engine=engine, eval=result,
                           artifact=entry, backend=backend, algorithms=algorithms,
                           exports=exports, export_error=export_error)
    equivalence = _check_runtimes(cfg, store, run, staged, stored, logits)
    _write_evaluations(cfg, store, run, stored, equivalence)
    return stored.model_copy(update={"runtimes": equivalence})


def _store_files(store: Store, run: RunInfo, entry: ArtifactEntry,
                 files: dict[str, bytes]) -> None:
    """Write an artifact's files ({"model.xml": bytes, ...}) where its entry says."""
    for f in entry.all_files():
        store.write_bytes(f"{registry.run_dir(run.run_id)}/{f.path}",
                          files[os.path.basename(f.path)])


def _check_runtimes(cfg: RunConfig, store: Store, run: RunInfo, staged: StagedData,
                    result: VariantResult, logits: torch.Tensor) -> list[Equivalence]:
    """The variant in each runtime that runs one of its files, evaluated on val/: against
    float, and (all but the first, which made `logits`) against its own artifact
    (formats.check_export: agreement >= formats.MIN_AGREEMENT, top-1 and SQNR must hold, and
    an int8 export must still be int8, or the pair is not selected)."""
    float_logits, labels = float_val_logits(cfg, staged, store, run)
    reference = logits.numpy()
    (own, *pairs) = [(entry, rt) for entry in [result.artifact, *result.exports]
                     for rt in entry.runtimes]
    # the variant's own artifact (TorchScript in its engine, or the AOTI package) made `logits`
    first = formats.compare_logits(reference, labels, float_logits, None, own[1])
    out = [first.model_copy(update={"reason": f"the {own[0].format} artifact: the reference"})]
    if not pairs:
        return out
    with tempfile.TemporaryDirectory(prefix="quantlab-check-") as tmp:
        paths = registry.verified_copies(store, {e.format: (run.run_id, e) for e, _ in pairs},
                                         tmp)
        for entry, rt in pairs:
            predicted, _ = formats.predict(paths[entry.format], rt, val_loader(cfg, staged),
                                           cfg.timing.num_threads, cfg.data.max_eval_batches)
            eq = formats.check_export(paths[entry.format], predicted, labels, float_logits,
                                      reference, rt, int8=result.method != "float"
                                      and entry.format not in registry.OWN_FORMATS)
            log.info("%s in %s: top-1 %.2f, %s", result.variant, rt, eq.top1, eq.reason)
            out.append(eq)
    return out


def _write_evaluations(cfg: RunConfig, store: Store, run: RunInfo, result: VariantResult,
                       equivalence: list[Equivalence]) -> None:
    """One `evaluations` row per runtime the variant was evaluated in (the TorchScript
    artifact's first: its loss and top-5 come from the in-process evaluation)."""
    rows = []
    for i, eq in enumerate(equivalence):
        entry = result.entry_for(eq.runtime)
        rows.append({
            "run_id": run.run_id, "variant": result.variant, "method": result.method,
            "model": cfg.model.name, "backend": result.backend,
            "engine": result.engine or "", "algorithms": result.algorithms,
            "runtime": eq.runtime, "format": entry.format, "top1": eq.top1,
            "top5": result.eval.top5 if i == 0 else None,
            "loss": result.eval.loss if i == 0 else None,
            "num_images": eq.num_images, "size_bytes": entry.size_bytes,
            "agreement": eq.agreement, "float_agreement": eq.float_agreement,
            "sqnr_db": eq.sqnr_db, "equivalent": eq.passed})
    metrics.write_rows(store, "evaluations", rows, run.run_id, result.variant, run.created_at)


def nncf_peer(cfg: RunConfig, staged: StagedData, run: RunInfo) -> VariantResult:
    """`nncf-ptq`: the fused float model quantized by NNCF's own `nncf.quantize` (its
    defaults) on the same calibration images as the PTQ variants, as OpenVINO IR; evaluated
    in OpenVINO on val/ and stored like every variant (it has no TorchScript artifact)."""
    store = store_of(cfg)
    fused = models.fuse(load_float(cfg, len(staged.classes)), is_qat=False)
    num_batches = cfg.variants[0].num_calibration_batches if cfg.variants else 32
    files = formats.nncf_peer(onnx_export.to_onnx_float(fused, cfg.data.transforms.input_size),
                              calibration_loader(cfg, staged, num_batches))
    (entry,) = formats.artifact_entries(files, cfg.nncf_peer, "ptq", None, int8=True)
    _store_files(store, run, entry, files)
    float_logits, labels = float_val_logits(cfg, staged, store, run)
    with tempfile.TemporaryDirectory(prefix="quantlab-nncf-") as tmp:
        path = registry.verified_copies(store, {"nncf": (run.run_id, entry)}, tmp)["nncf"]
        logits, _ = formats.predict(path, entry.runtimes[0], val_loader(cfg, staged),
                                    cfg.timing.num_threads, cfg.data.max_eval_batches)
        eq = formats.check_export(path, logits, labels, float_logits, None, entry.runtimes[0],
                                  int8=True)  # no artifact to agree with: int8 or not
    if eq.passed is None:
        eq = eq.model_copy(update={"reason": "NNCF's own PTQ: no TorchScript artifact to "
                                             "agree with; its IR is int8"})
    result = VariantResult(variant=cfg.nncf_peer, method="ptq", engine=None,
                           eval=result_of_logits(torch.from_numpy(logits), torch.from_numpy(labels)),
                           artifact=entry, algorithms="nncf.quantize", runtimes=[eq])
    _write_evaluations(cfg, store, run, result, result.runtimes)
    return result


def timed_pairs(results: list[VariantResult]) -> list[tuple[VariantResult, str]]:
    """(variant, runtime) pairs to time: each variant in every runtime it passed the check in
    (an export that diverged from its TorchScript artifact is not timed: it cannot be chosen)."""
    return [(r, eq.runtime) for r in results for eq in r.runtimes if eq.passed is not False]


def benchmark(cfg: RunConfig, run: RunInfo, results: list[VariantResult]) -> list[Latency]:
    """Time float and every int8 variant in each runtime it runs in (`timed_pairs`), all
    interleaved in one fresh process (see `timing.measure_files`); store one `benchmarks` row
    per (variant, runtime, setting). Every file is sha256-verified first."""
    b, store = cfg.timing, store_of(cfg)
    pairs = {f"{r.variant}/{rt}": (r, rt) for r, rt in timed_pairs(results)}
    entries = {f"{r.variant}.{e.format}": (run.run_id, e) for r, rt in pairs.values()
               for e in [r.entry_for(rt)]}
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-") as tmp:
        paths = registry.verified_copies(store, entries, tmp)
        files = {key: TimedFile(path=paths[f"{r.variant}.{r.entry_for(rt).format}"], runtime=rt)
                 for key, (r, rt) in pairs.items()}
        measured = measure_files(files, cfg.data.transforms.input_size, b.timed_batch_sizes,
                                 b.num_threads, b.warmup, b.iterations)
    rows, table = [], []
    for x in measured:
        r, rt = pairs[x.variant]
        rows.append(x.model_copy(update={"variant": r.variant}))
        table.append(table_row(
            rows[-1], run_id=run.run_id, model=cfg.model.name, engine=r.engine or "",
            input_size=cfg.data.transforms.input_size, source="quantlab", backend=r.backend,
            optimisation=r.entry_for(rt).optimisation, channels_last=False,
            weights="checkpoint", calibration="dataset", size_bytes=r.entry_for(rt).size_bytes))
    metrics.write_rows(store, "benchmarks", table, run.run_id, "pipeline", run.created_at)
    return rows


def select(cfg: RunConfig, results: list[VariantResult],
           latencies: list[Latency]) -> tuple[list[ResultRow], list[ResultRow], Selection]:
    """The run's comparison at the serving batch size: one row per (variant, runtime)
    evaluated, one per variant in its fastest runtime (float first), and the (variant, runtime)
    it ships with its verdict (quantlab.selection: float competes)."""
    pairs = [{"variant": r.variant, "method": r.method, "top1": eq.top1,
              "top5": r.eval.top5 if i == 0 else None,
              "size_bytes": r.entry_for(eq.runtime).size_bytes, "float_layers": r.float_layers,
              "algorithms": r.algorithms, "backend": r.backend, "runtime": eq.runtime,
              "agreement": eq.agreement,
              "equivalent": eq.passed, "float_agreement": eq.float_agreement,
              "check": eq.reason if eq.passed is not None else None,
              "sqnr_db": eq.sqnr_db if r.method != "float" else None}
             for r in results for i, eq in enumerate(r.runtimes)]
    serving = cfg.timing.serving_batch_size
    rows = comparison(pairs, latencies, serving)
    chosen = select_variant(rows, cfg.max_accuracy_drop, latencies, serving)
    return rows, fastest_per_variant(rows, chosen), chosen.model_copy(update={
        "load_snippet": runtimes.load_snippet(chosen.runtime, num_threads=cfg.timing.num_threads)})


def export_warnings(results: list[VariantResult]) -> list[str]:
    """A warning per variant that could not be exported, and per export that failed its check
    in a runtime (which the selection therefore leaves out)."""
    out = [f"{r.variant} was not exported (it is TorchScript only): {r.export_error}"
           for r in results if r.export_error]
    out += [f"{r.variant} in {eq.runtime} failed its export check and is not selected: "
            f"{eq.reason}" for r in results for eq in r.runtimes if eq.passed is False]
    return out


def baseline_warnings(results: list[VariantResult], rows: list[ResultRow],
                      num_classes: int, serving_batch_size: int = 1) -> list[str]:
    """Warnings that the float baseline looks broken or the timing stayed noisy
    (quantlab.selection); each is logged."""
    float_result = next(r for r in results if r.method == "float")
    found = (float_baseline_warnings(rows, float_result.eval.loss, num_classes)
             + timing_warnings(rows, serving_batch_size) + export_warnings(results))
    for w in found:
        log.warning("%s", w)
    return found


def regression_gate(cfg: RunConfig, run: RunInfo, staged: StagedData,
                    results: list[VariantResult], selected: Selection) -> GateVerdict | None:
    """May the selected variant replace `best-<model>`? None when the gate is disabled.

    The previous best is re-evaluated and re-timed here, side by side (quantlab.gate).
    """
    new = next(r for r in results if r.variant == selected.variant)
    top1 = next(eq.top1 for eq in new.runtimes if eq.runtime == selected.runtime)
    return gate_policy.regression_gate(cfg, store_of(cfg), staged, run.run_id,
                                       new.entry_for(selected.runtime), selected.runtime, top1)


def versions() -> dict[str, str]:
    """What made the run (the manifest's `versions`)."""
    return {"quantlab": __version__, "torch": torch.__version__,
            "python": platform.python_version(), **installed_versions("torchvision", "prefect")}


def finalize(cfg: RunConfig, run: RunInfo, staged: StagedData, results: list[VariantResult],
             pairs: list[ResultRow], rows: list[ResultRow], selected: Selection,
             epochs: list[dict] | None = None,
             ranking: SensitivityResult | None = None,
             gate: GateVerdict | None = None, trigger: TriggerInfo | None = None) -> Outcome:
    """Plot, write the report, then the manifest (last), then the aliases.

    A run whose regression gate failed is complete but "rejected": its manifest and report
    are written and `latest` points at it, so it can be inspected; `best` does not move.
    Returns the manifest and the report with the plot inlined (for a UI that cannot read
    the store).
    """
    store = store_of(cfg)
    base = registry.run_dir(run.run_id)
    warnings = baseline_warnings(results, rows, len(staged.classes),
                                 cfg.timing.serving_batch_size)
    png = report.plot(rows, epochs or [])
    store.write_bytes(f"{base}/report/comparison.png", png)
    manifest = Manifest(
        run_id=run.run_id, status="rejected" if gate and not gate.passed else "succeeded",
        created_at=run.created_at,
        finished_at=metrics.now(), model=cfg.model.name,
        input_size=cfg.data.transforms.input_size, max_accuracy_drop=cfg.max_accuracy_drop,
        config=cfg.model_dump(mode="json"), versions=versions(),
        dataset=DatasetInfo(uri=staged.uri, fingerprint=staged.fingerprint,
                            classes=staged.classes, num_train=staged.num_train,
                            num_val=staged.num_val, skipped_images=staged.skipped),
        checkpoint_layout=next((r.checkpoint_layout for r in results if r.method == "float"), None),
        warnings=warnings,
        artifacts=[r.artifact for r in results if r.artifact.format in registry.OWN_FORMATS],
        exports=[e for r in results for e in [r.artifact, *r.exports]
                 if e.format not in registry.OWN_FORMATS],
        results=rows, runtime_results=pairs,
        float_runtime=next((r.runtime for r in rows if r.method == "float"), None),
        selected=selected, gate=gate,
        report={"markdown": "report/report.md", "plot": "report/comparison.png"},
        trigger=trigger)
    fallback = next(((r.variant, r.fallback_steps) for r in results if r.fallback_steps), None)
    links = report_links(store, manifest)
    store.write_bytes(f"{base}/report/report.md",
                      report.markdown_report(manifest, links, None, ranking, fallback).encode())
    store.write_json(f"{base}/manifest.json", manifest.model_dump(mode="json"))  # last: complete
    registry.update_aliases(store, manifest)
    ui_report = report.markdown_report(manifest, links, report.data_uri(png), ranking, fallback)
    return Outcome(manifest=manifest, store=cfg.store, ui_report=ui_report,
                   most_sensitive=ranking.layers[:5] if ranking else [])


def report_links(store: Store, manifest: Manifest) -> dict[str, str]:
    """Where a run's artifacts, plot and report live: file:// links or store URIs."""
    base = registry.run_dir(manifest.run_id)
    links = {a.variant: store.url(f"{base}/{a.path}") for a in manifest.artifacts}
    links.update({f"{a.variant} ({a.format})": store.url(f"{base}/{a.path}")
                  for a in manifest.exports})
    links.update({name: store.url(f"{base}/{rel}") for name, rel in manifest.report.items()})
    links["manifest"] = store.url(f"{base}/manifest.json")
    return links
