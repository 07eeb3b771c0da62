"""Typed configuration of a quantlab run, validated once, up front.

A run is described by one `RunConfig`: the float model and its checkpoint, the dataset, the
PTQ variants, the QAT schedule, the benchmark settings and the store. Every bad value raises a
`ConfigError` (a ValueError) that names it and the valid choices, before any expensive work.

    from quantlab.config import RunConfig, load_config
    cfg = load_config("run.yaml")            # or RunConfig(model=..., data=..., store=...)
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from quantlab.errors import ConfigError
from quantlab.models import ARCHITECTURES

ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")
# The quantization stacks (quantlab.backend): eager mode (torch.ao.quantization, TorchScript
# artifacts) and PT2E (torchao.quantization.pt2e, AOTInductor packages).
BACKENDS = ("eager", "pt2e")
# What X86InductorQuantizer (backend pt2e) offers: it lowers to oneDNN int8 kernels through
# inductor only, quantizes weights per channel only (inductor's x86 int8 convolution patterns
# match per-channel weights), and calibrates activations with these observers.
PT2E_ENGINE = "x86"
PT2E_ACTIVATION_OBSERVERS = ("histogram", "minmax", "moving_average_minmax")
PT2E_WEIGHT_OBSERVERS = ("per_channel_minmax",)
ACTIVATION_OBSERVERS = ("minmax", "moving_average_minmax", "histogram", "percentile")
WEIGHT_OBSERVERS = ("minmax", "per_channel_minmax")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DASK_PROTOCOLS = ("tcp", "tls", "inproc", "ucx", "ws", "wss")
DASK_ADDRESS = re.compile(rf"((?:{'|'.join(DASK_PROTOCOLS)})://)?[^\s/:]+(:\d+)?(/[^\s]*)?")
# Run ids, aliases, model names: what may name a file or a folder in the store.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Variant names are stricter: lower case, short (they become table rows and file paths).
VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Secrets never travel in a config (it is stored in manifests and in Prefect's database).
SECRET_OPTION_KEYS = {"key", "secret", "token", "password", "aws_access_key_id",
                      "aws_secret_access_key", "aws_session_token", "session_token"}


def _secret_keys(options: dict[str, Any], prefix: str = "") -> list[str]:
    """Credential keys anywhere in (nested) storage options, e.g. client_kwargs.aws_secret_access_key."""
    out = []
    for k, v in options.items():
        if str(k).lower() in SECRET_OPTION_KEYS:
            out.append(prefix + str(k))
        elif isinstance(v, dict):
            out += _secret_keys(v, f"{prefix}{k}.")
    return out


def _check_choice(field: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")
    return value


def _check_id(field: str, v: str | None) -> str | None:
    if v is not None and not re.fullmatch(NAME_PATTERN, v):
        raise ValueError(f"{field} {v!r} must be letters, digits, '.', '_' or '-'")
    return v


def _check_variant_name(v: str) -> str:
    if not VARIANT_NAME.fullmatch(v):
        raise ValueError(f"variant name {v!r} must match {VARIANT_NAME.pattern} "
                         "(lower case, digits, '.', '_', '-')")
    return v


def _renamed(data: Any, old: str, new: str, where: str = "") -> Any:
    """A setting's name before 0.2 (`old`) still reads as its name now (`new`)."""
    if isinstance(data, dict) and old in data:
        if new in data:
            raise ValueError(f"give {where}{new} only ({where}{old} is its old name)")
        data = {(new if k == old else k): v for k, v in data.items()}
    return data


def _choice(field: str, valid: tuple[str, ...]):
    """A str setting that must be one of `valid` (one validator, wherever the setting appears)."""
    return AfterValidator(lambda v: _check_choice(field, v, valid))


Engine = Annotated[str, _choice("engine", ENGINES)]
Backend = Annotated[str, _choice("backend", BACKENDS)]
VariantName = Annotated[str, AfterValidator(_check_variant_name)]
ActivationObserver = Annotated[str, _choice("activation_observer", ACTIVATION_OBSERVERS)]
WeightObserver = Annotated[str, _choice("weight_observer", WEIGHT_OBSERVERS)]
Architecture = Annotated[str, _choice("model", ARCHITECTURES)]
Engines = Annotated[tuple[str, ...], Field(min_length=1), AfterValidator(
    lambda v: tuple(dict.fromkeys(_check_choice("engine", e, ENGINES) for e in v)))]


def _positive(values: tuple[int, ...]) -> tuple[int, ...]:
    if any(b < 1 for b in values):
        raise ValueError(f"must all be >= 1, got {list(values)}")
    return tuple(dict.fromkeys(values))


PositiveInts = Annotated[tuple[int, ...], Field(min_length=1), AfterValidator(_positive)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TransformConfig(_Model):
    """Image transforms. The defaults are the tutorial's ImageNet ones for 224 input."""

    input_size: int = Field(224, ge=8, description="side of the square model input, pixels")
    pad: int = Field(0, ge=0, description="pixels of zero padding added to each side of every "
                     "image first, for training and eval (2: Fashion-MNIST's 28 -> 32)")
    resize_size: int | None = Field(None, ge=8, description="eval resize before the center crop; "
                                    "default input_size / 0.875 (256 for 224)")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    train_crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop scale")
    hflip: bool = Field(True, description="random horizontal flip when training")

    @property
    def eval_resize(self) -> int:
        return self.resize_size or round(self.input_size / 0.875)


class DataConfig(_Model):
    """An ImageFolder dataset: <uri>/train/<class>/*.png|jpg and <uri>/val/<class>/..."""

    uri: str = Field(min_length=1, description="local path, file://, s3://bucket/prefix or memory://")
    batch_size: int = Field(32, ge=1, description="training and calibration batch size")
    eval_batch_size: int = Field(50, ge=1, description="evaluation batch size (the tutorial's 50)")
    max_eval_batches: int | None = Field(None, ge=1, description="None evaluates all of val/")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    transforms: TransformConfig = TransformConfig()
    skip_bad_images: bool = Field(False, description="leave undecodable images out (listed in the "
                                  "manifest) instead of stopping the run")


class ModelConfig(_Model):
    """A torchvision quantizable architecture and its float checkpoint (a state_dict)."""

    name: Architecture = Field("mobilenet_v2", description=f"one of {', '.join(ARCHITECTURES)}")
    checkpoint: str = Field(min_length=1, description="URI of a torchvision-format state_dict (.pth)")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="extra constructor arguments, e.g. width_mult")


class VariantConfig(_Model):
    """A named PTQ preset: backend, engine, observers, calibration size, and PTQ algorithms.

    `backend: eager` is the tutorial's eager mode (a TorchScript artifact); `backend: pt2e` is
    torchao's PT2E with X86InductorQuantizer (an AOTInductor package): engine x86, per-channel
    weights, no CLE or bias correction (they are built on eager modules; a run's config
    refuses them, see `pt2e_problem`).

    The algorithms (quantlab.algorithms) go beyond the tutorial's observers, without training:
    cross-layer equalization rescales consecutive layers of the fused float model before
    observers are inserted; bias correction shifts each int8 layer's bias after convert by the
    mean output error it measures on the calibration batches; the percentile activation
    observer clips each activation range at `activation_percentile`.
    """

    name: VariantName
    backend: Backend = Field("eager", description="eager (torch.ao.quantization, TorchScript) "
                             "or pt2e (torchao PT2E, X86InductorQuantizer, AOTInductor package)")
    engine: Engine = "x86"
    activation_observer: ActivationObserver = Field(
        "histogram", description=f"one of {', '.join(ACTIVATION_OBSERVERS)}")
    weight_observer: WeightObserver = "per_channel_minmax"
    reduce_range: bool | None = Field(None, description="None: True for x86/fbgemm, else False")
    num_calibration_batches: int = Field(32, ge=1, description="the tutorial's 32")
    activation_percentile: float = Field(99.99, gt=50, le=100, description="percent of each "
                                         "activation's values kept inside its range, with "
                                         "activation_observer: percentile (ONNX Runtime's 99.999)")
    cross_layer_equalization: bool = Field(False, description="equalize consecutive layers' "
                                           "per-channel weight ranges before calibration")
    bias_correction: bool = Field(False, description="correct int8 biases by the mean output "
                                  "error on the calibration batches, after convert")

    @property
    def algorithms(self) -> str:
        """What the variant does, for tables: e.g. "minmax", "histogram+per-channel+cle+bc"."""
        parts = [f"percentile{self.activation_percentile:g}"
                 if self.activation_observer == "percentile" else self.activation_observer]
        if self.weight_observer == "per_channel_minmax":
            parts.append("per-channel")
        if self.cross_layer_equalization:
            parts.append("cle")
        if self.bias_correction:
            parts.append("bc")
        return "+".join(parts)



def pt2e_problem(variant: VariantConfig) -> str | None:
    """Why a `backend: pt2e` variant asks for something X86InductorQuantizer does not offer
    (one line naming the setting and the valid values), or None."""
    if variant.backend != "pt2e":
        return None
    name = f"variant {variant.name} (backend pt2e)"
    if variant.engine != PT2E_ENGINE:
        return f"{name}: engine {variant.engine!r} is not available; valid: {PT2E_ENGINE}"
    if variant.activation_observer not in PT2E_ACTIVATION_OBSERVERS:
        return (f"{name}: activation_observer {variant.activation_observer!r} is not available; "
                f"valid: {', '.join(PT2E_ACTIVATION_OBSERVERS)}")
    if variant.weight_observer not in PT2E_WEIGHT_OBSERVERS:
        return (f"{name}: weight_observer {variant.weight_observer!r} is not available "
                "(X86InductorQuantizer quantizes weights per channel only); valid: "
                f"{', '.join(PT2E_WEIGHT_OBSERVERS)}")
    if variant.cross_layer_equalization or variant.bias_correction:
        return (f"{name}: cross_layer_equalization and bias_correction work on eager modules "
                "only; valid: false (or backend: eager)")
    return None


# The tutorial's two PTQ configs, then the same with the PTQ algorithms of quantlab.algorithms.
PTQ_PRESETS: dict[str, VariantConfig] = {
    # torch.ao.quantization.default_qconfig: per-tensor MinMax activations and weights.
    "ptq-minmax": VariantConfig(name="ptq-minmax", engine="x86", activation_observer="minmax",
                                weight_observer="minmax"),
    # get_default_qconfig("x86"): histogram activations, per-channel weights.
    "ptq-x86": VariantConfig(name="ptq-x86", engine="x86", activation_observer="histogram",
                             weight_observer="per_channel_minmax"),
    # Data-free quantization (Nagel et al. 2019) on the per-tensor config: the case it is for.
    # (On the Fashion-MNIST demo model CLE lifts per-tensor MinMax from 24% to 87.3%, CLE + bias
    # correction to 87.4%, 0.5 below float; per-channel x86 stays at 87.4: bench/fashion_mnist.py.)
    "ptq-minmax-cle-bc": VariantConfig(name="ptq-minmax-cle-bc", engine="x86",
                                       activation_observer="minmax", weight_observer="minmax",
                                       cross_layer_equalization=True, bias_correction=True),
    "ptq-x86-cle-bc": VariantConfig(name="ptq-x86-cle-bc", engine="x86",
                                    activation_observer="histogram",
                                    weight_observer="per_channel_minmax",
                                    cross_layer_equalization=True, bias_correction=True),
    # Activation ranges clipped at the 99.99th percentile, as ONNX Runtime and TensorRT calibrate.
    "ptq-x86-percentile": VariantConfig(name="ptq-x86-percentile", engine="x86",
                                        activation_observer="percentile",
                                        weight_observer="per_channel_minmax"),
    # PyTorch's current stack: torch.export -> prepare_pt2e(X86InductorQuantizer, its default
    # static config: histogram activations, per-channel weights) -> convert_pt2e -> AOTInductor.
    "pt2e-x86": VariantConfig(name="pt2e-x86", backend="pt2e", engine="x86",
                              activation_observer="histogram",
                              weight_observer="per_channel_minmax"),
}
# The variants of a run that names none: the tutorial's two configs.
DEFAULT_VARIANTS = (PTQ_PRESETS["ptq-minmax"], PTQ_PRESETS["ptq-x86"])


PresetName = Literal[tuple(PTQ_PRESETS)]  # type: ignore[valid-type]


def expand_presets(variants: Any) -> list:
    """Variants given by preset name ("ptq-x86") or as full mappings -> configs or mappings."""
    out = []
    for item in variants or ():
        if isinstance(item, str):
            if item not in PTQ_PRESETS:
                raise ValueError(f"unknown variant {item!r}; presets: {', '.join(PTQ_PRESETS)}"
                                 " (or give a mapping with name, engine, observers)")
            item = PTQ_PRESETS[item]
        out.append(item)
    return out


# PTQ variants, each a preset name or a full mapping. Names are expanded into VariantConfigs
# on validation; declaring them in the type puts them in the JSON schema, which Prefect checks
# deployment parameters against.
Variants = Annotated[tuple[VariantConfig | PresetName, ...], BeforeValidator(expand_presets)]


class QATConfig(_Model):
    """Quantization-aware training, the tutorial's schedule, as torch.distributed workers.

    Epochs count from 1. After epoch `freeze_bn_after` BatchNorm running statistics stop
    updating; after epoch `freeze_observers_after` the observers stop (scales are fixed). The
    tutorial's recipe is 8 epochs with BN frozen after epoch 4 and observers after epoch 5;
    a freeze point left unset keeps that share of the run's `epochs` (half and 5/8, rounded
    up), with at least one epoch before it and, where the run has two or more, one after it:
    2 epochs freeze both after epoch 1, 3 after epoch 2, 8 after 4 and 5. With 1 epoch both
    are 1: the only epoch trains unfrozen, and the freeze applies only to the converted model
    and the checkpoint that follow it. A freeze point set beyond `epochs` is refused.
    """

    enabled: bool = True
    name: VariantName = "qat-x86"
    engine: Engine = "x86"
    backends: tuple[Backend, ...] = Field(("eager",), min_length=1, description="a QAT variant "
                                          "per backend: eager (`name`) and pt2e (`pt2e_name`: "
                                          "prepare_qat_pt2e with X86InductorQuantizer's QAT "
                                          "config), trained one after the other, same schedule")
    pt2e_name: VariantName = "qat-pt2e-x86"
    epochs: int = Field(8, ge=1)
    freeze_bn_after: int | None = Field(
        None, ge=1, validate_default=True, description="epoch (1-based) after which BN stats "
        "freeze; None: half of `epochs`, rounded up (the tutorial's 4 of 8)")
    freeze_observers_after: int | None = Field(
        None, ge=1, validate_default=True, description="epoch after which observers freeze; "
        "None: 5/8 of `epochs`, rounded up (the tutorial's 5 of 8)")
    lr: float = Field(1e-4, gt=0, description="SGD learning rate per worker batch (tutorial: 1e-4)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-5, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    max_train_batches: int | None = Field(None, ge=1, description="per epoch per worker; None: all")
    nproc_per_node: int = Field(2, ge=1, description="gloo workers per node (torchrun "
                                "--nproc-per-node); the job's world size is this x the nodes")
    threads_per_worker: int = Field(1, ge=1, description="torch/OMP threads in each worker")
    max_restarts: int = Field(3, ge=0, description="torchrun restarts of the worker group")
    # Multi-node (see docs/qat.md): every node runs `quantlab qat` with the same settings.
    nnodes: str = Field("1", description="nodes: N, or MIN:MAX for an elastic job (torchrun "
                        "--nnodes); more than 1 needs rdzv_endpoint")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of the c10d rendezvous, "
                                      "reachable from every node; None: a standalone rendezvous "
                                      "on loopback (one node)")
    rdzv_id: str | None = Field(None, description="rendezvous id shared by the nodes; None: the run id")
    rdzv_timeout: int = Field(600, ge=1, description="seconds to wait for the nodes to join")

    @field_validator("nnodes", mode="before")
    @classmethod
    def _nnodes(cls, v: Any) -> str:
        m = re.fullmatch(r"(\d+)(?::(\d+))?", str(v))
        low, high = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
        if not 1 <= low <= high:
            raise ValueError(f"nnodes {v!r} must be N or MIN:MAX with 1 <= MIN <= MAX (e.g. 2, 1:4)")
        return str(v)

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})", v) if v else None
        if v is not None and not (m and 1 <= int(m.group(2)) <= 65535):
            raise ValueError(f"rdzv_endpoint {v!r} must be HOST:PORT (e.g. 10.0.0.1:29400)")
        return v

    @field_validator("rdzv_id")
    @classmethod
    def _rdzv_id(cls, v: str | None) -> str | None:
        return _check_id("rdzv_id", v)

    @field_validator("freeze_bn_after", "freeze_observers_after")
    @classmethod
    def _scaled_freeze_point(cls, v: int | None, info: ValidationInfo) -> int | None:
        """An unset freeze point: the tutorial's (after epoch 4 and 5 of 8) scaled to `epochs`."""
        epochs = info.data.get("epochs")  # absent if epochs itself is invalid (reported)
        if v is not None or epochs is None:
            return v
        eighths = 4 if info.field_name == "freeze_bn_after" else 5
        return min(max(1, -(-epochs * eighths // 8)), max(1, epochs - 1))

    @model_validator(mode="before")
    @classmethod
    def _world_size_alias(cls, data: Any) -> Any:
        return _renamed(data, "world_size", "nproc_per_node", "qat.")

    @property
    def max_nodes(self) -> int:
        return int(self.nnodes.split(":")[-1])

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v))

    def variant_name(self, backend: str) -> str:
        """The QAT variant trained with `backend` (eager: `name`, pt2e: `pt2e_name`)."""
        return self.name if backend == "eager" else self.pt2e_name

    @model_validator(mode="after")
    def _schedule(self) -> "QATConfig":
        if self.max_nodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"qat.nnodes={self.nnodes} needs qat.rdzv_endpoint (HOST:PORT of the "
                             "c10d rendezvous, e.g. the first node's address and a free port)")
        if "pt2e" in self.backends and self.engine != PT2E_ENGINE:
            raise ValueError(f"qat.engine {self.engine!r} is not available with qat.backends "
                             f"pt2e (X86InductorQuantizer); valid: {PT2E_ENGINE}")
        for field in ("freeze_bn_after", "freeze_observers_after"):
            value = getattr(self, field)
            if value > self.epochs:
                raise ValueError(f"qat.{field}={value} is beyond the run's {self.epochs} epochs; "
                                 f"valid: 1..{self.epochs}")
        return self


class TimingConfig(_Model):
    """How the pipeline times its artifacts (quantlab.timing): fixed threads, warm-up, median
    of many interleaved runs in a fresh process. The selection judges every (variant, runtime)
    pair, float included, at `serving_batch_size`; the other batch sizes are reported."""

    num_threads: int = Field(2, ge=1)
    batch_sizes: PositiveInts = (1, 8)
    serving_batch_size: int = Field(1, ge=1, description="images per call in deployment: the "
                                    "batch size the selection and the gate judge latency at "
                                    "(timed even when batch_sizes does not list it)")
    warmup: int = Field(10, ge=0, description="untimed iterations per model")
    iterations: int = Field(50, ge=5, description="timed iterations per model and batch size, "
                            "in at least 3 interleaved rounds (the noise is their spread)")

    @property
    def timed_batch_sizes(self) -> tuple[int, ...]:
        """`batch_sizes` and the serving batch size, ascending."""
        return tuple(sorted({*self.batch_sizes, self.serving_batch_size}))


class SensitivityConfig(_Model):
    """Per-layer sensitivity of one PTQ variant, and its automatic float-fallback variant.

    Sensitivity: each quantizable layer quantized on its own (the rest float), measured on the
    first `num_batches` batches of the variant's calibration images (quantlab.sensitivity).
    Fallback: `<variant>-fallback` keeps the most sensitive layers in float, adding them one at
    a time until its val top-1 is within `max_accuracy_drop` of float or it holds
    `max_float_layers` float layers.
    """

    enabled: bool = True
    variant: str | None = Field(None, description="name of the PTQ variant to analyse and "
                                "patch; None: the last of `variants` (ptq-x86 by default); "
                                "'auto': once the PTQ variants are evaluated, the most accurate "
                                "one outside the accuracy budget (the one the selection would "
                                "otherwise reject), else the last of `variants`")
    num_batches: int | None = Field(None, ge=1, description="batches of data.batch_size images; "
                                    "None: the variant's num_calibration_batches")
    fallback: bool = Field(True, description="build the <variant>-fallback variant")
    max_float_layers: int = Field(8, ge=1, description="most layers the fallback keeps in float")
    patience: int = Field(2, ge=1, description="steps in a row without a top-1 gain after which "
                          "the fallback's search stops")


class GateConfig(_Model):
    """The regression gate: a run's selected model replaces `best-<model>` only if it is not
    worse than the current one, both measured in this run (see quantlab.gate).
    """

    enabled: bool = True
    max_latency_increase: float = Field(0.10, ge=0, description="latency rise allowed at the "
                                        "serving batch size, as a fraction (0.10 = 10%)")
    latency_attempts: int = Field(3, ge=1, description="side-by-side measurements at most: "
                                  "taken while the candidate looks slower than allowed or the "
                                  "timing is noisy; the median ratio must exceed the allowed "
                                  "one beyond its noise to fail")


NNCF_PEER = "nncf-ptq"  # the in-run peer variant: NNCF's own PTQ of the float model


class FormatsConfig(_Model):
    """Deployment artifacts beside TorchScript (quantlab.formats; docs/export.md): every int8
    variant (and float) exported to ONNX with QDQ nodes and to OpenVINO IR, each checked in
    its runtime on val/ and timed; and the peer `nncf-ptq`, NNCF's own PTQ of the float model.
    """

    export: tuple[Literal["onnx", "openvino"], ...] = Field(
        ("onnx", "openvino"), description="formats to export every variant to; () for "
        "TorchScript only")
    nncf_peer: bool = Field(True, description=f"add the variant {NNCF_PEER!r}: the float model "
                            "quantized by nncf.quantize (defaults) on the same calibration "
                            "images, as OpenVINO IR")

    @field_validator("export", mode="before")
    @classmethod
    def _formats(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else list(v or ())
        bad = [x for x in items if x not in ("onnx", "openvino")]
        if bad:
            raise ValueError(f"formats.export {bad[0]!r} is not a format; valid: onnx, openvino")
        return tuple(dict.fromkeys(items))


class RunConfig(_Model):
    """Everything a `quantize` run needs."""

    model: ModelConfig
    data: DataConfig
    store: str = Field("./quantlab-store", min_length=1,
                       description="root URI of artifacts and metrics")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options without secrets, e.g. "
        "{'endpoint_url': 'http://127.0.0.1:5000'}; credentials come from the environment")
    cache_dir: str = Field("~/.cache/quantlab", description="local cache of staged datasets")
    variants: Variants = DEFAULT_VARIANTS
    qat: QATConfig = QATConfig()
    timing: TimingConfig = TimingConfig()
    max_accuracy_drop: float = Field(1.0, ge=0, description="top-1 points below float allowed "
                                     "when selecting the variant to ship; also the drop below "
                                     "the previous best that the regression gate allows")
    sensitivity: SensitivityConfig = SensitivityConfig()
    gate: GateConfig = GateConfig()
    formats: FormatsConfig = FormatsConfig()
    seed: int = 0
    run_id: str | None = Field(None, description="None: a new id; an existing id resumes it")
    dask_address: str | None = Field(
        None, description="Dask scheduler that runs the PTQ variants, e.g. tcp://10.0.0.5:8786; "
        "None: threads of the flow's own process")

    @model_validator(mode="before")
    @classmethod
    def _bench_alias(cls, data: Any) -> Any:
        return _renamed(data, "bench", "timing")

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        leaked = sorted(_secret_keys(v))
        if leaked:
            raise ValueError(f"storage_options must not hold credentials ({', '.join(leaked)}); "
                             "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
                             "`--storage-option` on the command line")
        return v

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        return _check_id("run_id", v)

    @field_validator("dask_address")
    @classmethod
    def _dask_address(cls, v: str | None) -> str | None:
        if v is not None and not DASK_ADDRESS.fullmatch(v):
            raise ValueError(f"dask_address {v!r} must be a scheduler address: HOST:PORT or "
                             f"PROTOCOL://HOST:PORT with PROTOCOL one of {', '.join(DASK_PROTOCOLS)}")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> "RunConfig":
        for v in self.variants:
            problem = pt2e_problem(v)
            if problem:
                raise ValueError(problem)
        ptq = [v.name for v in self.variants if v.backend == "eager"]
        named = self.sensitivity.variant
        pt2e = [v.name for v in self.variants if v.backend == "pt2e"]
        if self.sensitivity.enabled and named in pt2e:
            raise ValueError(f"sensitivity.variant {named!r} is a backend pt2e variant: per-layer "
                             "sensitivity and the float fallback work on eager modules only; "
                             f"valid: {', '.join(ptq) or 'none (add an eager variant)'}, auto")
        if self.sensitivity.enabled and named not in (None, "auto") and named not in ptq:
            raise ValueError(f"sensitivity.variant {named!r} is not one of the "
                             f"run's PTQ variants; valid: {', '.join(ptq) or 'none (add one)'} "
                             "(or set sensitivity.enabled: false)")
        names = self.variant_names()
        reserved = {"float"} | ({NNCF_PEER} if self.formats.nncf_peer else set())
        dupes = sorted({n for n in names if names.count(n) > 1} | (reserved & set(names)))
        if dupes:
            raise ValueError(f"variant names must be unique and not {' or '.join(sorted(reserved))}"
                             f": {', '.join(dupes)}")
        return self

    @property
    def sensitivity_variant(self) -> str | None:
        """The PTQ variant whose layers are analysed ("auto": chosen once PTQ is evaluated,
        see pipeline.sensitivity_base); None: no sensitivity in this run."""
        eager = [v.name for v in self.variants if v.backend == "eager"]
        if not self.sensitivity.enabled or not eager:
            return None
        return self.sensitivity.variant or eager[-1]

    @property
    def fallback_name(self) -> str | None:
        """Name of the float-fallback variant ("auto-fallback" until its base is chosen),
        None when the run builds none."""
        base = self.sensitivity_variant
        return f"{base}-fallback" if base and self.sensitivity.fallback else None

    def variant_names(self) -> list[str]:
        fallbacks = ([f"{v.name}-fallback" for v in self.variants if v.backend == "eager"]
                     if self.sensitivity_variant == "auto" and self.fallback_name
                     else [self.fallback_name] if self.fallback_name else [])
        return ([v.name for v in self.variants] + fallbacks
                + [name for name, _ in self.qat_variants()])

    def qat_variants(self) -> list[tuple[str, str]]:
        """(name, backend) of each QAT variant the run trains, in training order."""
        q = self.qat
        return [(q.variant_name(b), b) for b in q.backends] if q.enabled else []

    @property
    def backends(self) -> set[str]:
        """The backends the run's PTQ and QAT variants use."""
        return {v.backend for v in self.variants} | {b for _, b in self.qat_variants()}

    @property
    def nncf_peer(self) -> str | None:
        """The peer variant's name, None when the run builds none."""
        return NNCF_PEER if self.formats.nncf_peer else None

    def variant(self, name: str) -> VariantConfig:
        """The PTQ variant called `name`."""
        for v in self.variants:
            if v.name == name:
                return v
        raise ConfigError(f"no PTQ variant {name!r}; valid: "
                          f"{', '.join(v.name for v in self.variants)}")


def parse_config(data: dict[str, Any]) -> RunConfig:
    """Validate a mapping into a RunConfig; errors become one readable ConfigError."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(path: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted-key overrides ({"qat.epochs": 2}), validate."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping, got {type(data).__name__}")
    return parse_config(merge_overrides(data, overrides or {}))


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply {"a.b": v} overrides onto a nested mapping (None values are skipped)."""
    data = {**data}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[leaf] = value
    return data


def format_validation_error(e: ValidationError, what: str = "config") -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        elif err["type"] == "missing":
            msg = "required setting is missing"
        parts.append(f"{loc}: {msg}" + (f" (got {err['input']!r})"
                                       if err["type"] not in ("missing", "value_error")
                                       and not isinstance(err["input"], dict) else ""))
    return f"invalid {what}: " + "; ".join(parts)
