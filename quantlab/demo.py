"""The embedded default: real handwritten digits, a small float MobileNetV2, the full recipe.

`quantlab demo` seeds the store with scikit-learn's 1,797 digits (an ImageFolder of PNGs),
trains a float baseline on them once (a torchvision-format state_dict, like the tutorial's
mobilenet_pretrained_float.pth), then runs the `quantize` flow on it exactly as on ImageNet.

The model is torchvision's quantizable MobileNetV2 at width 0.5, on 8x8 digits upsampled to
32x32 (grey replicated to 3 channels by ImageFolder's RGB loader).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import torch

from quantlab import data, models
from quantlab.evaluate import evaluate
from quantlab.config import (BenchConfig, DataConfig, ModelConfig, QATConfig, RunConfig,
                             TransformConfig)
from quantlab.store import Store
from quantlab.train import EpochStats, train_one_epoch

log = logging.getLogger("quantlab.demo")

MODEL = "mobilenet_v2"
MODEL_KWARGS = {"width_mult": 0.5}
DATASET = "digits"
BASELINE = f"models/{DATASET}-{MODEL}-float.pth"
# Digits are light strokes on black: pixel mean ~0.30 and std ~0.38 after ToTensor.
TRANSFORMS = TransformConfig(input_size=32, resize_size=32, mean=(0.30, 0.30, 0.30),
                             std=(0.38, 0.38, 0.38), train_crop_scale=(0.75, 1.0), hflip=False)


def demo_config(store: str, data_uri: str, checkpoint: str, storage_options: dict | None = None,
                qat_epochs: int = 3, nproc_per_node: int = 2) -> RunConfig:
    """The demo's RunConfig: the tutorial's recipe, scaled to 1,437 training images."""
    return RunConfig(
        model=ModelConfig(name=MODEL, checkpoint=checkpoint, kwargs=MODEL_KWARGS),
        data=DataConfig(uri=data_uri, batch_size=32, eval_batch_size=100, transforms=TRANSFORMS),
        store=store, storage_options=storage_options or {},
        qat=QATConfig(epochs=qat_epochs, freeze_bn_after=max(1, qat_epochs - 1),
                      freeze_observers_after=max(1, qat_epochs - 1), lr=1e-3, momentum=0.9,
                      weight_decay=0.0, nproc_per_node=nproc_per_node, threads_per_worker=1),
        bench=BenchConfig(num_threads=2, batch_sizes=(1, 32), warmup=20, iterations=200),
    )


def seed(store: Store) -> tuple[str, bool]:
    """Write the digits ImageFolder into the store unless it is there; returns (uri, written)."""
    return data.seed_digits(store, DATASET)


def train_baseline(store: Store, data_uri: str, cache_dir: str, epochs: int = 20,
                   seed: int = 0, on_epoch: Callable[[int, EpochStats, float], None] | None = None,
                   ) -> tuple[str, bool]:
    """Train the float baseline once and store its state_dict; returns (uri, trained)."""
    if store.exists(BASELINE):
        return store.uri(BASELINE), False
    torch.manual_seed(seed)
    staged = data.stage(data_uri, cache_dir, store.storage_options)
    cfg = DataConfig(uri=data_uri, batch_size=64, eval_batch_size=200, transforms=TRANSFORMS)
    train_loader = data.loader(staged, cfg, "train", train=True, seed=seed)
    val_loader = data.loader(staged, cfg, "val", train=False)
    model = models.build(MODEL, num_classes=len(staged.classes), **MODEL_KWARGS)
    # Weight decay 5e-4 and a peak rate of 0.05 (one-cycle) give ~98% top-1; a peak of 0.1
    # trains to ~95% but leaves weight ranges that per-tensor PTQ cannot represent (~10%).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9, weight_decay=5e-4,
                                nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05,
                                                    total_steps=epochs * len(train_loader))
    for epoch in range(1, epochs + 1):
        stats = train_one_epoch(model, train_loader, optimizer, scheduler=scheduler)
        top1 = evaluate(model, val_loader).top1
        if on_epoch:
            on_epoch(epoch, stats, top1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    store.write_bytes(BASELINE, buf.getvalue())
    return store.uri(BASELINE), True
