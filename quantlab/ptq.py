"""Post-training quantization, the tutorial's way: prepare, calibrate, convert.

    loader = calibration_loader(cfg, staged, variant.num_calibration_batches)
    int8 = quantize_ptq(float_model, variant, loader, input_size=224)  # consumes float_model

The variant's backend (quantlab.backend: eager or pt2e) decides how a model is prepared and
converted; this module owns the order of the phases and which images calibrate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from quantlab import data
from quantlab.backend import get_backend, supports_mixed_precision
from quantlab.config import RunConfig, VariantConfig
from quantlab.data import StagedData
from quantlab.errors import ConfigError


def calibration_loader(cfg: RunConfig, staged: StagedData, num_batches: int):
    """A fixed, seeded subset of train/ with eval transforms: num_batches x batch_size images."""
    return data.loader(staged, cfg.data, "train", train=False, batch_size=cfg.data.batch_size,
                       max_images=num_batches * cfg.data.batch_size, seed=cfg.seed)


@torch.inference_mode()
def calibrate(model: torch.nn.Module, loader: Iterable) -> int:
    """Run images through an observed model so its observers record ranges; returns count."""
    model.eval()
    n = 0
    for images, _ in loader:
        model(images)
        n += len(images)
    return n


def quantize_ptq(model: torch.nn.Module, variant: VariantConfig, loader: Iterable,
                 float_layers: Sequence[str] = (), input_size: int | None = None
                 ) -> torch.nn.Module:
    """A float model (consumed: eager mode fuses it in place) -> calibrated, converted int8 model.

    `loader` yields (images, labels) batches (`quantlab bench` passes random ones), in the same
    order each time it is iterated (bias correction reads it again); `float_layers` stay in
    float (eager mode only). `input_size`: the model's input side, which backend pt2e exports at.
    """
    backend = get_backend(variant.backend, input_size)
    mixed = supports_mixed_precision(backend)  # PT2E: no float layers, no post-convert algorithms
    if float_layers and not mixed:
        raise ConfigError(f"variant {variant.name}: float layers need backend eager; "
                          f"backend {backend.name} quantizes every layer")
    # eager mode fuses (and equalizes) `model` in place
    observed = backend.prepare_ptq(model, variant, float_layers) if mixed else \
        backend.prepare_ptq(model, variant)
    calibrate(observed, loader)
    int8 = backend.convert(observed, variant.engine)
    # Bias correction compares each int8 layer with its float twin on the same batches.
    return backend.apply_after_convert(model, int8, variant, loader) if mixed else int8
