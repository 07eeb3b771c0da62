"""Plain-torch int8, written without quantlab: the yardstick for quantlab's artifacts.

This is the PyTorch tutorial's recipe typed directly against torch.ao.quantization, the way a
PyTorch user would do it by hand: `fuse_model()`, `get_default_qconfig(engine)`, prepare,
calibrate, convert. `quantlab bench` builds it from the same float weights and calibration
batches as quantlab's own variants, scripts it with each optimisation asked for (plain
torch.jit.script / freeze / optimize_for_inference), and reports how quantlab's artifact
compares with the fastest of these.

It deliberately imports nothing from quantlab (tests/library/test_bench.py checks), so that a
regression in quantlab's path (a missed fusion, the wrong engine, an extra wrapper) shows up
as a ratio instead of being shared by both sides.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.ao.quantization as tq
from torch import nn


def build_int8(float_model: nn.Module, calibration: Iterable[torch.Tensor], engine: str) -> nn.Module:
    """The tutorial's static PTQ of a torchvision quantizable model, for `engine`."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        model = copy.deepcopy(float_model).eval()
        model.fuse_model(is_qat=False)
        model.qconfig = tq.get_default_qconfig(engine)
        tq.prepare(model, inplace=True)
        with torch.inference_mode():
            for images in calibration:
                model(images)
        return tq.convert(model, inplace=True)
    finally:
        torch.backends.quantized.engine = previous



def build_float(float_model: nn.Module) -> nn.Module:
    """The float model as the tutorial benchmarks it: a fused eval-mode copy."""
    model = copy.deepcopy(float_model).eval()
    model.fuse_model(is_qat=False)
    return model
