"""The `quantlab` command line.

    quantlab demo [--store URI]                       the embedded default, end to end
    quantlab run CONFIG.yaml | --model ... --checkpoint URI --data URI --store URI
    quantlab qat CONFIG.yaml --run-id ID [--nnodes 2 --rdzv-endpoint HOST:PORT]
                                                      one node of a (multi-node) QAT job
    quantlab runs [--store URI]                       complete runs in a store
    quantlab show RUN|ALIAS [--store URI]             one run's manifest, results and choice
    quantlab pull RUN|ALIAS [--variant NAME|best] [--format torchscript|aoti|onnx|openvino] [--dest PATH]
    quantlab announce CHECKPOINT_URI --model NAME [--store URI] [--force]
                                                      emit the event that re-quantizes it
    quantlab deploy [--prefect-file deploy/prefect.yaml]  register the scheduled deployments
    quantlab serve [--prefect-file ...]                  serve them from this process
    quantlab bench [--model NAME] [--input-size N] [--threads 1,2] [--batch-sizes 1,8] ...

A user's mistake prints one line naming the bad value and the valid ones, and exits 2;
a run that the regression gate rejected exits 3; `--debug` shows the traceback.

The command line is the top layer (cli -> flows -> tasks -> quantlab). It imports flows, and
so Prefect, only inside the commands that run them, so that `quantlab show` stays quick.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated, Any, Optional

import typer
import yaml
from rich.console import Console

from quantlab._deprecations import silence_deprecations
from quantlab.errors import QuantlabError, RegressionError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Turn float PyTorch image classifiers into fast int8 models.")
def _console(stderr: bool = False) -> Console:
    """A console for stdout or stderr. Not a terminal (a pipe, a file, a CI log) and no
    COLUMNS set: no width limit, so tables keep every header and figure whole."""
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=100_000 if wide else None)


console = _console()
err_console = _console(stderr=True)
_state = {"debug": False}

StoreOpt = Annotated[str, typer.Option("--store", "-s", envvar="QUANTLAB_STORE",
                                       help="store root: a folder, file://, s3://bucket/prefix")]
StorageOpts = Annotated[Optional[list[str]], typer.Option(
    "--storage-option", "-o", help="fsspec storage option KEY=VALUE (repeatable), e.g. "
    "endpoint_url=http://127.0.0.1:5000; passed through the environment, never stored")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _state["debug"] = debug


def parse_pairs(option: str, items: list[str] | None) -> dict[str, Any]:
    """Repeated KEY=VALUE options -> a mapping; values are read as YAML (2 -> int, true -> bool)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise QuantlabError(f"{option} {item!r} must be KEY=VALUE")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def _apply_storage_options(options: list[str] | None) -> None:
    """KEY=VALUE pairs -> QUANTLAB_STORAGE_OPTIONS (reaches the store and the QAT workers)."""
    if not options:
        return
    parsed: dict[str, Any] = json.loads(os.environ.get("QUANTLAB_STORAGE_OPTIONS") or "{}")
    parsed.update(parse_pairs("--storage-option", options))
    os.environ["QUANTLAB_STORAGE_OPTIONS"] = json.dumps(parsed)


# The run settings that `run` and `qat` take as flags: flag (as typer names the parameter) ->
# the dotted RunConfig key it overrides. One table, so both commands spell a setting alike.
CONFIG_FLAGS = {
    "model": "model.name", "checkpoint": "model.checkpoint", "data": "data.uri",
    "store": "store", "cache_dir": "cache_dir", "input_size": "data.transforms.input_size",
    "qat_epochs": "qat.epochs", "epochs": "qat.epochs", "nproc_per_node": "qat.nproc_per_node",
    "threads_per_worker": "qat.threads_per_worker", "max_restarts": "qat.max_restarts",
    "nnodes": "qat.nnodes", "rdzv_endpoint": "qat.rdzv_endpoint", "rdzv_id": "qat.rdzv_id",
    "run_id": "run_id",
}


def config_overrides(**flags: Any) -> dict[str, Any]:
    """Flags given on the command line (None: not given) -> dotted RunConfig overrides."""
    return {CONFIG_FLAGS[name]: value for name, value in flags.items() if value is not None}


class _UserErrorsWithoutTraceback(logging.Filter):
    """For the terminal: a QuantlabError's message says what is wrong; its traceback is noise.

    Prefect logs a failing task's exception with its traceback; on the console (not in the
    run's log in the UI) this keeps the message line and drops the traceback. `--debug` keeps
    everything.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], QuantlabError):
            record.exc_info = record.exc_text = None
        return True


def _quiet_console_tracebacks() -> None:
    """Install the filter on the root logger's handlers (Prefect's console handler)."""
    if _state["debug"]:
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _UserErrorsWithoutTraceback) for f in handler.filters):
            handler.addFilter(_UserErrorsWithoutTraceback())


def _print_outcome(outcome) -> None:
    """What `demo` and `run` print: the table, sensitivity, fallback, gate and the choice."""
    from quantlab import report

    m = outcome.manifest
    console.print(report.rich_table(m.results, m.selected.variant, title=f"run {m.run_id}"))
    if outcome.most_sensitive:
        console.print("most sensitive layers: " + ", ".join(
            f"{x.layer} ({x.op_type}, top-1 drop {x.top1_drop:.2f}, "
            f"logits SQNR {x.output_sqnr_db:.1f} dB)" for x in outcome.most_sensitive))
    for r in m.results:
        if r.float_layers:
            console.print(f"{r.variant} keeps in float: {', '.join(r.float_layers)}")
    for w in m.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    if m.gate is not None:
        console.print(f"regression gate: {m.gate.reason}")
    console.print(f"selected [bold]{m.selected.variant}[/bold] in {m.selected.runtime}: "
                  f"{m.selected.reason}")
    for line in report.verdict_lines(m.selected):  # "[avx2,...]" is text, not rich markup
        console.print(line, highlight=False, markup=False)
    console.print(f"artifacts in {outcome.store}/runs/{m.run_id}/  "
                  f"(pull: quantlab pull {m.run_id} --store {outcome.store})")


CacheDirOpt = Annotated[Optional[str], typer.Option(
    help="local cache of staged data (default ~/.cache/quantlab)")]
NprocOpt = Annotated[Optional[int], typer.Option(
    "--nproc-per-node", "--world-size",
    help="QAT gloo workers on this node (--world-size: its old name)")]


@app.command()
def demo(store: StoreOpt = "./quantlab-store", storage_option: StorageOpts = None,
         qat_epochs: Annotated[int, typer.Option(min=1, help="QAT epochs")] = 3,
         nproc_per_node: NprocOpt = 2,
         cache_dir: CacheDirOpt = "~/.cache/quantlab",
         dataset: Annotated[str, typer.Option(
             help="digits (scikit-learn's, the default) or fashion-mnist (its idx files)")] = "digits",
         source: Annotated[Optional[str], typer.Option(
             help="folder of Fashion-MNIST's four idx files (default: where Debian's "
             "dataset-fashion-mnist installs them)")] = None,
         ) -> None:
    """Seed the store with a real dataset, train a float baseline once, run `quantize` on it."""
    from quantlab import data
    from quantlab import demo as demo_lib
    from quantlab.store import Store

    _apply_storage_options(storage_option)
    if demo_lib.recipe(dataset) is demo_lib.FASHION_MNIST:
        data.fashion_mnist_files(source or data.FASHION_MNIST_DIR)  # missing: one line, exit 2
    Store(store).check_writable()  # a missing bucket or bad credentials fail here, in seconds
    from quantlab_flows.demo import demo as demo_flow

    _quiet_console_tracebacks()
    _print_outcome(demo_flow(store=store, qat_epochs=qat_epochs, nproc_per_node=nproc_per_node,
                             cache_dir=cache_dir, dataset=dataset, source=source))


@app.command()
def run(config: Annotated[Optional[str], typer.Argument(help="YAML run config")] = None,
        config_file: Annotated[Optional[str], typer.Option(
            "--config", "-c", help="YAML run config (the same as the CONFIG argument)")] = None,
        model: Annotated[Optional[str], typer.Option(help="architecture name")] = None,
        checkpoint: Annotated[Optional[str], typer.Option(help="float state_dict URI")] = None,
        data: Annotated[Optional[str], typer.Option(help="ImageFolder dataset URI")] = None,
        store: Annotated[Optional[str], typer.Option("--store", "-s", help="store root URI")] = None,
        storage_option: StorageOpts = None,
        cache_dir: CacheDirOpt = None,
        input_size: Annotated[Optional[int], typer.Option(help="model input side, pixels")] = None,
        qat_epochs: Annotated[Optional[int], typer.Option(help="QAT epochs")] = None,
        nproc_per_node: NprocOpt = None,
        no_qat: Annotated[bool, typer.Option("--no-qat", help="skip QAT")] = False,
        skip_bad_images: Annotated[bool, typer.Option(
            "--skip-bad-images", help="leave undecodable images out (they are listed in the "
            "log and the manifest) instead of stopping")] = False,
        run_id: Annotated[Optional[str], typer.Option(help="resume this run id")] = None,
        ) -> None:
    """Run the `quantize` flow on your model and data (a YAML config and/or flags)."""
    from quantlab.config import load_config, merge_overrides, parse_config

    if config and config_file and config != config_file:
        raise typer.BadParameter(f"got two configs, {config!r} and --config {config_file!r}; "
                                 "give one", param_hint="CONFIG")
    config = config or config_file
    _apply_storage_options(storage_option)
    overrides = config_overrides(model=model, checkpoint=checkpoint, data=data, store=store,
                                 cache_dir=cache_dir, input_size=input_size,
                                 qat_epochs=qat_epochs, nproc_per_node=nproc_per_node,
                                 run_id=run_id)
    if no_qat:
        overrides["qat.enabled"] = False
    if skip_bad_images:
        overrides["data.skip_bad_images"] = True
    cfg = load_config(config, overrides) if config else parse_config(merge_overrides({}, overrides))
    from quantlab.pipeline import preflight

    preflight(cfg)  # bad input fails here, in seconds, before Prefect or any work starts
    from quantlab_flows.quantize import quantize

    _quiet_console_tracebacks()
    _print_outcome(quantize(cfg, validated=True))


@app.command()
def qat(config: Annotated[str, typer.Argument(help="YAML run config")],
        run_id: Annotated[str, typer.Option(help="the run to train; the same on every node")],
        nnodes: Annotated[Optional[str], typer.Option(
            help="nodes: N or MIN:MAX (torchrun --nnodes)")] = None,
        rdzv_endpoint: Annotated[Optional[str], typer.Option(
            help="HOST:PORT of the c10d rendezvous, reachable from every node")] = None,
        nproc_per_node: NprocOpt = None,
        threads_per_worker: Annotated[Optional[int], typer.Option(
            help="torch threads per worker")] = None,
        max_restarts: Annotated[Optional[int], typer.Option(
            help="torchrun restarts of the worker group")] = None,
        rdzv_id: Annotated[Optional[str], typer.Option(help="rendezvous id; default: the run id")] = None,
        epochs: Annotated[Optional[int], typer.Option(help="QAT epochs")] = None,
        store: Annotated[Optional[str], typer.Option("--store", "-s", help="store root URI")] = None,
        storage_option: StorageOpts = None,
        cache_dir: CacheDirOpt = None,
        ) -> None:
    """Run one node of a run's QAT stage; start the same command on every node.

    Each node stages the dataset into its own cache and starts its workers; they meet at the
    rendezvous, and global rank 0 writes the epoch rows and checkpoints to the (shared) store.
    A re-run with the same run id resumes from the newest checkpoint.
    """
    from quantlab import pipeline

    _apply_storage_options(storage_option)
    cfg = qat_config(config, run_id, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                     nproc_per_node=nproc_per_node, threads_per_worker=threads_per_worker,
                     max_restarts=max_restarts, rdzv_id=rdzv_id, epochs=epochs, store=store,
                     cache_dir=cache_dir)
    pipeline.preflight(cfg)
    staged = pipeline.stage(cfg)  # decodes every image: bad data fails before any write
    run = pipeline.start_run(cfg)
    from quantlab import report

    for name, backend in cfg.qat_variants():  # qat.backends: one QAT variant per backend
        rows = pipeline.train_qat(cfg, staged, run, on_line=print, backend=backend)
        console.print(report.epochs_table(rows, title=f"run {run.run_id}: {name} epochs"))
    console.print(f"finish the run (PTQ, export, benchmark, report): "
                  f"quantlab run {config} --run-id {run.run_id}")


def qat_config(config: str, run_id: str, **flags: Any):
    """The RunConfig one node of `quantlab qat` runs: the YAML config with the flags applied
    (flags named as `quantlab qat`'s options; None: not given)."""
    from quantlab.config import load_config

    return load_config(config, {"qat.enabled": True,
                                **config_overrides(run_id=run_id, **flags)})


@app.command()
def runs(store: StoreOpt = "./quantlab-store", storage_option: StorageOpts = None) -> None:
    """List the complete runs in a store (runs without a manifest are not listed)."""
    from rich.measure import Measurement
    from rich.table import Table

    from quantlab.registry import list_runs
    from quantlab.store import Store

    _apply_storage_options(storage_option)
    table = Table(title=f"runs in {store}")
    for col in ("run id", "finished (UTC)", "model", "status", "selected variant", "top-1 %",
                "speed-up"):
        table.add_column(col)
    def skipped(run_id: str, error: QuantlabError) -> None:
        err_console.print(f"[yellow]skipped run {run_id}:[/yellow] {error}", highlight=False,
                          soft_wrap=True)

    for m in list_runs(Store(store), on_invalid=skipped):
        best = next(r for r in m.results if r.variant == m.selected.variant)
        table.add_row(m.run_id, f"{m.finished_at:%Y-%m-%d %H:%M:%S}", m.model, m.status,
                      m.selected.variant + ("" if m.selected.within_budget else " (over budget)"),
                      f"{best.top1:.2f}", f"{best.speedup:.2f}x" if best.speedup else "-")
    # Never cut a cell (run ids are copied into `show` and `pull`): at its natural width the
    # table is whole in a pipe, and a narrow terminal wraps its lines instead.
    natural = Measurement.get(console, console.options.update(max_width=1000), table).maximum
    Console(width=max(console.width, natural)).print(table)


@app.command()
def show(ref: Annotated[str, typer.Argument(help="run id or alias (latest, best, ...)")],
         store: StoreOpt = "./quantlab-store", storage_option: StorageOpts = None,
         json_output: Annotated[bool, typer.Option("--json", help="print the manifest")] = False,
         ) -> None:
    """Show one run: results, the selected variant and why, artifacts with sha256."""
    from quantlab import report
    from quantlab.registry import load_manifest, resolve
    from quantlab.store import Store

    _apply_storage_options(storage_option)
    st = Store(store)
    m = load_manifest(st, resolve(st, ref))
    if json_output:
        console.print_json(m.model_dump_json())
        return
    console.print(report.rich_table(m.results, m.selected.variant,
                                    title=f"run {m.run_id}: {m.model} ({m.status})"))
    console.print(f"selected [bold]{m.selected.variant}[/bold] in {m.selected.runtime}: "
                  f"{m.selected.reason}")
    for line in report.verdict_lines(m.selected):  # "[avx2,...]" is text, not rich markup
        console.print(line, highlight=False, markup=False)
    for r in m.results:
        if r.float_layers:
            console.print(f"{r.variant} keeps in float: {', '.join(r.float_layers)}")
    if m.gate is None:
        console.print("regression gate: disabled")
    else:
        verdict = "passed" if m.gate.passed else "[red]FAILED[/red] (best was not moved)"
        console.print(f"regression gate {verdict}: {m.gate.reason}")
    console.print(f"dataset {m.dataset.uri} ({m.dataset.fingerprint[:16]}…), "
                  f"{m.dataset.num_train} train / {m.dataset.num_val} val")
    if m.dataset.skipped_images:
        console.print(f"{len(m.dataset.skipped_images)} undecodable image(s) left out: "
                      + ", ".join(m.dataset.skipped_images[:10])
                      + (" …" if len(m.dataset.skipped_images) > 10 else ""), highlight=False)
    for a in m.artifacts + m.exports:
        console.print(f"  {a.variant:<16} {a.format:<11} {a.size_bytes:>10,} B  sha256 "
                      f"{a.sha256[:16]}…  {st.uri(f'runs/{m.run_id}/{a.path}')}")


@app.command()
def pull(ref: Annotated[str, typer.Argument(help="run id or alias (latest, best, ...)")],
         variant: Annotated[str, typer.Option(help="variant name, or best (the selected one)")] = "best",
         dest: Annotated[Optional[str], typer.Option(help="file (or folder) to write")] = None,
         format: Annotated[Optional[str], typer.Option(
             "--format", help="torchscript, aoti, onnx or openvino (an IR: .xml and .bin); "
             "default: the format best was selected in, for a named variant the one its backend "
             "ships (torchscript; aoti for PT2E variants)")] = None,
         force: Annotated[bool, typer.Option(
             "--force", help="pull an ONNX/OpenVINO export even though it failed the run's "
             "check against its TorchScript artifact")] = False,
         store: StoreOpt = "./quantlab-store", storage_option: StorageOpts = None) -> None:
    """Download a model, verifying its sha256 against the run's manifest.

    `best` is the run's selected variant; the promoted model of a model name is the alias
    `best-<model>` (moved only by runs that pass the regression gate). An export that
    diverged from its TorchScript artifact is refused (exit 2) unless --force.
    """
    from quantlab import runtimes
    from quantlab.registry import FORMATS, failed_check, load_manifest, resolve
    from quantlab.registry import pull as pull_artifact
    from quantlab.store import Store

    if format is not None and format not in FORMATS:
        raise typer.BadParameter(f"{format!r} is not an artifact format; valid: "
                                 f"{', '.join(FORMATS)}", param_hint="--format")
    _apply_storage_options(storage_option)
    st = Store(store)
    manifest = load_manifest(st, resolve(st, ref))
    path = pull_artifact(st, manifest.run_id, variant=variant, dest=dest, format=format,
                         force=force)
    if variant == "best" and manifest.status == "rejected":
        err_console.print(f"[yellow]warning:[/yellow] run {manifest.run_id} was rejected by the "
                          f"regression gate; the promoted model is best-{manifest.model}",
                          highlight=False, soft_wrap=True)
    elif variant == "best" and not manifest.selected.within_budget:
        err_console.print(f"[yellow]warning:[/yellow] run {manifest.run_id}'s best variant "
                          f"{manifest.selected.variant} is outside its accuracy budget "
                          f"({manifest.selected.reason})", highlight=False, soft_wrap=True)
    entry = manifest.artifact(variant, format or (manifest.selected.format if variant == "best"
                                                  else None))
    if problem := failed_check(manifest, entry):  # only with --force: pull refuses it otherwise
        err_console.print(f"[yellow]warning:[/yellow] {problem}; pulled anyway (--force)",
                          highlight=False, soft_wrap=True)
    selected = variant in ("best", manifest.selected.variant) and \
        entry.format == manifest.selected.format
    runtime = manifest.selected.runtime if selected else (entry.runtimes or ["torch"])[0]
    also = " and its .bin" if entry.files else ""
    console.print(f"wrote {path}{also} (sha256 verified); load it in {runtime}:", highlight=False)
    console.print(runtimes.load_snippet(runtime, os.path.basename(path)), highlight=False,
                  markup=False)


@app.command()
def announce(checkpoint_uri: Annotated[str, typer.Argument(help="float checkpoint URI or path")],
             model: Annotated[str, typer.Option(help="architecture name, as the quantize "
                                                     "deployment's trigger matches it")],
             store: Annotated[Optional[str], typer.Option(
                 "--store", "-s", envvar="QUANTLAB_STORE",
                 help="the quantize deployment's store: its seen-set skips content already "
                 "quantized, rejected or pending, and retries a failed one (without it, the "
                 "run itself checks)")] = None,
             storage_option: StorageOpts = None,
             force: Annotated[bool, typer.Option(
                 "--force", help="re-quantize content that was quantized or rejected, or "
                 "announce pending content again")] = False,
             ) -> None:
    """Emit `quantlab.checkpoint.landed` for a new float checkpoint (PREFECT_API_URL's API).

    The event's payload: the checkpoint URI, its sha256, the model name, `source: announce`
    and `force`; its resource: quantlab.checkpoint.<sha256>, labelled quantlab.model=NAME.
    Content whose run failed is announced again without --force. Pending content, forced: a
    run that finds another run still quantizing it ends at once.
    """
    import re

    from quantlab import checkpoints
    from quantlab.config import NAME_PATTERN
    from quantlab.errors import ConfigError, NotFoundError
    from quantlab.store import PREFLIGHT_RETRY_DELAYS, Store

    if not re.match(NAME_PATTERN, model):
        raise ConfigError(f"--model {model!r} is not a model name (letters, digits, . _ -), "
                          "e.g. mobilenet_v2")
    _apply_storage_options(storage_option)
    parent, name = checkpoints.split_uri(checkpoint_uri)
    if not Store(parent, retry_delays=PREFLIGHT_RETRY_DELAYS).exists(name):
        raise NotFoundError(f"checkpoint {checkpoint_uri} does not exist (or cannot be read)")
    if store:
        seen = checkpoints.CheckpointRegistry(Store(store, retry_delays=PREFLIGHT_RETRY_DELAYS))
        sha256 = seen.identify(checkpoint_uri)
        record, new = seen.remember(sha256, checkpoint_uri, model)
    else:
        sha256, record, new = checkpoints.sha256_of(checkpoint_uri), None, True
    from quantlab_tasks.events import api_url, emit

    if not api_url():
        err_console.print("[yellow]warning:[/yellow] PREFECT_API_URL is not set: the event goes "
                          "to an ephemeral Prefect API that ends with this command, so no "
                          "deployment sees it; set PREFECT_API_URL to your server's API "
                          "(e.g. http://127.0.0.1:4200/api)", highlight=False, soft_wrap=True)
    failed = checkpoints.failed_earlier(record)
    why = None if new or failed else (checkpoints.already_handled(record)
                                      or "already announced, no run has claimed it yet")
    if why and not force:
        sent = emit(checkpoints.DUPLICATE, sha256, model, checkpoint_uri, flush=True,
                    run_id=record.run_id, outcome=record.outcome, message=why)
        hint = "announces it again" if record.outcome == "pending" else "re-quantizes it"
        console.print(f"{checkpoint_uri} (sha256 {sha256[:12]}): {why}; not announced "
                      f"(--force {hint})", highlight=False, soft_wrap=True)
    else:
        if failed:
            console.print(f"{checkpoint_uri} (sha256 {sha256[:12]}): {failed}; retrying",
                          highlight=False, soft_wrap=True)
        if record is not None and record.outcome != "pending":
            seen.reset(sha256)
        sent = emit(checkpoints.LANDED, sha256, model, checkpoint_uri, flush=True,
                    source="announce", force=force)
        console.print(f"emitted {sent['event']} for {checkpoint_uri} (sha256 {sha256[:12]})",
                      highlight=False, soft_wrap=True)
    console.print_json(json.dumps(sent))


PrefectFileOpt = Annotated[Optional[str], typer.Option(
    "--prefect-file", help="deployments file (default: deploy/prefect.yaml of this checkout)")]
SlotsOpt = Annotated[int, typer.Option(
    "--compute-slots", "--qat-slots", min=1,
    help="heavy compute stages (QAT, timing) at a time, if the tag:quantlab-compute limit must "
    "be created (--qat-slots: its old name)")]


@app.command()
def deploy(prefect_file: PrefectFileOpt = None, compute_slots: SlotsOpt = 1) -> None:
    """Register the deployments with the Prefect API (PREFECT_API_URL) for a worker to run.

    Creates the process work pool and the compute concurrency limit if missing, then runs
    `prefect deploy --all` on the file. Start a worker with `prefect worker start --pool POOL`.
    """
    from quantlab_flows import deployments

    deployments.deploy(prefect_file, compute_slots)


@app.command()
def serve(prefect_file: PrefectFileOpt = None, compute_slots: SlotsOpt = 1) -> None:
    """Serve the deployments from this process (no work pool, no worker) until Ctrl-C."""
    from quantlab_flows import deployments

    deployments.serve(prefect_file, compute_slots)


def _csv(option: str, value: str, cast=str) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise QuantlabError(f"{option} {value!r} must be a comma-separated list of "
                            f"{cast.__name__}s, e.g. 1,2") from None


@app.command()
def bench(model: Annotated[str, typer.Option(help="architecture name")] = "mobilenet_v2",
          input_size: Annotated[int, typer.Option(help="input side, pixels")] = 224,
          num_classes: Annotated[int, typer.Option(help="classifier outputs")] = 1000,
          model_arg: Annotated[Optional[list[str]], typer.Option(
              help="constructor argument KEY=VALUE (repeatable), e.g. width_mult=0.5")] = None,
          checkpoint: Annotated[Optional[str], typer.Option(
              help="float state_dict URI; default: random weights (timing only)")] = None,
          store: StoreOpt = "./quantlab-store", storage_option: StorageOpts = None,
          threads: Annotated[str, typer.Option(help="intra-op thread counts")] = "1,2",
          batch_sizes: Annotated[str, typer.Option(help="batch sizes")] = "1,8",
          variants: Annotated[str, typer.Option(help="quantlab PTQ presets")] = "ptq-minmax,ptq-x86",
          engines: Annotated[str, typer.Option(
              help="engines of the plain-torch int8 candidates (quantlab's int8 artifacts are "
              "loaded under each too)")] = "x86,onednn",
          optimisations: Annotated[str, typer.Option(
              help="plain-torch candidates: script, freeze, optimize_for_inference")
          ] = "freeze,optimize_for_inference",
          channels_last: Annotated[bool, typer.Option(
              "--channels-last", help="also time channels-last plain-torch candidates")] = False,
          warmup: Annotated[int, typer.Option(help="untimed calls per model and setting")] = 10,
          iterations: Annotated[int, typer.Option(help="timed calls per model and setting")] = 100,
          no_profile: Annotated[bool, typer.Option(
              "--no-profile", help="skip load time and peak memory (fresh processes)")] = False,
          no_runtimes: Annotated[bool, typer.Option(
              "--no-runtimes", help="TorchScript only: no ONNX Runtime / OpenVINO exports, "
              "no nncf-ptq")] = False,
          no_pt2e: Annotated[bool, typer.Option(
              "--no-pt2e", help="no PT2E rows (pt2e-x86 as an AOTInductor package, and its "
              "torch.compile reference)")] = False,
          ) -> None:
    """Time float vs int8 (quantlab's artifacts and plain torch), store and print the table."""
    from quantlab import bench, report

    _apply_storage_options(storage_option)
    kwargs = parse_pairs("--model-arg", model_arg)
    spec = bench.parse_spec({
        "model": model, "input_size": input_size, "num_classes": num_classes,
        "model_kwargs": kwargs, "checkpoint": checkpoint,
        "threads": _csv("--threads", threads, int),
        "batch_sizes": _csv("--batch-sizes", batch_sizes, int),
        "variants": _csv("--variants", variants), "engines": _csv("--engines", engines),
        "optimisations": _csv("--optimisations", optimisations), "channels_last": channels_last,
        "warmup": warmup, "iterations": iterations, "profile": not no_profile,
        "runtimes": not no_runtimes, "pt2e": not no_pt2e})
    result = bench.run(spec, store, log=lambda line: err_console.print(line, highlight=False))
    title = f"{spec.model} {spec.input_size}x{spec.input_size}, {result.weights} weights"
    console.print(report.dict_table(bench.formatted_rows(result.rows), title=title))
    console.print(report.dict_table(bench.formatted_figures(
        bench.summarize(result.rows)), title="int8 vs float and vs plain torch", num_left=1))
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"rows stored in {store}/metrics/benchmarks (run_id {result.run_id})")


# typer ships its own copy of click (typer._click): catch its usage errors by their base class.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """Entry point: run the app; user errors and usage errors become one line and exit 2."""
    from quantlab_flows import set_prefect_defaults  # imports no Prefect

    # Before any command imports Prefect: its ephemeral server (what `demo` and `run` start
    # without PREFECT_API_URL) with no analytics and time to start on a busy machine.
    set_prefect_defaults()
    silence_deprecations()
    # quantlab's own warnings (storage retries) reach the terminal through Prefect's console
    # handler during a flow; before one, the error message that follows says it all.
    logging.getLogger("quantlab").addHandler(logging.NullHandler())
    try:
        app(prog_name="quantlab", standalone_mode=False)
    except QuantlabError as e:
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(3 if isinstance(e, RegressionError) else 2)
    except ClickException as e:  # an unknown option, a bad value, a missing argument
        if _state["debug"]:
            raise
        ctx = getattr(e, "ctx", None)
        command = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
        path = ctx.command_path if ctx is not None else f"quantlab {command}".strip()
        hint = f" (see {path} --help)"
        err_console.print(f"[red]error:[/red] {e.format_message()}{hint}", highlight=False,
                          soft_wrap=True)
        sys.exit(e.exit_code)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)


if __name__ == "__main__":
    main()
