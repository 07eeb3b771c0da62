"""Top-1, top-5 and loss of a classifier on a loader, as the tutorial's evaluate() computes them.

    result = evaluate(model, val_loader)             # EvalResult(top1=..., top5=..., loss=...)

Accuracies are percentages (0-100), as the tutorial prints them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader


class EvalResult(BaseModel):
    top1: float         # percent
    top5: float | None  # percent; None with 5 classes or fewer, where it is always 100
    loss: float         # mean cross-entropy
    num_images: int


def correct_topk(output: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose target is among the k highest logits, for each k."""
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    hits = pred.eq(target.unsqueeze(1))
    return [int(hits[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.inference_mode()
def count(model: nn.Module, loader: DataLoader, max_batches: int | None = None,
          on_batch: Callable[[int], None] | None = None,
          logits: list[torch.Tensor] | None = None,
          labels: list[torch.Tensor] | None = None) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, images] over `loader` (or its first `max_batches`),
    as float64: counts from several processes add up (all_reduce) before `result_from`.
    Top-5 hits are NaN when the model has 5 classes or fewer (top-5 says nothing there).
    `logits`, `labels`: lists that receive each batch's output and targets (for agreement
    and SQNR)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    n = c1 = c5 = 0
    loss = 0.0
    for i, (images, target) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        output = model(images)
        if logits is not None:
            logits.append(output.detach().clone())
        if labels is not None:
            labels.append(target)
        loss += float(criterion(output, target))
        h1, h5 = correct_topk(output, target)
        c1, c5, n = c1 + h1, c5 + h5, n + len(target)
        if on_batch:
            on_batch(i + 1)
        if output.shape[1] <= 5:
            c5 = float("nan")
    return torch.tensor([loss, c1, c5, n], dtype=torch.float64)


def result_from(counts: torch.Tensor) -> EvalResult:
    """EvalResult from `count`'s [loss sum, top-1 hits, top-5 hits, images]."""
    loss, c1, c5, n = counts.tolist()
    if n == 0:
        raise ValueError("evaluation saw no images")
    top5 = None if math.isnan(c5) else 100.0 * c5 / n
    return EvalResult(top1=100.0 * c1 / n, top5=top5, loss=loss / n, num_images=int(n))


def evaluate(model: nn.Module, loader: DataLoader, max_batches: int | None = None,
             on_batch: Callable[[int], None] | None = None,
             logits: list[torch.Tensor] | None = None,
             labels: list[torch.Tensor] | None = None) -> EvalResult:
    """Evaluate in eval mode on all of `loader`, or its first `max_batches` batches
    (`logits`, `labels`: lists that receive the outputs and targets, batch by batch)."""
    return result_from(count(model, loader, max_batches, on_batch, logits, labels))


def result_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """EvalResult of logits computed elsewhere (another runtime), with their labels."""
    logits, labels = torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(labels)
    h1, h5 = correct_topk(logits, labels)
    loss = float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
    c5 = float("nan") if logits.shape[1] <= 5 else h5
    return result_from(torch.tensor([loss, h1, c5, len(labels)], dtype=torch.float64))
