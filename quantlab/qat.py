"""Quantization-aware training: the tutorial's schedule as a torch.distributed (gloo) job.

Launched the torchrun way, one process per worker (see quantlab.distributed.launch):

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m quantlab.qat --job job.json

Each worker builds the float model, fuses it for QAT and inserts fake quantization
(prepare_qat) *before* wrapping it in DistributedDataParallel, then fine-tunes with SGD.
After epoch `freeze_bn_after` BatchNorm statistics freeze, after `freeze_observers_after`
the observers freeze, on every rank at the same epoch (the schedule is a pure function of the
epoch number). After every epoch rank 0 converts a CPU deep copy of the unwrapped model to
int8, evaluates it, writes the epoch's `qat_epochs` row and a checkpoint to the store.

Decisions, and why:
- Batch size and learning rate: `data.batch_size` is per worker, so the effective batch is
  batch_size x world_size. The learning rate is used as given (not scaled with world size): QAT
  fine-tunes a trained model with a small rate, and the tutorial's 1e-4 was chosen for that.
  Scale it yourself (linear rule) if you grow the world size a lot.
- BatchNorm: no SyncBatchNorm. BN statistics are frozen after a few epochs anyway, and before
  that DDP broadcasts rank 0's buffers (BN running stats, observer min/max, fake-quant scales)
  to every rank at each forward (broadcast_buffers=True). So ranges and statistics are the
  same on every rank by construction, computed from rank 0's shard. We do not all-reduce
  observer ranges: with shuffled shards of the same distribution, rank 0's running ranges
  converge to the same values, and an all-reduce per step would cost one collective per
  observer (~100 on MobileNetV2) over gloo.
- Threads: torchrun starts each worker with OMP_NUM_THREADS = threads_per_worker and the worker
  calls torch.set_num_threads with it; DataLoader workers default to 0 (in-process loading).
- Resume: a checkpoint per epoch holds model, optimizer, scheduler, epoch, the freeze state and
  every rank's RNG state. A (re)started group loads the newest one and continues from the next
  epoch: after torchrun restarts a group whose worker died, and when a flow is re-run.
  Each epoch's metrics row is written before its checkpoint, under a name fixed by the epoch,
  so a retried epoch rewrites its row: every epoch appears exactly once.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
from datetime import datetime

import torch
import torch.distributed as dist
from pydantic import BaseModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from quantlab import data, metrics, models, registry
from quantlab.backend import get_backend
from quantlab.config import RunConfig
from quantlab.data import StagedData
from quantlab.distributed import init_process_group
from quantlab.evaluate import evaluate
from quantlab.store import Store
from quantlab.train import train_one_epoch

log = logging.getLogger("quantlab.qat")
EVENT_PREFIX = "QUANTLAB_EVENT "


class QatJob(BaseModel):
    """What every worker needs; written to a JSON file by the launcher (no secrets in it)."""

    config: RunConfig
    staged: StagedData
    run_id: str
    run_date: datetime
    num_classes: int


class EpochRow(BaseModel):
    """One row of the `qat_epochs` table."""

    run_id: str
    epoch: int
    world_size: int
    train_loss: float
    train_top1: float
    eval_top1: float
    eval_top5: float
    observer_frozen: bool
    bn_frozen: bool
    lr: float
    seconds: float
    images_per_sec: float


# -- model and checkpoints ---------------------------------------------------------------
def build_qat_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """Float checkpoint -> fused for QAT -> fake quantization inserted (train mode)."""
    float_model = models.load_float_model(cfg.model.name, num_classes, cfg.model.checkpoint,
                                          cfg.storage_options, **cfg.model.kwargs)
    return get_backend().prepare_qat(float_model.train(), cfg.qat.engine)


def make_optimizer(cfg: RunConfig, model: nn.Module):
    q = cfg.qat
    optimizer = torch.optim.SGD(model.parameters(), lr=q.lr, momentum=q.momentum,
                                weight_decay=q.weight_decay)
    if q.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=q.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    return optimizer, scheduler


def freeze_state(cfg: RunConfig, epoch: int) -> tuple[bool, bool]:
    """(observers frozen, BN frozen) once `epoch` (1-based) has been trained."""
    return epoch >= cfg.qat.freeze_observers_after, epoch >= cfg.qat.freeze_bn_after


def apply_freeze(model: nn.Module, observers: bool, bn: bool) -> None:
    backend = get_backend()
    if bn:
        backend.freeze_bn_stats(model)
    if observers:
        backend.freeze_observers(model)


def latest_checkpoint(store: Store, run_id: str) -> int:
    """The newest completed epoch with a checkpoint in the store (0 if none)."""
    names = store.list_dir(f"{registry.run_dir(run_id)}/checkpoints/qat")
    epochs = [int(m.group(1)) for n in names if (m := re.fullmatch(r"epoch-(\d+)\.pt", n))]
    return max(epochs, default=0)


def save_checkpoint(store: Store, run_id: str, epoch: int, model: nn.Module, optimizer,
                    scheduler, observers_frozen: bool, bn_frozen: bool,
                    rng_states: list[torch.Tensor]) -> None:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "observers_frozen": observers_frozen, "bn_frozen": bn_frozen,
                "rng_states": rng_states}, buf)
    store.write_bytes(f"{registry.run_dir(run_id)}/{registry.checkpoint_path(epoch)}",
                      buf.getvalue())


def load_checkpoint(store: Store, run_id: str, epoch: int) -> dict:
    data = store.read_bytes(f"{registry.run_dir(run_id)}/{registry.checkpoint_path(epoch)}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def restore(model: nn.Module, ckpt: dict, optimizer=None, scheduler=None) -> None:
    """Load a checkpoint into a freshly prepared QAT model (and its optimizer/scheduler)."""
    model.load_state_dict(ckpt["model"])
    apply_freeze(model, ckpt["observers_frozen"], ckpt["bn_frozen"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])


def emit(event: str, **fields) -> None:
    """A machine-readable progress line on stdout (the launcher turns it into progress)."""
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def parse_event(line: str) -> dict | None:
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        return json.loads(line[len(EVENT_PREFIX):])
    except json.JSONDecodeError:
        return None


# -- the worker ----------------------------------------------------------------------------
def train(job: QatJob) -> None:
    """The QAT loop of one worker (rank) of an initialised process group."""
    cfg, q = job.config, job.config.qat
    rank, world_size = dist.get_rank(), dist.get_world_size()
    store = Store(cfg.store, cfg.storage_options)
    torch.manual_seed(cfg.seed + rank)  # augmentation randomness differs per rank

    model = build_qat_model(cfg, job.num_classes)
    optimizer, scheduler = make_optimizer(cfg, model)
    start = latest_checkpoint(store, job.run_id) + 1
    observers_frozen = bn_frozen = False
    if start > 1:
        ckpt = load_checkpoint(store, job.run_id, start - 1)
        restore(model, ckpt, optimizer, scheduler)
        observers_frozen, bn_frozen = ckpt["observers_frozen"], ckpt["bn_frozen"]
        if len(ckpt["rng_states"]) == world_size:
            torch.set_rng_state(ckpt["rng_states"][rank])
        log.info("resuming from the checkpoint of epoch %d (training epoch %d of %d)",
                 start - 1, start, q.epochs)
    if start > q.epochs:
        log.info("all %d epochs are already done", q.epochs)
        return

    ddp = DDP(model)  # after prepare_qat: DDP sees the fake-quant modules and their buffers
    train_loader = data.loader(job.staged, cfg.data, "train", train=True, distributed=True,
                               seed=cfg.seed)
    val_loader = data.loader(job.staged, cfg.data, "val", train=False) if rank == 0 else None

    for epoch in range(start, q.epochs + 1):
        train_loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(ddp, train_loader, optimizer, max_batches=q.max_train_batches)
        scheduler.step()
        # Every rank takes the same decision from the epoch number alone.
        observers_frozen, bn_frozen = freeze_state(cfg, epoch)
        apply_freeze(model, observers_frozen, bn_frozen)

        sums = torch.tensor([stats.loss * stats.num_images, stats.top1 * stats.num_images,
                             stats.num_images], dtype=torch.float64)
        seconds = torch.tensor([stats.seconds], dtype=torch.float64)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the epoch lasts as long as the slowest rank
        rng_states = [None] * world_size
        dist.all_gather_object(rng_states, torch.get_rng_state())

        if rank == 0:
            int8 = get_backend().convert(model, q.engine)  # a converted deep copy, on CPU
            result = evaluate(int8, val_loader, max_batches=cfg.data.max_eval_batches)
            num_images = int(sums[2])
            row = EpochRow(run_id=job.run_id, epoch=epoch, world_size=world_size,
                           train_loss=float(sums[0]) / max(num_images, 1),
                           train_top1=float(sums[1]) / max(num_images, 1),
                           eval_top1=result.top1, eval_top5=result.top5,
                           observer_frozen=observers_frozen, bn_frozen=bn_frozen, lr=lr,
                           seconds=float(seconds), images_per_sec=num_images / float(seconds))
            metrics.write_rows(store, "qat_epochs", [row.model_dump()], job.run_id,
                               f"epoch-{epoch:04d}", job.run_date)
            save_checkpoint(store, job.run_id, epoch, model, optimizer, scheduler,
                            observers_frozen, bn_frozen, rng_states)
            log.info("epoch %d/%d: loss %.4f, train top-1 %.2f, int8 val top-1 %.2f top-5 %.2f, "
                     "%.0f img/s%s%s", epoch, q.epochs, row.train_loss, row.train_top1,
                     row.eval_top1, row.eval_top5, row.images_per_sec,
                     ", BN frozen" if bn_frozen else "", ", observers frozen" if observers_frozen else "")
            emit("epoch", **row.model_dump())
        dist.barrier()  # no rank starts the next epoch before the checkpoint exists


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="quantlab QAT worker (start it with torchrun)")
    parser.add_argument("--job", required=True, help="path of the QatJob JSON file")
    args = parser.parse_args(argv)
    with open(args.job) as f:
        job = QatJob.model_validate_json(f.read())
    threads = int(os.environ.get("QUANTLAB_THREADS_PER_WORKER", job.config.qat.threads_per_worker))
    rank, world_size = init_process_group(threads)
    # quantlab's own progress at INFO; libraries (botocore, s3fs, ...) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout,
                        format=f"[rank {rank}/{world_size}] %(message)s", force=True)
    logging.getLogger("quantlab").setLevel(logging.INFO)
    try:
        train(job)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
