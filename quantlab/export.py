"""TorchScript export: script, optimise, serialize, load. Artifacts run with plain `torch.jit.load`.

    data = artifact_bytes(int8_model)        # what the pipeline stores: scripted (+ ARTIFACT_OPTIMISATION)
    module = load(data, engine="x86")        # verify the sha256 first: TorchScript is code

A TorchScript file is a program, not data: load only bytes whose sha256 matched a manifest
(quantlab.registry does that for you).

Optimisations (`quantlab bench --optimisations ...` measures them; BENCHMARKS.md has figures):
- "script": torch.jit.script only (the tutorial's artifact).
- "freeze": torch.jit.freeze: attributes (weights, packed int8 params) become constants.
- "optimize_for_inference": freeze plus MKLDNN rewrites. Measured only: a float model optimised
  this way does not survive torch.jit.save/load in torch 2.14 ("required keyword attribute
  'value' is undefined"), so it is never an artifact.
"""

from __future__ import annotations

import hashlib
import io

import torch
from torch import nn

from quantlab.backend import engine_context

OPTIMISATIONS = ("script", "freeze", "optimize_for_inference")
# What the pipeline's artifacts use, chosen by measurement (BENCHMARKS.md, "Optimisations"):
# frozen files load 2x (int8) to 13x (float) faster; on latency freezing was within the noise
# of a busy 2-core machine, so the choice should be confirmed on a quiet one.
ARTIFACT_OPTIMISATION = "freeze"


def script(model: nn.Module, optimisation: str = "script") -> torch.jit.ScriptModule:
    """torch.jit.script an eval-mode model (float or converted int8), then optimise it."""
    if optimisation not in OPTIMISATIONS:
        raise ValueError(f"unknown optimisation {optimisation!r}; valid: {', '.join(OPTIMISATIONS)}")
    scripted = torch.jit.script(model.eval())
    if optimisation == "freeze":
        return torch.jit.freeze(scripted)
    if optimisation == "optimize_for_inference":
        return torch.jit.optimize_for_inference(scripted)
    return scripted


def artifact_bytes(model: nn.Module, engine: str | None = None) -> bytes:
    """The serialized TorchScript the pipeline stores for a model (float, or int8 for `engine`)."""
    if engine is None:
        return to_bytes(script(model, ARTIFACT_OPTIMISATION))
    with engine_context(engine):
        return to_bytes(script(model, ARTIFACT_OPTIMISATION))


def to_bytes(module: torch.jit.ScriptModule) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def load(data: bytes, engine: str | None = None) -> torch.jit.ScriptModule:
    """Load TorchScript bytes on CPU. int8 weights are repacked for `engine` while loading."""
    if engine is None:
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    with engine_context(engine):
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
