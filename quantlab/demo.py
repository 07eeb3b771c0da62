"""The embedded default: a real dataset, a float MobileNetV2 trained once, the full recipe.

`quantlab demo` seeds the store with a dataset (an ImageFolder of PNGs), trains a float
baseline on it once (a torchvision-format state_dict, like the tutorial's
mobilenet_pretrained_float.pth), then runs the `quantize` flow on it exactly as on ImageNet.
Each dataset has its `Recipe` (RECIPES):

- digits (the default; needs nothing but pip): scikit-learn's 1,797 handwritten digits, 8x8
  upsampled to 32x32, MobileNetV2 at width 0.5, trained with settings that keep weight ranges
  small enough for per-tensor PTQ (see DIGITS).
- fashion-mnist: the 70,000 Fashion-MNIST images (Debian's dataset-fashion-mnist, or the
  dataset's own idx files), 28x28 padded to 32x32, MobileNetV2 at width 1.0, trained with an
  ordinary recipe that is NOT tuned for quantization, so that the run shows what PTQ really
  costs on a normally trained model (see FASHION_MNIST).

Grey images are replicated to 3 channels by ImageFolder's RGB loader.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from quantlab import data, models
from quantlab.evaluate import evaluate
from quantlab.config import (DataConfig, ModelConfig, QATConfig, RunConfig, SensitivityConfig,
                             TimingConfig, TransformConfig)
from quantlab.errors import ConfigError
from quantlab.store import Store
from quantlab.train import EpochStats, train_one_epoch

log = logging.getLogger("quantlab.demo")

MODEL = "mobilenet_v2"


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How the demo seeds one dataset and trains its float baseline (SGD, one-cycle)."""

    dataset: str                        # the store's datasets/<dataset>/
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. width_mult
    transforms: TransformConfig
    epochs: int                         # baseline training epochs
    batch_size: int = 64                # baseline training batch
    max_lr: float                       # one-cycle peak learning rate (starts at max_lr / 25)
    weight_decay: float
    max_train_images: int | None = None  # a fixed, seeded subset of train/; None: all of it
    qat_max_train_batches: int | None = None  # QAT batches per epoch and worker; None: all
    sensitivity_variant: str | None = None  # None: the last variant; "auto": see SensitivityConfig
    variants: tuple[str, ...] = ("ptq-minmax", "ptq-x86", "pt2e-x86")  # PTQ presets the demo
                                        # runs; the last eager one is the one the sensitivity
                                        # and the fallback patch

    @property
    def baseline(self) -> str:
        """Where the trained float baseline is stored (relative to the store)."""
        return f"models/{self.dataset}-{MODEL}-float.pth"


# Digits are light strokes on black: pixel mean ~0.30 and std ~0.38 after ToTensor.
# Weight decay 5e-4 and a peak rate of 0.05 (one-cycle) give ~98% top-1; a peak of 0.1 trains
# to ~95% but leaves weight ranges that per-tensor PTQ cannot represent (~10%).
DIGITS = Recipe(
    dataset="digits", model_kwargs={"width_mult": 0.5}, epochs=20, max_lr=0.05, weight_decay=5e-4,
    transforms=TransformConfig(input_size=32, resize_size=32, mean=(0.30, 0.30, 0.30),
                               std=(0.38, 0.38, 0.38), train_crop_scale=(0.75, 1.0), hflip=False))
# An ordinary recipe, not tuned for quantization: the usual one-cycle SGD to a peak of 0.1 with
# MobileNet's weight decay (4e-5), batches of 128, the 28x28 images padded (not resized) to 32x32,
# flips but no crops, 3 epochs on 30,000 of the 60,000 training images: 87.86% top-1 on the
# 10,000 test images (measured, bench/fashion_mnist.py: 224 s to train on 1 core). Batches
# of 64 at that peak diverge mid-run (the loss doubles in epoch 2; 79.8% after 3 epochs, padded,
# no crops); crops of 75-100% cost 14 points more after one epoch; with both and the images
# resized to 32, 77.75%. Fashion-MNIST pixels: mean ~0.29, std ~0.35.
FASHION_MNIST = Recipe(
    dataset="fashion-mnist", model_kwargs={"width_mult": 1.0}, epochs=3, batch_size=128,
    max_lr=0.1, weight_decay=4e-5, max_train_images=30_000,
    variants=("ptq-minmax", "ptq-minmax-cle-bc", "ptq-x86-cle-bc", "ptq-x86", "pt2e-x86"),
    # the fallback patches the most accurate variant the budget would reject
    qat_max_train_batches=60, sensitivity_variant="auto",  # 60 batches x 32 images x 2 workers: 3,840 images an epoch
    transforms=TransformConfig(input_size=32, resize_size=32, pad=2, mean=(0.29, 0.29, 0.29),
                               std=(0.35, 0.35, 0.35), train_crop_scale=(1.0, 1.0), hflip=True))
RECIPES = {r.dataset: r for r in (DIGITS, FASHION_MNIST)}


def recipe(dataset: str) -> Recipe:
    """The demo recipe of a dataset name; a ConfigError names the valid ones."""
    if dataset not in RECIPES:
        raise ConfigError(f"unknown demo dataset {dataset!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[dataset]


def demo_config(store: str, data_uri: str, checkpoint: str, storage_options: dict | None = None,
                qat_epochs: int = 3, nproc_per_node: int = 2, recipe: Recipe = DIGITS) -> RunConfig:
    """The demo's RunConfig: the tutorial's recipe, scaled to the demo's dataset, on both
    stacks: eager mode (ptq-minmax, ptq-x86, qat-x86) and PT2E (pt2e-x86, qat-pt2e-x86)."""
    return RunConfig(
        model=ModelConfig(name=MODEL, checkpoint=checkpoint, kwargs=recipe.model_kwargs),
        data=DataConfig(uri=data_uri, batch_size=32, eval_batch_size=100,
                        transforms=recipe.transforms),
        store=store, storage_options=storage_options or {}, variants=recipe.variants,
        qat=QATConfig(backends=("eager", "pt2e"), epochs=qat_epochs, freeze_bn_after=max(1, qat_epochs - 1),
                      freeze_observers_after=max(1, qat_epochs - 1), lr=1e-3, momentum=0.9,
                      weight_decay=0.0, nproc_per_node=nproc_per_node, threads_per_worker=1,
                      max_train_batches=recipe.qat_max_train_batches),
        # 23 (variant, runtime) pairs at 2 batch sizes, each setting measured again while noisy:
        # 100 timed calls each keep the demo within 5 minutes (200 took the stage to 94 s).
        timing=TimingConfig(num_threads=2, batch_sizes=(1, 32), warmup=20, iterations=100),
        sensitivity=SensitivityConfig(variant=recipe.sensitivity_variant),
    )


def seed(store: Store, dataset: str = DIGITS.dataset, source: str | None = None) -> tuple[str, bool]:
    """Write the dataset's ImageFolder into the store unless it is there; returns (uri, written).

    `source`: the folder of Fashion-MNIST's idx files (default: where Debian installs them).
    """
    if recipe(dataset) is FASHION_MNIST:
        return data.seed_fashion_mnist(store, source or data.FASHION_MNIST_DIR, dataset)
    return data.seed_digits(store, dataset)


def train_baseline(store: Store, data_uri: str, cache_dir: str, epochs: int | None = None,
                   seed: int = 0, on_epoch: Callable[[int, EpochStats, float], None] | None = None,
                   recipe: Recipe = DIGITS) -> tuple[str, bool]:
    """Train the float baseline once (`recipe.epochs` unless `epochs`) and store its
    state_dict; returns (uri, trained)."""
    if store.exists(recipe.baseline):
        return store.uri(recipe.baseline), False
    epochs = epochs or recipe.epochs
    torch.manual_seed(seed)
    staged = data.stage(data_uri, cache_dir, store.storage_options)
    cfg = DataConfig(uri=data_uri, batch_size=recipe.batch_size, eval_batch_size=200,
                     transforms=recipe.transforms)
    train_loader = data.loader(staged, cfg, "train", train=True, seed=seed,
                               max_images=recipe.max_train_images)
    val_loader = data.loader(staged, cfg, "val", train=False)
    model = models.build(MODEL, num_classes=len(staged.classes), **recipe.model_kwargs)
    # lr: a placeholder, OneCycleLR sets every step's rate (max_lr / 25 up to max_lr, then down)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.max_lr, momentum=0.9,
                                weight_decay=recipe.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.max_lr,
                                                    total_steps=epochs * len(train_loader))
    for epoch in range(1, epochs + 1):
        stats = train_one_epoch(model, train_loader, optimizer, scheduler=scheduler)
        top1 = evaluate(model, val_loader).top1
        if on_epoch:
            on_epoch(epoch, stats, top1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    store.write_bytes(recipe.baseline, buf.getvalue())
    return store.uri(recipe.baseline), True
