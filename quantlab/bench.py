"""`quantlab bench`: float and int8 built the pipeline's way and plain torch's way, timed side by side.

    spec = BenchSpec(model="mobilenet_v2", input_size=224)      # validated up front
    result = run(spec, store="./quantlab-store")                 # times, profiles, stores rows
    print(formatted_figures(summarize(result.rows)))             # int8 vs float, vs plain torch

What is timed, every model as TorchScript saved to a file and loaded back, as a deployment would,
in a fresh torch-only process (timing.measure_files: models loaded afresh for each thread count
and batch size, interleaved, noise flagged, threads capped to the idle CPUs):
- `float` and one row per PTQ variant (`ptq-minmax`, `ptq-x86`, ...): built by the pipeline's own
  functions (models.fuse, ptq.quantize_ptq, export.artifact_bytes), so they are exactly
  the artifacts a run stores;
- `torch-float` and `torch-int8`: the same float weights turned into TorchScript with plain
  torch (quantlab.reference, which imports nothing from quantlab), once per engine,
  optimisation and memory layout asked for. The fastest `torch-int8` is the plain-torch
  reference quantlab's artifact is compared with; the fastest float of all is the fair float
  baseline;
- `pt2e-x86 in aoti` (with `pt2e`, the default): the same float weights quantized by PT2E
  (quantlab.pt2e: torch.export, X86InductorQuantizer with the ptq-x86 observers, the same
  calibration batches) and packaged with AOTInductor (pt2e.package_bytes), timed as a .pt2 file
  in the "aoti" runtime in the same fresh process; the summary sets it against the fastest
  eager-mode int8 TorchScript model of the run;
- `pt2e-x86 torch.compile (in-process)`: the same converted PT2E program through torch.compile
  (inductor, freezing), a reference for what the AOTI runner adds per call. A compiled program
  is no file, so it is timed in this process after the files (a static compile per batch size,
  at the thread counts the files were timed with), not interleaved with them; the summary
  leaves it out.

Timing in this process, which built and quantized the models and runs a rich console, made
int8 at 2 threads look slower than at 1: the same loaded modules served every thread count,
and an int8 model keeps the oneDNN primitive of its first call (quantlab/_timer.py).

Weights are random unless a checkpoint is given, and calibration runs on random inputs: int8
kernels cost the same whatever the values, so this changes no timing (the output says so).
Every model's file size is recorded, and its TorchScript load time and peak RSS of inference
are measured in a fresh torch-only process (timing.profile_artifact). Rows go to the
`benchmarks` table.
"""

from __future__ import annotations

import copy
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantlab import export, formats, metrics, models, onnx_export, pt2e, ptq, reference
from quantlab.backend import check_engine, engine_context
from quantlab.timing import (MAX_REMEASURE, Latency, TimedFile, cpu_model_and_flags, measure,
                            measure_files, profile_artifact, table_row)
from quantlab.config import (DEFAULT_VARIANTS, NNCF_PEER, PTQ_PRESETS, Architecture, Engines,
                             PositiveInts, Variants, format_validation_error)
from quantlab.errors import ConfigError
from quantlab.store import Store

FLOAT_VARIANTS = ("float", "torch-float")
PLAIN_INT8 = "torch-int8"
CALIBRATION_BATCH = 8  # images per random calibration batch
PT2E_VARIANT = "pt2e-x86"      # the PT2E preset: X86InductorQuantizer, the ptq-x86 observers
PT2E_OPTIMISATION = "freezing"  # inductor's freezing: int8 weights prepacked for oneDNN
IN_PROCESS = "inductor-in-process"  # the runtime of the torch.compile reference (no file)


class BenchSpec(BaseModel):
    """What `quantlab bench` builds and how it times it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Architecture = Field("mobilenet_v2", description="architecture name (models.ARCHITECTURES)")
    input_size: int = Field(224, ge=8, description="side of the square input, pixels")
    num_classes: int = Field(1000, ge=2)
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="e.g. width_mult")
    checkpoint: str | None = Field(None, description="float state_dict URI; None: random weights")
    threads: PositiveInts = Field((1, 2), description="intra-op thread counts")
    batch_sizes: PositiveInts = (1, 8)
    variants: Variants = DEFAULT_VARIANTS
    engines: Engines = Field(("x86", "onednn"),
                                     description="engines of the plain-torch int8 candidates, "
                                     "and under which quantlab's int8 artifacts are also loaded")
    optimisations: tuple[str, ...] = Field(("freeze", "optimize_for_inference"), min_length=1,
                                           description="of the plain-torch candidates")
    channels_last: bool = Field(False, description="also time channels-last plain candidates")
    runtimes: bool = Field(True, description="also export quantlab's float and int8 artifacts to "
                           "ONNX and OpenVINO IR (quantlab.formats), add nncf-ptq, and time each "
                           "in ONNX Runtime and OpenVINO beside TorchScript")
    pt2e: bool = Field(True, description=f"also quantize with PT2E ({PT2E_VARIANT}: torchao's "
                       "X86InductorQuantizer), time its AOTInductor package (runtime aoti) "
                       "beside TorchScript, and the same program through torch.compile in this "
                       "process (one AOTInductor compile and one torch.compile per batch size: "
                       "tens of seconds at 224 px)")
    warmup: int = Field(10, ge=0, description="untimed calls per model and setting")
    iterations: int = Field(100, ge=10, description="timed calls per model and setting")
    calibration_batches: int = Field(4, ge=1, description=f"random batches of {CALIBRATION_BATCH}")
    profile: bool = Field(True, description="measure load time and peak RSS in subprocesses")
    max_remeasure: int = Field(MAX_REMEASURE, ge=0, description="further measurements of a "
                               "noisy setting before its rows are flagged noisy")
    seed: int = 0

    @field_validator("optimisations")
    @classmethod
    def _optimisations(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [o for o in v if o not in export.OPTIMISATIONS]
        if bad:
            raise ValueError(f"unknown optimisation {bad[0]!r}; valid: "
                             f"{', '.join(export.OPTIMISATIONS)}")
        return tuple(dict.fromkeys(v))


def parse_spec(data: dict[str, Any]) -> BenchSpec:
    """Validate a mapping into a BenchSpec; errors become one ConfigError naming the values."""
    try:
        spec = BenchSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "bench settings")) from None
    for engine in {*spec.engines, *(v.engine for v in spec.variants)}:
        check_engine(engine)
    return spec


class Candidate(BaseModel):
    """One model to time: a TorchScript payload (or, if it cannot be saved, only in memory), the
    files of another format, or (runtime IN_PROCESS) a PT2E program compiled in this process."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    variant: str
    source: str                       # quantlab | torch
    engine: str | None
    optimisation: str
    channels_last: bool
    module: Any                       # the loaded torch.jit.ScriptModule (None: another runtime;
                                      # the converted PT2E program for IN_PROCESS)
    runtime: str = "torch"            # quantlab.runtimes: torch..., aoti, onnxruntime, openvino..
    files: dict[str, bytes] = {}      # an ONNX, IR or AOTInductor artifact's files
    payload: bytes | None = None      # None: does not survive save/load (no file, no size)
    # What the timing process loads when there is no payload: the unoptimised TorchScript,
    # which it passes through torch.jit.optimize_for_inference after loading.
    timing_payload: bytes | None = None

    @property
    def timed_bytes(self) -> bytes:
        return self.payload if self.payload is not None else self.timing_payload

    @property
    def size_bytes(self) -> int | None:
        if self.files:
            return sum(len(b) for b in self.files.values())
        return len(self.payload) if self.payload else None

    @property
    def label(self) -> str:
        return label(self.model_dump(include={"variant", "source", "engine", "optimisation",
                                              "channels_last", "runtime"}))


def label(row: dict[str, Any]) -> str:
    """A model's name in tables: "ptq-x86 x86", "torch-int8 onednn freeze channels-last",
    "ptq-x86 in openvino", "pt2e-x86 in aoti", "pt2e-x86 torch.compile (in-process)", ..."""
    if row.get("runtime") == IN_PROCESS:
        return f"{row['variant']} torch.compile (in-process)"
    if not (row.get("runtime") or "torch").startswith("torch"):
        return f"{row['variant']} in {row['runtime']}"
    parts = [row["variant"], row["engine"] or ""]
    if row["source"] == "torch":
        parts.append(row["optimisation"].replace("optimize_for_inference", "ofi"))
    if row["channels_last"]:
        parts.append("channels-last")
    return " ".join(p for p in parts if p)


class BenchResult(BaseModel):
    run_id: str
    rows: list[dict[str, Any]]
    weights: str
    notes: list[str] = []


def float_model(spec: BenchSpec) -> torch.nn.Module:
    """The unfused float model: the checkpoint's weights, or random ones seeded by spec.seed."""
    if spec.checkpoint:
        return models.load_float_model(spec.model, spec.num_classes, spec.checkpoint,
                                       **spec.model_kwargs)
    torch.manual_seed(spec.seed)
    return models.build(spec.model, spec.num_classes, **spec.model_kwargs).eval()


def calibration_batches(spec: BenchSpec) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(spec.seed)
    return [torch.randn(CALIBRATION_BATCH, 3, spec.input_size, spec.input_size, generator=gen)
            for _ in range(spec.calibration_batches)]


def _roundtrip(scripted: torch.jit.ScriptModule, engine: str | None) -> tuple[Any, bytes | None]:
    """Save and load back; a model that cannot be reloaded is kept (and timed) in memory."""
    payload = export.to_bytes(scripted)
    try:
        return export.load(payload, engine), payload
    except RuntimeError:
        return scripted, None


def pt2e_problem(spec: BenchSpec, model: torch.nn.Module) -> str | None:
    """Why this machine cannot build the PT2E rows (None: it can, or spec.pt2e is off). A model
    torch.export cannot export is the user's error: a ConfigError, before anything is built."""
    if not spec.pt2e:
        return None
    problem = pt2e.lowering_problem()
    if problem is None:
        pt2e.preflight(spec.model, model, PTQ_PRESETS[PT2E_VARIANT], spec.input_size)
    return problem


def compiled_program(program: torch.nn.Module, input_size: int, batch_size: int):
    """A PT2E program through torch.compile (inductor, freezing), compiled for one batch size.

    Compiled here, on an input made under inference mode as the timing loops make theirs: a
    recompile (another shape, grad mode) outside the freezing patch would give a float program.
    """
    compiled = torch.compile(copy.deepcopy(program), dynamic=False)
    with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
        compiled(torch.randn(batch_size, 3, input_size, input_size))
    return compiled


def build_candidates(spec: BenchSpec, log: Callable[[str], None] = print) -> list[Candidate]:
    """quantlab's float and PTQ artifacts (the pipeline's path), PT2E, then the plain-torch grid."""
    base = float_model(spec)
    problem = pt2e_problem(spec, base)
    if problem:
        log(f"no {PT2E_VARIANT} rows: {problem}")
    calib = calibration_batches(spec)
    out = []

    def add(variant, source, engine, optimisation, channels_last, scripted=None, payload=None,
            unoptimised=None):
        if payload is None:
            module, payload = _roundtrip(scripted, engine)
        else:
            module = export.load(payload, engine)
        timing = None
        if payload is None:
            if optimisation != "optimize_for_inference" or unoptimised is None:
                raise RuntimeError(f"{variant} ({optimisation}) does not survive save/load")
            timing = export.to_bytes(unoptimised)
        out.append(Candidate(variant=variant, source=source, engine=engine,
                             optimisation=optimisation, channels_last=channels_last,
                             module=module, payload=payload, timing_payload=timing))
        log(f"built {out[-1].label}" + ("" if payload else " (cannot be reloaded: optimised "
                                        "after loading, in the timing process)"))

    def add_exports(variant, engine, files, optimisation=None):
        """The ONNX, IR or .pt2 files of an artifact, one candidate per runtime that runs them."""
        for entry in formats.artifact_entries(files, variant, "ptq", engine,
                                              int8=variant != "float"):
            names = [os.path.basename(f.path) for f in entry.all_files()]
            for runtime in entry.runtimes:
                out.append(Candidate(variant=variant, source="quantlab", engine=engine,
                                     optimisation=optimisation or entry.optimisation,
                                     channels_last=False,
                                     module=None, runtime=runtime,
                                     files={n: files[n] for n in names}))
                log(f"built {out[-1].label}")

    # quantlab: the same calls as pipeline.export_float, pipeline.ptq_variant and _store_variant.
    opt = export.ARTIFACT_OPTIMISATION
    fused = models.fuse(copy.deepcopy(base), is_qat=False)
    add("float", "quantlab", None, opt, False, payload=export.artifact_bytes(fused))
    if spec.runtimes:
        float_files = formats.export_float(fused, spec.input_size)
        add_exports("float", None, float_files)
        add_exports(NNCF_PEER, None, formats.nncf_peer(float_files["model.onnx"], calib))
    for v in spec.variants:
        int8 = ptq.quantize_ptq(copy.deepcopy(base), v, [(x, None) for x in calib])
        payload = export.artifact_bytes(int8, v.engine)
        # The engine is chosen when an artifact is loaded (weights are repacked for it): its
        # own, as the pipeline does, and each engine of the plain candidates.
        for engine in dict.fromkeys([v.engine, *spec.engines]):
            add(v.name, "quantlab", engine, opt, False, payload=payload)
        if spec.runtimes:
            add_exports(v.name, v.engine, formats.export_int8(int8, v.engine, spec.input_size))
    if spec.pt2e and not problem:
        program = ptq.quantize_ptq(copy.deepcopy(base), PTQ_PRESETS[PT2E_VARIANT],
                                   [(x, None) for x in calib], input_size=spec.input_size)
        data, _ = pt2e.package_bytes(program, spec.input_size, on_line=log)
        add_exports(PT2E_VARIANT, pt2e.ENGINE, {"model.pt2": data}, PT2E_OPTIMISATION)
        out.append(Candidate(variant=PT2E_VARIANT, source="quantlab", engine=pt2e.ENGINE,
                             optimisation=PT2E_OPTIMISATION, channels_last=False,
                             module=program, runtime=IN_PROCESS))
        log(f"built {out[-1].label}: compiled and timed in this process, after the files")

    # plain torch: quantlab.reference builds, plain torch.jit.script/freeze/optimize_for_inference.
    layouts = (False, True) if spec.channels_last else (False,)
    plain_float = reference.build_float(base)
    for opt in spec.optimisations:
        for cl in layouts:
            model = copy.deepcopy(plain_float)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            add("torch-float", "torch", None, opt, cl, scripted=export.script(model, opt),
                unoptimised=export.script(copy.deepcopy(model)))
    for engine in spec.engines:
        int8 = reference.build_int8(base, calib, engine)
        for opt in spec.optimisations:
            with engine_context(engine):
                scripted = export.script(copy.deepcopy(int8), opt)
            for cl in layouts:
                add(PLAIN_INT8, "torch", engine, opt, cl, scripted=scripted)
    return out


def run(spec: BenchSpec, store: str, storage_options: dict | None = None,
        log: Callable[[str], None] = print) -> BenchResult:
    """Build, time (every thread count x batch size, interleaved), profile, store the rows."""
    st = Store(store, storage_options)
    st.check_writable()
    weights = "checkpoint" if spec.checkpoint else "random"
    notes = [] if spec.checkpoint else ["random weights (timing only; accuracy is meaningless)"]
    notes.append(f"calibrated on {spec.calibration_batches} random batches of {CALIBRATION_BATCH}")
    notes.append(cpu_note())
    for note in notes:
        log(note)
    candidates = build_candidates(spec, log)
    keys = {f"{i}:{c.label}": c for i, c in enumerate(candidates)}
    num_compiled = sum(c.runtime == IN_PROCESS for c in candidates)
    log(f"timing {len(keys) - num_compiled} models at {', '.join(map(str, spec.threads))} "
        f"thread(s), batch sizes {list(spec.batch_sizes)}: {spec.warmup} warm-up + "
        f"{spec.iterations} timed calls each, interleaved, in a fresh process"
        + (f"; then {num_compiled} torch.compile reference(s) in this one" if num_compiled else ""))
    latencies = time_candidates(spec, keys, log)
    if num_compiled:
        notes.append(f"{label({'variant': PT2E_VARIANT, 'runtime': IN_PROCESS})}: timed in this "
                     "process after the files, not interleaved with them: a reference for the "
                     "AOTI runner's per-call cost, not a deployment figure")
    profiles = _profiles(spec, keys, log) if spec.profile else {}
    run_id = f"bench-{metrics.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    created = metrics.now()
    rows = []
    for lat in latencies:
        c = keys[lat.variant]
        profile = profiles.get((lat.variant, lat.batch_size))
        lat = lat.model_copy(update={"variant": c.variant})
        in_process = {}
        if c.runtime == IN_PROCESS:  # no file, so no format: table_row looks up the format of
            lat = lat.model_copy(update={"runtime": "torch"})  # a runtime; columns overwrite
            in_process = {"runtime": IN_PROCESS, "format": None}
        rows.append(table_row(
            lat, profile, run_id=run_id, model=spec.model, engine=c.engine or "",
            input_size=spec.input_size, source=c.source, optimisation=c.optimisation,
            channels_last=c.channels_last, weights=weights, calibration="random",
            size_bytes=c.size_bytes, **in_process,
            backend=(None if c.source != "quantlab" or c.variant == NNCF_PEER else
                     "pt2e" if c.variant == PT2E_VARIANT else "eager")))
    metrics.write_rows(st, "benchmarks", rows, run_id, "bench", created)
    return BenchResult(run_id=run_id, rows=rows, weights=weights, notes=notes)


def time_candidates(spec: BenchSpec, keys: dict[str, Candidate],
                    log: Callable[[str], None] = print) -> list[Latency]:
    """Every candidate at every thread count x batch size: the files in a fresh torch-only
    process, then the torch.compile reference (IN_PROCESS) in this one."""
    compiled = {key: c for key, c in keys.items() if c.runtime == IN_PROCESS}
    rows = _time_files(spec, {k: c for k, c in keys.items() if k not in compiled}, log)
    return rows + _time_in_process(spec, compiled, rows, log)


def _time_files(spec: BenchSpec, keys: dict[str, Candidate],
                log: Callable[[str], None]) -> list[Latency]:
    if not keys:
        return []
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-") as tmp:
        files = {}
        for i, (key, c) in enumerate(keys.items()):
            if c.files:  # ONNX, IR or .pt2: its files side by side, the loaded one first
                path = onnx_export.write_files(c.files, os.path.join(tmp, str(i)))
                files[key] = TimedFile(path=path, runtime=c.runtime)
                continue
            path = os.path.join(tmp, f"{i}.pt")
            with open(path, "wb") as f:
                f.write(c.timed_bytes)
            files[key] = TimedFile(path=path, engine=c.engine, channels_last=c.channels_last,
                                   optimize_for_inference=c.payload is None)
        return measure_files(files, spec.input_size, spec.batch_sizes, spec.threads, spec.warmup,
                             spec.iterations, max_remeasure=spec.max_remeasure, say=log)


def _time_in_process(spec: BenchSpec, keys: dict[str, Candidate], file_rows: list[Latency],
                     log: Callable[[str], None]) -> list[Latency]:
    """PT2E programs through torch.compile, timed in this process (timing.measure), at the
    thread counts the files were timed with (capped to the idle CPUs as they were)."""
    if not keys:
        return []
    threads = sorted({(r.num_threads, r.num_threads_requested or r.num_threads)
                      for r in file_rows}) or [(n, n) for n in spec.threads]
    rows = []
    for bs in spec.batch_sizes:
        log(f"torch.compile (freezing) of {len(keys)} PT2E program(s) at batch {bs}")
        modules = {key: compiled_program(c.module, spec.input_size, bs) for key, c in keys.items()}
        for used, asked in threads:
            with torch._inductor.config.patch(freezing=True):
                measured = measure(modules, spec.input_size, (bs,), used, spec.warmup,
                                   spec.iterations)
            rows += [r.model_copy(update={"runtime": IN_PROCESS, "num_threads_requested": asked})
                     for r in measured]
    return rows


def cpu_note() -> str:
    """The CPU and whether it has the int8 dot-product instructions that int8 speed rests on."""
    model, flags = cpu_model_and_flags()
    have = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return (f"CPU {model}, int8 ISA flags [{', '.join(flags)}]: " + (
        f"int8 kernels can use {', '.join(have)}" if have else
        "no avx512_vnni/avx_vnni/amx_int8, so int8 kernels run on plain AVX2 (smaller int8 "
        "speed-ups than on a VNNI or AMX machine)"))


def _profiles(spec: BenchSpec, keys: dict[str, Candidate], log: Callable[[str], None]) -> dict:
    """(key, batch size) -> Profile, each in a fresh process at the largest thread count."""
    out = {}
    num_threads = max(spec.threads)
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-") as tmp:
        for i, (key, c) in enumerate(keys.items()):
            if c.payload is None:
                continue
            path = os.path.join(tmp, f"{i}.pt")
            with open(path, "wb") as f:
                f.write(c.payload)
            for bs, prof in profile_artifact(path, c.engine, spec.input_size, spec.batch_sizes,
                                             num_threads, c.channels_last).items():
                out[(key, bs)] = prof
        log(f"profiled load time and peak RSS of {len(out) // len(spec.batch_sizes)} models "
            f"({num_threads} threads, a fresh process each)")
    return out


class Figures(BaseModel):
    """The headline ratios of one quantlab int8 variant at one thread count and batch size."""

    variant: str
    engine: str                     # the engine the artifact was loaded and run with
    label: str                      # its name in tables (bench.label): engine or runtime
    num_threads: int
    batch_size: int
    latency_ms: float
    float_ms: float                 # quantlab's float artifact, as the pipeline stores it
    speedup: float                  # float_ms / latency_ms
    best_float: str                 # the fastest float model of the run (the fair baseline)
    best_float_ms: float
    speedup_vs_best_float: float
    reference: str | None           # the fastest plain-torch int8 model of the run
    reference_ms: float | None
    vs_reference: float | None      # latency_ms / reference_ms: 1.05 = 5% slower than plain torch
    size_ratio: float | None        # int8 file size / float file size
    # The fastest eager-mode int8 TorchScript model of the run (quantlab's PTQ artifacts and
    # plain torch's): what PT2E (pt2e-x86 in aoti) and the other formats are set against
    # (None for the eager TorchScript rows themselves: `reference` is theirs).
    best_eager: str | None = None
    best_eager_ms: float | None = None
    vs_best_eager: float | None = None  # latency_ms / best_eager_ms: 1.2 = 20% slower


def _is_eager_int8(row: dict[str, Any]) -> bool:
    """An eager-mode int8 TorchScript row (quantlab's PTQ artifact or plain torch's)."""
    return (row.get("format", "torchscript") == "torchscript"
            and row["variant"] not in FLOAT_VARIANTS and row.get("runtime") != IN_PROCESS)


def summarize(rows: Sequence[dict[str, Any]]) -> list[Figures]:
    """Figures per quantlab int8 variant, thread count and batch size, from `benchmarks` rows.

    The torch.compile reference (timed in the bench's own process, not beside the files) is
    left out.
    """
    out = []
    rows = [r for r in rows if r.get("runtime") != IN_PROCESS]
    settings = sorted({(r["num_threads"], r["batch_size"]) for r in rows})
    for threads, bs in settings:
        here = [r for r in rows if (r["num_threads"], r["batch_size"]) == (threads, bs)]
        floats = [r for r in here if r["variant"] in FLOAT_VARIANTS]
        ours = next((r for r in here if r["source"] == "quantlab" and r["variant"] == "float"
                     and r.get("runtime", "torch") == "torch"), None)
        plain = [r for r in here if r["variant"] == PLAIN_INT8]
        eager = [r for r in here if _is_eager_int8(r)]
        if ours is None:
            continue
        best_float = min(floats, key=lambda r: r["latency_ms"])
        ref = min(plain, key=lambda r: r["latency_ms"]) if plain else None
        best_eager = min(eager, key=lambda r: r["latency_ms"]) if eager else None
        for r in here:
            if r["source"] != "quantlab" or r["variant"] == "float":
                continue
            ms = r["latency_ms"]
            vs_eager = None if _is_eager_int8(r) else best_eager
            out.append(Figures(
                variant=r["variant"], engine=r["engine"], label=label(r), num_threads=threads,
                batch_size=bs, latency_ms=ms,
                float_ms=ours["latency_ms"], speedup=ours["latency_ms"] / ms,
                best_float=label(best_float), best_float_ms=best_float["latency_ms"],
                speedup_vs_best_float=best_float["latency_ms"] / ms,
                reference=label(ref) if ref else None,
                reference_ms=ref["latency_ms"] if ref else None,
                vs_reference=ms / ref["latency_ms"] if ref else None,
                size_ratio=(r["size_bytes"] / ours["size_bytes"]
                            if r["size_bytes"] and ours["size_bytes"] else None),
                best_eager=label(vs_eager) if vs_eager else None,
                best_eager_ms=vs_eager["latency_ms"] if vs_eager else None,
                vs_best_eager=ms / vs_eager["latency_ms"] if vs_eager else None))
    return out


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _noise(row: dict[str, Any]) -> str:
    """"+-2%", or "+-12% NOISY" when the measurement stayed noisy; "-" for rows without it."""
    if row.get("noise") is None:
        return "-"
    return f"+-{row['noise']:.0%}" + (" NOISY" if row.get("noisy") else "")


def formatted_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Every timed model, as strings (the terminal table and BENCHMARKS.md share them)."""
    floats = {(r["num_threads"], r["batch_size"]): r["latency_ms"] for r in rows
              if r["source"] == "quantlab" and r["variant"] == "float"
              and r.get("runtime", "torch") == "torch"}
    out = []
    for r in sorted(rows, key=lambda r: (r["num_threads"], r["batch_size"])):
        # No speed-up for the in-process reference: it was not timed beside the float file.
        base = None if r.get("runtime") == IN_PROCESS else floats.get(
            (r["num_threads"], r["batch_size"]))
        out.append({
            "model": label(r), "threads": str(r["num_threads"]), "batch": str(r["batch_size"]),
            "median ms": f"{r['latency_ms']:.2f}", "p90 ms": f"{r['latency_ms_p90']:.2f}",
            "min ms": f"{r['latency_ms_min']:.2f}",
            "img/s": f"{r['images_per_sec']:.1f}",
            "noise": _noise(r),
            "speed-up vs float": _num(base / r["latency_ms"] if base else None, ".2f"),
            "size MB": _num(r["size_bytes"] / 1e6 if r["size_bytes"] else None, ".2f"),
            "load ms": _num(r["load_ms"], ".1f"),
            "peak RSS MB (+ over torch)": "-" if r["peak_rss_mb"] is None else
            f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_delta_mb']:.0f})",
        })
    return out


def formatted_figures(figures: Sequence[Figures]) -> list[dict[str, str]]:
    """The headline ratios, as strings."""
    return [{
        "variant": f.label, "threads": str(f.num_threads),
        "batch": str(f.batch_size),
        "int8 ms": f"{f.latency_ms:.2f}",
        "speed-up vs float": f"{f.speedup:.2f}x",
        "vs fastest float": f"{f.speedup_vs_best_float:.2f}x ({f.best_float})",
        "vs fastest plain-torch int8": "-" if f.reference is None
        else f"{f.vs_reference:.3f} ({f.reference})",
        "vs fastest eager int8": "-" if f.best_eager is None
        else f"{f.vs_best_eager:.3f} ({f.best_eager})",
        "size vs float": _num(f.size_ratio * 100 if f.size_ratio else None, ".1f") + "%",
    } for f in figures]
