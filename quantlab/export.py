"""TorchScript export: script, serialize, load. Artifacts run with plain `torch.jit.load`.

    data = to_bytes(script(int8_model))      # what the store keeps
    module = load(data, engine="x86")        # verify the sha256 first: TorchScript is code

A TorchScript file is a program, not data: load only bytes whose sha256 matched a manifest
(quantlab.registry does that for you).
"""

from __future__ import annotations

import hashlib
import io

import torch
from torch import nn

from quantlab.backend import engine_context


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """torch.jit.script an eval-mode model (float or converted int8)."""
    return torch.jit.script(model.eval())


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
