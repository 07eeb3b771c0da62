"""torchvision's quantizable architectures, float checkpoints, and fusion.

    model = build("mobilenet_v2", num_classes=10, width_mult=0.5)
    load_float_weights(model, checkpoint_bytes)      # torch.load(weights_only=True)
    fuse(model, is_qat=False)                        # Conv+BN(+ReLU) -> one module

The models come from `torchvision.models.quantization`: they carry QuantStub/DeQuantStub and
FloatFunctional adds, and a `fuse_model` method, which is what eager-mode quantization needs.
Weights are never downloaded: users bring a torchvision-format state_dict, as the tutorial's
`mobilenet_pretrained_float.pth`.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import quantization as qmodels

from quantlab.errors import CheckpointError

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": qmodels.mobilenet_v2,
    "mobilenet_v3_large": qmodels.mobilenet_v3_large,
    "resnet18": qmodels.resnet18,
    "resnet50": qmodels.resnet50,
    "resnext101_32x8d": qmodels.resnext101_32x8d,
    "shufflenet_v2_x0_5": qmodels.shufflenet_v2_x0_5,
    "shufflenet_v2_x1_0": qmodels.shufflenet_v2_x1_0,
    "shufflenet_v2_x1_5": qmodels.shufflenet_v2_x1_5,
    "shufflenet_v2_x2_0": qmodels.shufflenet_v2_x2_0,
}


def build(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A float, unfused, randomly initialised quantizable model (no weights are downloaded)."""
    if name not in ARCHITECTURES:
        raise CheckpointError(f"unknown model {name!r}; valid: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](weights=None, quantize=False, num_classes=num_classes, **kwargs)


def read_state_dict(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """Load a state_dict with `weights_only=True`; never falls back to unsafe unpickling.

    Accepts the shapes people save: a bare state_dict (torchvision's format), the torchvision
    references' training checkpoint ({"model": state_dict, ...}), {"state_dict": ...}, and the
    keys of an nn.DataParallel/DDP model ("module." prefix). Returns the state_dict and a
    phrase saying which of these it was.
    """
    if not (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
        raise CheckpointError(f"checkpoint {source} is not a torch file (not the zip archive or "
                              "the pickle that torch.save writes)")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {source} {_refusal(str(e))} quantlab loads only "
                              "tensors: re-save it with torch.save(model.state_dict(), path)") from None
    except Exception as e:  # not a zip/pickle at all: a text file, a truncated upload, ...
        raise CheckpointError(f"checkpoint {source} is not a torch file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    layout = "a state_dict"
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj, layout = obj[key], f"the {key!r} entry of a training checkpoint"
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = (f"a dict with keys {', '.join(map(repr, list(obj)[:8]))}"
                 if isinstance(obj, dict) else type(obj).__name__)
        raise CheckpointError(f"checkpoint {source} does not hold a state_dict of tensors "
                              f"(found {found}); expected a state_dict, {{'model': state_dict}} "
                              "or {'state_dict': state_dict}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
        layout += " of an nn.DataParallel/DDP model ('module.' prefix stripped)"
    return obj, layout


def _refusal(message: str) -> str:
    """What torch.load(weights_only=True) refused, in a few words, without its advice.

    Its message is a paragraph on weights_only (with advice to turn it off, which a quantlab
    user must not do), the global it refused, and a pointer to the docs.
    """
    plain = re.sub(r"\x1b\[[0-9;]*m", "", message)  # torch colours parts of it
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", plain)
    if found and found.group(1).rsplit(".", 1)[-1][:1].isupper():
        return f"is a whole pickled model (of class {found.group(1)}), not a state_dict."
    parts = [p.strip() for p in plain.split("\n\n") if p.strip()]
    reason = next((p for p in parts[1:] if not p.startswith("Check the documentation")
                   and "weights_only=False" not in p), parts[0] if parts else "refused")
    return f"was refused by torch.load(weights_only=True): {' '.join(reason.split())}"


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                     model_name: str) -> None:
    """Raise a CheckpointError naming missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    classifier = _classifier_weight_key(model)
    if classifier and [m[0] for m in mismatched] in ([classifier], [classifier, _bias(classifier)]):
        ckpt_classes, want = mismatched[0][1][0], mismatched[0][2][0]
        raise CheckpointError(f"checkpoint {source} has {ckpt_classes} classes but the dataset "
                              f"has {want}; num_classes comes from the dataset's class folders")
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches (e.g. " + ", ".join(
            f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched[:3]) + ")")
    raise CheckpointError(f"checkpoint {source} does not fit {model_name}: " + "; ".join(parts))


def load_float_weights(model: nn.Module, data: bytes, source: str, model_name: str) -> str:
    """Load float weights from checkpoint bytes into an unfused model (strictly); returns
    the checkpoint's layout (see read_state_dict)."""
    state, layout = read_state_dict(data, source)
    check_state_dict(model, state, source, model_name)
    model.load_state_dict(state, strict=True)
    return layout


def fuse(model: nn.Module, is_qat: bool) -> nn.Module:
    """Fuse Conv+BN(+ReLU) in place with the architecture's own `fuse_model`.

    PTQ fuses an eval-mode model (BN folded into the conv); QAT fuses a train-mode model into
    ConvBnReLU modules that keep BN, so its statistics can be trained and later frozen.
    """
    model.train(is_qat)
    model.fuse_model(is_qat=is_qat)
    return model


def _classifier_weight_key(model: nn.Module) -> str | None:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = f"{name}.weight"
    return last


def _bias(weight_key: str) -> str:
    return weight_key.removesuffix("weight") + "bias"


def load_float_checkpoint(name: str, num_classes: int, checkpoint: str,
                          storage_options: dict | None = None,
                          **kwargs) -> tuple[nn.Module, str]:
    """Build an architecture, load its float checkpoint from any store URI (eval mode);
    returns the model and the checkpoint's layout (see read_state_dict)."""
    from quantlab.errors import NotFoundError
    from quantlab.store import read_uri

    try:  # a StoreError (unreachable, denied) names the URI and goes up as it is
        data = read_uri(checkpoint, storage_options)
    except (NotFoundError, IsADirectoryError):
        raise CheckpointError(f"checkpoint {checkpoint} does not exist") from None
    model = build(name, num_classes, **kwargs)
    layout = load_float_weights(model, data, checkpoint, name)
    return model.eval(), layout


def load_float_model(name: str, num_classes: int, checkpoint: str,
                     storage_options: dict | None = None, **kwargs) -> nn.Module:
    """Build an architecture and load its float checkpoint from any store URI (eval mode)."""
    return load_float_checkpoint(name, num_classes, checkpoint, storage_options, **kwargs)[0]
