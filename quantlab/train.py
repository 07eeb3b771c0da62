"""One training epoch, shared by float training (the demo's baseline) and QAT.

As in torchvision's references, the quantization recipe reuses the float recipe's loop and adds
only what is quantization-specific (see quantlab.qat).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader

from quantlab.evaluate import correct_topk


class EpochStats(BaseModel):
    loss: float          # mean training loss over the images seen
    top1: float          # percent, on the training batches (train transforms)
    num_images: int
    seconds: float

    @property
    def images_per_sec(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else 0.0


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    max_batches: int | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    on_batch: Callable[[int, float], None] | None = None) -> EpochStats:
    """Train `model` (train mode) for one pass over `loader` or its first `max_batches`.

    `scheduler` is stepped per batch when given (per-epoch schedules are stepped by the caller).
    """
    model.train()
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    n = correct = 0
    total_loss = 0.0
    for i, (images, target) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        output = model(images)
        loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(target)
        correct += correct_topk(output.detach(), target, ks=(1,))[0]
        n += len(target)
        if on_batch:
            on_batch(i + 1, loss.item())
    seconds = time.perf_counter() - start
    return EpochStats(loss=total_loss / max(n, 1), top1=100.0 * correct / max(n, 1),
                      num_images=n, seconds=seconds)
