"""Per-layer sensitivity of a PTQ variant, and the greedy float fallback that uses it.

The method (what the `sensitivity` table and the report mean):

1. The fused float model is copied with every quantizable layer (a fused conv/linear module,
   `QuantBackend.quantizable_layers`) observed on its own, using the variant's qconfig, and
   calibrated once on the variant's calibration images; after convert each layer is an int8
   module with float input and output (`QuantBackend.prepare_isolated`). Its input observer
   sees the same float tensor that the upstream layer's output observer sees in the fully
   quantized variant, so every layer gets the scales it has in that variant.
2. For each layer alone, that int8 module replaces the float layer in the float model (only
   this layer is quantized) and the model runs on the sensitivity subset, the first
   `num_batches` batches of the calibration images:
   - `top1_drop`: the float model's top-1 on the subset minus this model's (points);
   - `layer_sqnr_db`: SQNR of the layer's int8 output against the float layer's output on
     the same input, 10*log10(sum(ref^2) / sum((ref - out)^2)) over the whole subset;
   - `output_sqnr_db`: the same for the model's logits against the float model's logits.
3. Rank 1 is the most sensitive layer: the largest top-1 drop, ties broken by the lowest
   output SQNR (a subset top-1 moves in steps of 100/num_images points and is often 0 for a
   single layer; the logits' SQNR orders those layers continuously).

The float fallback (`greedy_fallback`) keeps the k most sensitive layers in float for k = 1,
2, ... and stops at the first k whose model meets the accuracy target, or at the limit.

    rows = measure(fused_float, int8_layers, layers, batches)    # ranked LayerSensitivity
    steps = greedy_fallback([r.layer for r in rows], top1_with, base_top1, target, limit=8)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pydantic import BaseModel
from torch import nn

from quantlab.backend import Layer
from quantlab.evaluate import correct_topk


class LayerSensitivity(BaseModel):
    """One layer quantized alone, the rest of the model in float (see the module docstring)."""

    rank: int                   # 1 = most sensitive
    layer: str                  # module path in the fused float model
    op_type: str                # e.g. ConvReLU2d, Conv2d, Linear
    num_params: int
    top1: float                 # percent, on the sensitivity subset
    top1_drop: float            # float top-1 minus top1, points
    layer_sqnr_db: float        # inf when the int8 layer reproduces float exactly
    output_sqnr_db: float


class SensitivityResult(BaseModel):
    """A variant's per-layer sensitivity, ranked."""

    variant: str
    float_top1: float           # the float model on the same subset
    num_images: int
    layers: list[LayerSensitivity]


class FallbackStep(BaseModel):
    """One step of the greedy fallback: the model with the k most sensitive layers in float."""

    num_float_layers: int
    added: str | None           # the layer this step put in float (None for the base variant)
    top1: float
    within_budget: bool


class Sqnr:
    """Accumulates signal and noise energy over batches."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        reference, test = reference.float(), test.float()
        self.signal += float(reference.pow(2).sum())
        self.noise += float((reference - test).pow(2).sum())

    @property
    def db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


@torch.inference_mode()
def measure(fused: nn.Module, quantized: dict[str, nn.Module], layers: Sequence[Layer],
            batches: Sequence[tuple[torch.Tensor, torch.Tensor]], variant: str = ""
            ) -> SensitivityResult:
    """Quantize each layer alone in `fused` (swapping in `quantized[name]`), rank the layers.

    `fused` is the eval-mode fused float model; it is restored after each layer. `batches`
    are (images, targets) held in memory, so that every layer sees the same images.
    """
    fused.eval()
    targets = [t for _, t in batches]
    reference = [fused(x) for x, _ in batches]
    num_images = sum(len(t) for t in targets)
    if num_images == 0:
        raise ValueError("sensitivity needs at least one image")

    def top1(outputs: list[torch.Tensor]) -> float:
        return 100.0 * sum(correct_topk(o, t, ks=(1,))[0] for o, t in zip(outputs, targets)) / num_images

    float_top1 = top1(reference)
    rows = []
    for layer in layers:
        original = fused.get_submodule(layer.name)
        int8 = quantized[layer.name]
        layer_sqnr, output_sqnr = Sqnr(), Sqnr()
        handle = int8.register_forward_hook(
            lambda _m, inputs, output: layer_sqnr.add(original(inputs[0]), output))
        fused.set_submodule(layer.name, int8)
        try:
            outputs = [fused(x) for x, _ in batches]
        finally:
            fused.set_submodule(layer.name, original)
            handle.remove()
        for ref, out in zip(reference, outputs):
            output_sqnr.add(ref, out)
        layer_top1 = top1(outputs)
        rows.append(dict(layer=layer.name, op_type=layer.op_type, num_params=layer.num_params,
                         top1=layer_top1, top1_drop=float_top1 - layer_top1,
                         layer_sqnr_db=layer_sqnr.db, output_sqnr_db=output_sqnr.db))
    rows.sort(key=lambda r: (-r["top1_drop"], r["output_sqnr_db"]))
    return SensitivityResult(variant=variant, float_top1=float_top1, num_images=num_images,
                             layers=[LayerSensitivity(rank=i + 1, **r) for i, r in enumerate(rows)])


def greedy_fallback(ranked: Sequence[str], top1_with: Callable[[list[str]], float],
                    base_top1: float, target_top1: float, max_float_layers: int,
                    patience: int = 2) -> list[FallbackStep]:
    """Keep the most sensitive layers in float, one more per step, until top-1 >= target.

    `top1_with(layers)` builds and evaluates the variant with `layers` in float. Step 0 is the
    base variant (`base_top1`, nothing in float). The search stops at the first step within
    budget, at the limit (max_float_layers, or every layer), or after `patience` steps in a
    row that did not beat the best top-1 so far: more float layers that buy no accuracy only
    cost speed and size. `chosen_step` says which step the fallback keeps.
    """
    steps = [FallbackStep(num_float_layers=0, added=None, top1=base_top1,
                          within_budget=base_top1 >= target_top1)]
    best, stale = base_top1, 0
    for k in range(1, min(max_float_layers, len(ranked)) + 1):
        if steps[-1].within_budget or stale >= patience:
            break
        top1 = top1_with(list(ranked[:k]))
        steps.append(FallbackStep(num_float_layers=k, added=ranked[k - 1], top1=top1,
                                  within_budget=top1 >= target_top1))
        best, stale = (top1, 0) if top1 > best else (best, stale + 1)
    return steps


def chosen_step(steps: Sequence[FallbackStep]) -> FallbackStep:
    """The step the fallback ships: the first within budget, else the fewest float layers that
    reached the best top-1 of the search."""
    within = [s for s in steps if s.within_budget]
    if within:
        return within[0]
    best = max(s.top1 for s in steps)
    return next(s for s in steps if s.top1 == best)
