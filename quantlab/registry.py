"""Runs in a store: manifests, aliases, and pulling verified models.

    <store>/runs/<run_id>/manifest.json     written last: its presence means the run is complete
    <store>/aliases/<name>.json             latest, best, latest-<model>, best-<model>

A reader trusts an artifact only through a manifest whose sha256 matches its bytes:

    from quantlab.registry import pull
    path = pull("s3://bucket/lab", "latest", variant="best", dest="model.pt")
    torch.jit.load(path)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from quantlab.config import NAME_PATTERN
from quantlab.errors import (ConfigError, ExportCheckError, IntegrityError, NotFoundError,
                             StoreError)
from quantlab.store import Store, check_relpath

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
_NAME = NAME_PATTERN


def run_dir(run_id: str) -> str:
    return f"runs/{run_id}"


FORMATS = ("torchscript", "aoti", "onnx", "openvino")
Format = Literal["torchscript", "aoti", "onnx", "openvino"]
# What a quantlab backend ships (a manifest's `artifacts`): eager mode TorchScript, PT2E an
# AOTInductor package; the other formats are exports of them (`exports`).
OWN_FORMATS = ("torchscript", "aoti")
# The files of an artifact in each format, in its variant's folder; the first is the one a
# runtime loads (an OpenVINO IR is two files, which must stay side by side with one stem).
FORMAT_FILES = {"torchscript": ("model.torchscript.pt",), "aoti": ("model.pt2",),
                "onnx": ("model.onnx",),
                "openvino": ("model.xml", "model.bin")}


def artifact_path(variant: str, format: str = "torchscript") -> str:
    """Path of a variant's artifact file (the loaded one) in `format`, relative to the run folder."""
    return f"artifacts/{variant}/{FORMAT_FILES[format][0]}"


def checkpoint_dir(backend: str = "eager") -> str:
    """Where a run's QAT checkpoints of `backend`'s QAT variant live (the run folder's)."""
    return "checkpoints/qat" if backend == "eager" else f"checkpoints/qat-{backend}"


def checkpoint_path(epoch: int, backend: str = "eager") -> str:
    return f"{checkpoint_dir(backend)}/epoch-{epoch:04d}.pt"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _plain_relative(v: str) -> str:
    try:
        plain = check_relpath(v) == v and not v.startswith(".")
    except StoreError:
        plain = False
    if not plain:
        raise ValueError(f"artifact path {v!r} must be a plain relative path")
    return v


RelPath = Annotated[str, AfterValidator(_plain_relative)]


class FileEntry(_Strict):
    """A further file of a multi-file artifact (an OpenVINO IR's model.bin)."""

    path: RelPath                           # relative to the run folder
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class ArtifactEntry(_Strict):
    variant: str = Field(pattern=_NAME)
    method: Literal["float", "ptq", "qat"]
    path: RelPath                           # relative to the run folder: the file a runtime loads
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)                # of that file (`size_bytes`: of all its files)
    format: Format = "torchscript"
    engine: str | None = None               # quantized engine the weights were packed for
    optimisation: str = "script"            # export.OPTIMISATIONS: script | freeze; qdq | ir
    files: list[FileEntry] = []             # further files, verified with it (IR: model.bin)
    runtimes: list[str] = []                # where it runs (quantlab.runtimes); [] = torch
    made_by: dict[str, str] = {}            # versions of the libraries that made it

    @property
    def size_bytes(self) -> int:
        return self.bytes + sum(f.bytes for f in self.files)

    def all_files(self) -> list[FileEntry]:
        """Every file of the artifact, the loaded one first, each with its sha256."""
        return [FileEntry(path=self.path, sha256=self.sha256, bytes=self.bytes), *self.files]


class ResultRow(_Strict):
    variant: str = Field(pattern=_NAME)
    method: Literal["float", "ptq", "qat"]
    top1: float
    top5: float | None = None             # None with 5 classes or fewer
    size_bytes: int
    latency_ms: float | None                # median, at the run's serving batch size
    speedup: float | None                   # float latency / this latency
    float_layers: list[str] = []            # layers kept in float (fallback variants)
    algorithms: str = ""                    # e.g. "minmax+cle+bc"; "" for float
    latency_noise: float | None = None      # relative spread of the timing rounds (serving batch)
    noisy: bool = False                     # that timing stayed noisy after re-measuring
    runtime: str = "torch"                  # where it ran: quantlab.runtimes (torch-x86, openvino..)
    backend: Literal["eager", "pt2e"] = "eager"  # the stack that made it (quantlab.backend)
    format: Format = "torchscript"
    agreement: float | None = None          # % of val images with the variant's own
                                            # artifact's top-1 (exports only)
    equivalent: bool | None = None          # the export passed its check (None: TorchScript)
    check: str | None = None                # the check's one-line reason (formats.check_export)
    float_agreement: float | None = None    # % of val images with float's top-1 class
    sqnr_db: float | None = None            # logits against float's on val/, dB
    speedup_vs_torchscript: float | None = None  # against the float TorchScript file (`speedup`:
                                            # against the run's fastest float runtime)


class BatchSpeedup(_Strict):
    """At one timed batch size: the fastest int8 pair within the budget against the fastest
    float pair (None: no int8 pair within the budget was timed at that batch)."""

    batch_size: int
    float_variant: str = "float"
    float_runtime: str
    float_ms: float
    int8_variant: str | None = None
    int8_runtime: str | None = None
    int8_ms: float | None = None
    speedup: float | None = None            # float_ms / int8_ms
    noise: float | None = None              # of that ratio (quantlab.timing.noise_of)
    beyond_noise: bool = False              # the int8 pair is faster beyond the noise
    noisy: bool = False                     # either timing stayed noisy after re-measuring


class Verdict(_Strict):
    """Does int8 pay off on this CPU, at this size? The record behind the selection."""

    serving_batch_size: int                 # the batch the selection was judged at
    int8_pays: bool                         # an int8 pair was chosen over float
    sentence: str                           # the verdict in one sentence, for people
    cpu: str = ""                           # model and int8 ISA flags (quantlab.timing.cpu_info)
    speedups: list[BatchSpeedup] = []       # at every timed batch size, serving batch included
    noisy: bool = False                     # the choice rests on timing that stayed noisy
    steps: list[str] = []                   # how the choice moved: most accurate first, then
                                            # only to pairs faster beyond the noise


class Selection(_Strict):
    variant: str = Field(pattern=_NAME)
    reason: str
    within_budget: bool
    runtime: str = "torch"                  # the runtime it was chosen in (quantlab.runtimes)
    format: Format = "torchscript"
    load_snippet: str = ""                  # three lines that load and run it without quantlab
    verdict: Verdict | None = None          # None: a run from before float competed


class GateVerdict(_Strict):
    """The regression gate's decision on moving `best-<model>` to this run (see pipeline)."""

    passed: bool
    reason: str
    previous_run_id: str | None = None      # the best-<model> run compared with
    previous_variant: str | None = None
    same_dataset: bool | None = None        # dataset fingerprints equal
    previous_top1: float | None = None      # re-evaluated on this run's val/
    top1: float | None = None
    previous_latency_ms: float | None = None  # at batch_size, timed side by side in this run
    latency_ms: float | None = None
    latency_attempts: int | None = None     # side-by-side measurements taken (median kept)
    latency_noise: float | None = None      # of the ratio latency_ms / previous_latency_ms
    batch_size: int = 1                     # the serving batch size the latencies are at
    max_accuracy_drop: float
    max_latency_increase: float


class DatasetInfo(_Strict):
    uri: str
    fingerprint: str
    classes: list[str]
    num_train: int
    num_val: int
    skipped_images: list[str] = []          # undecodable images left out (skip_bad_images)


class TriggerInfo(_Strict):
    """What started a run: a schedule, a checkpoint event (announce, watcher) or a person."""

    kind: Literal["schedule", "announce", "watcher", "manual"]
    event_id: str | None = None             # the Prefect event that started it
    checkpoint_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    run_id: str = Field(pattern=_NAME)
    status: Literal["succeeded", "rejected"]   # rejected: complete, but the gate kept `best`
    created_at: datetime
    finished_at: datetime
    model: str = Field(pattern=_NAME)       # names files that `pull` writes: no path separators
    input_size: int
    max_accuracy_drop: float
    config: dict[str, Any]
    versions: dict[str, str]
    dataset: DatasetInfo
    checkpoint_layout: str | None = None    # what the float checkpoint held, e.g. "a state_dict"
    artifacts: list[ArtifactEntry]          # one per variant: TorchScript (eager) or AOTI (pt2e)
    exports: list[ArtifactEntry] = []       # ONNX and OpenVINO IR files of the variants
    results: list[ResultRow]                # one per variant, in its fastest runtime
    runtime_results: list[ResultRow] = []   # one per (variant, runtime) timed
    float_runtime: str | None = None        # the fastest float runtime: what `speedup` is against
    selected: Selection
    gate: GateVerdict | None = None         # None: the gate was disabled
    warnings: list[str] = []                # what looked wrong (e.g. a broken float baseline)
    report: dict[str, str] = {}             # name -> path relative to the run folder
    trigger: TriggerInfo | None = None      # None: a run from before triggers were recorded

    def artifact(self, variant: str, format: str | None = None) -> ArtifactEntry:
        """A variant's artifact in `format` (`best`: the selected variant); None: the one its
        backend ships (TorchScript, or AOTI for a PT2E variant; nncf-ptq: its IR)."""
        if variant == "best":
            variant = self.selected.variant
        entries = [a for a in self.artifacts + self.exports if a.variant == variant]
        if not entries:
            names = dict.fromkeys(a.variant for a in self.artifacts + self.exports)
            raise NotFoundError(f"run {self.run_id} has no variant {variant!r}; valid: "
                                f"{', '.join(['best', *names])}")
        for a in entries:
            if a.format == format or format is None:
                return a
        raise NotFoundError(f"run {self.run_id} has no {format} artifact of {variant}; valid "
                            f"formats: {', '.join(a.format for a in entries)}")


class Alias(_Strict):
    name: str = Field(pattern=_NAME)
    run_id: str = Field(pattern=_NAME)
    model: str = Field(pattern=_NAME)
    variant: str | None = Field(None, pattern=_NAME)
    updated_at: datetime


def load_manifest(store: Store, run_id: str) -> Manifest:
    """The validated manifest of a complete run (NotFoundError if the run is incomplete)."""
    _check_name("run id", run_id)
    try:
        return _read_manifest(store, run_id)
    except NotFoundError:
        raise NotFoundError(f"run {run_id!r} is not in {store.root} or did not complete "
                            "(no manifest.json)") from None


def list_runs(store: Store,
              on_invalid: Callable[[str, IntegrityError], None] | None = None) -> list[Manifest]:
    """Complete runs, oldest first. Runs without a manifest (running, failed) are skipped.

    A manifest that is not valid (tampered with, or of another schema) is skipped too, and
    reported to `on_invalid(run_id, error)` (by default a warning in the log): one bad run
    does not hide the others.
    """
    out = []
    for run_id in store.list_dir("runs"):
        try:
            out.append(_read_manifest(store, run_id))
        except NotFoundError:
            continue  # no manifest: the run is running, failed or was interrupted
        except IntegrityError as e:
            if on_invalid is None:
                log.warning("skipping run %s: %s", run_id, e)
            else:
                on_invalid(run_id, e)
    return sorted(out, key=lambda m: m.created_at)


def _read_manifest(store: Store, run_id: str) -> Manifest:
    rel = f"{run_dir(run_id)}/manifest.json"
    manifest = _validate(Manifest, store.read_json(rel), store.uri(rel))
    if manifest.run_id != run_id:
        raise IntegrityError(f"{store.uri(rel)} names run {manifest.run_id!r}, not {run_id!r}; "
                             "refusing it")
    return manifest


def list_aliases(store: Store) -> list[Alias]:
    names = [n.removesuffix(".json") for n in store.list_dir("aliases") if n.endswith(".json")]
    return [read_alias(store, n) for n in names]


def read_alias(store: Store, name: str) -> Alias:
    _check_name("alias", name)
    rel = f"aliases/{name}.json"
    return _validate(Alias, store.read_json(rel), store.uri(rel))


def write_alias(store: Store, name: str, run_id: str, model: str, variant: str | None,
                updated_at: datetime) -> None:
    """Point an alias at a run (one atomic object write: last writer wins, never torn)."""
    alias = Alias(name=name, run_id=run_id, model=model, variant=variant, updated_at=updated_at)
    store.write_json(f"aliases/{name}.json", alias.model_dump(mode="json"))


def resolve(store: Store, ref: str) -> str:
    """A run id from a run id or an alias name."""
    _check_name("run or alias", ref)
    if store.exists(f"aliases/{ref}.json"):
        return read_alias(store, ref).run_id
    if store.exists(f"{run_dir(ref)}/manifest.json"):
        return ref
    if store.exists(f"{run_dir(ref)}/run.json"):
        raise NotFoundError(f"run {ref!r} did not complete (no manifest.json): it is still running, "
                            "failed or was interrupted; only complete runs can be shown or pulled")
    aliases = [a.name for a in list_aliases(store)]
    runs = [m.run_id for m in list_runs(store)][-3:]
    raise NotFoundError(f"{ref!r} is neither a complete run nor an alias in {store.root}; "
                        f"aliases: {', '.join(aliases) or 'none'}; recent runs: "
                        f"{', '.join(runs) or 'none'}")


def verify(data: bytes, entry: ArtifactEntry | FileEntry, where: str) -> None:
    """Raise IntegrityError unless `data` has the manifest entry's sha256 and size."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256 or len(data) != entry.bytes:
        raise IntegrityError(f"{where} does not match its manifest (sha256 {digest[:12]}… != "
                             f"{entry.sha256[:12]}…); refusing to use it")


def read_verified(store: Store, run_id: str, entry: ArtifactEntry | FileEntry) -> bytes:
    """An artifact's (loaded) file, verified against its manifest entry's sha256 and size."""
    rel = f"{run_dir(run_id)}/{entry.path}"
    data = store.read_bytes(rel)
    verify(data, entry, store.uri(rel))
    return data


def failed_check(manifest: Manifest, entry: ArtifactEntry) -> str | None:
    """Why an export (ONNX, OpenVINO IR; nncf-ptq's IR too) failed the run's check against its
    TorchScript artifact, in one line naming the agreement; None when it passed, is not an
    export, or the manifest predates the check (`runtime_results` rows of its variant and
    runtimes with `equivalent` False)."""
    if entry.format in OWN_FORMATS:
        return None
    failed = [r for r in manifest.runtime_results if r.variant == entry.variant
              and r.runtime in entry.runtimes and r.equivalent is False]
    if not failed:
        return None
    row = failed[0]
    why = row.check or (f"top-1 agrees with the TorchScript artifact on {row.agreement:.2f}% "
                        "of val images" if row.agreement is not None else "see quantlab show")
    return f"{entry.variant}'s {entry.format} export failed its check in {row.runtime}: {why}"


def read_artifact(store: Store, manifest: Manifest, variant: str = "best",
                  format: str | None = None, force: bool = False) -> bytes:
    """A complete run's artifact file (`best`: the selected variant; `format` None: the one
    its backend ships), verified. An export that failed its check (`failed_check`) raises
    ExportCheckError unless `force`."""
    entry = manifest.artifact(variant, format)
    _refuse_failed(manifest, entry, force)
    return read_verified(store, manifest.run_id, entry)


def _refuse_failed(manifest: Manifest, entry: ArtifactEntry, force: bool) -> None:
    problem = None if force else failed_check(manifest, entry)
    if problem:
        raise ExportCheckError(f"{problem}; --force pulls it anyway")


def load_artifact(store: Store, run_id: str, entry: ArtifactEntry):
    """An artifact as a TorchScript module, loaded only after its sha256 is verified (it is code)."""
    from quantlab import export  # torch: only for the callers that load models

    return export.load(read_verified(store, run_id, entry), engine=entry.engine)


def verified_copies(store: Store, entries: dict[str, tuple[str, ArtifactEntry]],
                    folder: str) -> dict[str, str]:
    """Local copies of artifacts ({name: (run_id, entry)}), every file sha256-verified, each
    artifact in its own folder (an IR's two files side by side); the paths of the loaded files."""
    paths = {}
    for name, (run_id, entry) in entries.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for f in entry.all_files():
            with open(os.path.join(folder, name, os.path.basename(f.path)), "wb") as out:
                out.write(read_verified(store, run_id, f))
        paths[name] = os.path.join(folder, name, os.path.basename(entry.path))
    return paths


def update_aliases(store: Store, manifest: Manifest) -> None:
    """latest and latest-<model> always; best and best-<model> point at the selected variant,
    unless the regression gate rejected the run."""
    when = manifest.finished_at
    for name in ("latest", f"latest-{manifest.model}"):
        write_alias(store, name, manifest.run_id, manifest.model, None, when)
    if manifest.status == "rejected":
        return
    for name in (f"best-{manifest.model}", "best"):
        write_alias(store, name, manifest.run_id, manifest.model, manifest.selected.variant, when)


def pull(store: Store | str, ref: str, variant: str = "best", dest: str | None = None,
         format: str | None = None, force: bool = False) -> str:
    """Download a run's artifact to `dest`, verifying sha256 first; returns the path written.

    `dest`: a file, or a folder (existing, or ending with "/") for the file's own name.
    `format`: torchscript, aoti, onnx or openvino; default: the format the run selected `best`
    in, or the one a named variant's backend ships (TorchScript; AOTI for PT2E variants). An OpenVINO IR is two files (<stem>.xml and
    <stem>.bin): both are verified before either is written. Each file streams into a temp
    file next to `dest` while being hashed; only when every file matches are they renamed
    into place. On a mismatch nothing is left at `dest`. An export that failed the run's check
    against its TorchScript artifact (`failed_check`) raises ExportCheckError before anything
    is written, unless `force`.
    """
    store = Store(store) if isinstance(store, str) else store
    manifest = load_manifest(store, resolve(store, ref))
    if format is None:
        format = manifest.selected.format if variant == "best" else None
    if format is not None and format not in FORMATS:
        raise NotFoundError(f"unknown artifact format {format!r}; valid: {', '.join(FORMATS)}")
    entry = manifest.artifact(variant, format)
    _refuse_failed(manifest, entry, force)
    format = entry.format
    # Every part of the name matched a pattern without path separators when the manifest was
    # validated: a crafted manifest cannot steer the file out of `dest`.
    suffix = os.path.splitext(entry.path)[1] if format != "torchscript" else ".pt"
    name = f"{manifest.model}-{entry.variant}-{manifest.run_id}{suffix}"
    assert os.path.basename(name) == name and not name.startswith("."), name
    folder = dest is not None and dest.endswith(("/", os.sep))  # "./ir/": a folder, made if new
    dest = os.path.abspath(dest or name)
    if folder or os.path.isdir(dest):
        dest = os.path.join(dest, name)
    if entry.files and not dest.endswith(suffix):
        raise ConfigError(f"destination {dest} must end with {suffix} (or be a folder): an "
                          f"OpenVINO IR's {os.path.splitext(entry.files[0].path)[1]} is written "
                          "beside it with the same stem")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    stem = os.path.splitext(dest)[0]
    targets = [dest] + [stem + os.path.splitext(f.path)[1] for f in entry.files]
    temps: list[str] = []
    try:
        for f in entry.all_files():
            temps.append(_download_verified(store, manifest.run_id, f, os.path.dirname(dest)))
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
        return dest
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def _download_verified(store: Store, run_id: str, entry: FileEntry, folder: str) -> str:
    """One stored file streamed into a temp file in `folder` and hashed; its path if it matches
    the manifest, else IntegrityError (and the temp file is gone)."""
    rel = f"{run_dir(run_id)}/{entry.path}"
    fd, tmp = tempfile.mkstemp(prefix=".quantlab-pull-", dir=folder)
    try:
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out, store.open(rel) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if h.hexdigest() != entry.sha256 or size != entry.bytes:
            raise IntegrityError(
                f"{store.uri(rel)} does not match run {run_id}'s manifest (sha256 "
                f"{h.hexdigest()[:12]}… != {entry.sha256[:12]}…); refusing it, nothing written")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a pulled model is a normal file
        return tmp
    except BaseException:
        os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_name(what: str, value: str) -> None:
    if not re.fullmatch(_NAME, value or ""):
        raise NotFoundError(f"{what} {value!r} is not a valid name (letters, digits, '.', '_', '-')")


def _validate(model: type[BaseModel], data: Any, where: str):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "document"
        raise IntegrityError(f"{where} is not a valid {model.__name__.lower()}: {loc}: "
                             f"{first['msg']} ({e.error_count()} problems)") from None

