"""Quantization-aware training: the tutorial's schedule as a torch.distributed (gloo) job.

Launched the torchrun way, one process per worker (see quantlab.distributed.launch and
`quantlab qat`, which runs one node of a job):

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m quantlab.qat --job job.json

Each worker builds the float model and prepares it for QAT with the job's backend (eager:
fuse and prepare_qat; pt2e: torch.export and prepare_qat_pt2e on the exported graph)
*before* wrapping it in DistributedDataParallel, fine-tunes with SGD on its own shard
(DistributedSampler, set_epoch), and freezes BatchNorm statistics and observers at epochs fixed
by the config, on every rank. After every epoch, rank 0's buffers are broadcast so all ranks
hold the same ranges; global rank 0 converts a CPU deep copy of the unwrapped model to int8,
evaluates it, and writes the epoch's `qat_epochs` row, then a checkpoint, to the store. A
(re)started group resumes from the newest checkpoint.

Why it is done this way (batch size and learning rate with world size, no SyncBatchNorm,
observer ranges, threads, resume, evaluation on rank 0): docs/qat.md.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import socket
import sys
from datetime import datetime

import torch
import torch.distributed as dist
from pydantic import BaseModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from quantlab import data, evaluate, metrics, models, registry, report
from quantlab._deprecations import silence_deprecations
from quantlab.backend import QuantBackend, backend_for, get_backend
from quantlab.config import Backend, RunConfig
from quantlab.data import StagedData
from quantlab.distributed import init_process_group
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
    backend: Backend = "eager"              # which QAT variant: qat.name (eager) or qat.pt2e_name

    @property
    def variant(self) -> str:
        return self.config.qat.variant_name(self.backend)


class EpochRow(BaseModel):
    """One row of the `qat_epochs` table."""

    run_id: str
    variant: str
    backend: str
    epoch: int
    world_size: int
    train_loss: float
    train_top1: float
    eval_top1: float
    eval_top5: float | None
    observer_frozen: bool
    bn_frozen: bool
    lr: float
    seconds: float
    images_per_sec: float


# -- model and checkpoints ---------------------------------------------------------------
def build_qat_model(cfg: RunConfig, num_classes: int, backend: str = "eager") -> nn.Module:
    """Float checkpoint -> prepared for QAT by `backend` (eager: fused, fake quantization
    inserted; pt2e: exported, prepare_qat_pt2e), in train mode."""
    float_model = models.load_float_model(cfg.model.name, num_classes, cfg.model.checkpoint,
                                          cfg.storage_options, **cfg.model.kwargs)
    return backend_for(cfg, backend).prepare_qat(float_model.train(), cfg.qat.engine)


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


def apply_freeze(model: nn.Module, observers: bool, bn: bool,
                 backend: QuantBackend | None = None) -> None:
    backend = backend or get_backend()
    if bn:
        backend.freeze_bn_stats(model)
    if observers:
        backend.freeze_observers(model)


def latest_checkpoint(store: Store, run_id: str, backend: str = "eager") -> int:
    """The newest completed epoch of `backend`'s QAT variant with a checkpoint in the store
    (0 if none)."""
    names = store.list_dir(f"{registry.run_dir(run_id)}/{registry.checkpoint_dir(backend)}")
    epochs = [int(m.group(1)) for n in names if (m := re.fullmatch(r"epoch-(\d+)\.pt", n))]
    return max(epochs, default=0)


def is_trained(store: Store, run_id: str, epochs: int, backend: str = "eager") -> bool:
    """Has the run's QAT (of `backend`) finished: is there a checkpoint of its last epoch?"""
    return latest_checkpoint(store, run_id, backend) >= epochs


def save_checkpoint(store: Store, run_id: str, epoch: int, model: nn.Module, optimizer,
                    scheduler, observers_frozen: bool, bn_frozen: bool,
                    rng_states: list[torch.Tensor], backend: str = "eager") -> None:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "observers_frozen": observers_frozen, "bn_frozen": bn_frozen,
                "rng_states": rng_states}, buf)
    store.write_bytes(f"{registry.run_dir(run_id)}/{registry.checkpoint_path(epoch, backend)}",
                      buf.getvalue())


def load_checkpoint(store: Store, run_id: str, epoch: int, backend: str = "eager") -> dict:
    rel = f"{registry.run_dir(run_id)}/{registry.checkpoint_path(epoch, backend)}"
    return torch.load(io.BytesIO(store.read_bytes(rel)), map_location="cpu", weights_only=True)


def restore(model: nn.Module, ckpt: dict, optimizer=None, scheduler=None,
            backend: QuantBackend | None = None) -> None:
    """Load a checkpoint into a freshly prepared QAT model (and its optimizer/scheduler);
    `backend`: the one that prepared the model (default eager), whose freeze verbs the
    checkpoint's freeze state is applied with again."""
    model.load_state_dict(ckpt["model"])
    apply_freeze(model, ckpt["observers_frozen"], ckpt["bn_frozen"], backend)
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
@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers: observer ranges, fake-quant scales and zero
    points, BatchNorm statistics, freeze flags.

    DDP broadcasts them before every training forward, but the last forward of an epoch
    updates each rank's copy from its own shard; this makes them equal again before they are
    frozen, converted or saved. One broadcast per dtype.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in model.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src)
        for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(part.view_as(b))


def train_loader(job: QatJob):
    """This rank's shard of train/ (a DistributedSampler: call set_epoch every epoch)."""
    return data.loader(job.staged, job.config.data, "train", train=True, distributed=True,
                       seed=job.config.seed)


def val_shard_loader(job: QatJob):
    """This rank's strided shard of the images a single-process evaluation would see."""
    d = job.config.data
    limit = d.max_eval_batches * d.eval_batch_size if d.max_eval_batches else None
    return data.loader(job.staged, d, "val", train=False,
                       shard=(dist.get_rank(), dist.get_world_size(), limit))


def resume_epoch(store: Store, run_id: str, backend: str = "eager") -> int:
    """The newest checkpointed epoch, as global rank 0 sees it, agreed by every rank."""
    latest = [latest_checkpoint(store, run_id, backend) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(latest, src=0)
    return latest[0]


def run_date(store: Store, job: QatJob) -> datetime:
    """The run's creation time as stored in run.json (partition of the metric rows).

    With several nodes each launcher may have created run.json; all of them finished before
    the rendezvous, so the stored one is final and every attempt writes to the same file.
    """
    rel = f"{registry.run_dir(job.run_id)}/run.json"
    if store.exists(rel):
        return datetime.fromisoformat(store.read_json(rel)["created_at"])
    return job.run_date


def train(job: QatJob) -> nn.Module:
    """The QAT loop of one worker (rank) of an initialised process group.

    Returns the trained QAT model (unwrapped from DDP; the same on every rank).
    """
    cfg, q = job.config, job.config.qat
    rank, world_size = dist.get_rank(), dist.get_world_size()
    store = Store(cfg.store, cfg.storage_options)
    torch.manual_seed(cfg.seed + rank)  # augmentation randomness differs per rank

    backend = backend_for(cfg, job.backend)
    model = build_qat_model(cfg, job.num_classes, job.backend)
    optimizer, scheduler = make_optimizer(cfg, model)
    start = resume_epoch(store, job.run_id, job.backend) + 1
    observers_frozen = bn_frozen = False
    if start > 1:
        ckpt = load_checkpoint(store, job.run_id, start - 1, job.backend)
        restore(model, ckpt, optimizer, scheduler, backend)
        observers_frozen, bn_frozen = ckpt["observers_frozen"], ckpt["bn_frozen"]
        if len(ckpt["rng_states"]) == world_size:
            torch.set_rng_state(ckpt["rng_states"][rank])
        log.info("resuming from the checkpoint of epoch %d (training epoch %d of %d)",
                 start - 1, start, q.epochs)
    if start > q.epochs:
        log.info("all %d epochs are already done", q.epochs)
        return model

    ddp = DDP(model)  # after prepare_qat: DDP sees the fake-quant modules and their buffers
    loader = train_loader(job)
    log.info("%s, worker %s of node %s: a shard of %d of %d training images, %d threads",
             job.variant, os.environ.get("LOCAL_RANK", "0"), socket.gethostname(),
             len(loader.sampler), len(loader.dataset), torch.get_num_threads())
    val_loader = val_shard_loader(job)
    date = run_date(store, job) if rank == 0 else job.run_date

    for epoch in range(start, q.epochs + 1):
        loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(ddp, loader, optimizer, max_batches=q.max_train_batches)
        scheduler.step()
        broadcast_buffers(model)
        # Every rank takes the same decision from the epoch number alone.
        observers_frozen, bn_frozen = freeze_state(cfg, epoch)
        apply_freeze(model, observers_frozen, bn_frozen, backend)

        sums = torch.tensor([stats.loss * stats.num_images, stats.top1 * stats.num_images,
                             stats.num_images], dtype=torch.float64)
        seconds = torch.tensor([stats.seconds], dtype=torch.float64)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the epoch lasts as long as the slowest rank
        rng_states = [None] * world_size
        dist.all_gather_object(rng_states, torch.get_rng_state())
        # Every rank holds the same model now: each converts a CPU deep copy and evaluates its
        # shard of val/; the counts add up to a whole-of-val/ evaluation.
        eval_counts = evaluate.count(backend.convert(model, q.engine), val_loader)
        dist.all_reduce(eval_counts, op=dist.ReduceOp.SUM)

        if rank == 0:
            result = evaluate.result_from(eval_counts)
            num_images = int(sums[2])
            row = EpochRow(run_id=job.run_id, variant=job.variant, backend=job.backend,
                           epoch=epoch, world_size=world_size,
                           train_loss=float(sums[0]) / max(num_images, 1),
                           train_top1=float(sums[1]) / max(num_images, 1),
                           eval_top1=result.top1, eval_top5=result.top5,
                           observer_frozen=observers_frozen, bn_frozen=bn_frozen, lr=lr,
                           seconds=float(seconds), images_per_sec=num_images / float(seconds))
            metrics.write_rows(store, "qat_epochs", [row.model_dump()], job.run_id,
                               f"{job.variant}-epoch-{epoch:04d}", date)
            save_checkpoint(store, job.run_id, epoch, model, optimizer, scheduler,
                            observers_frozen, bn_frozen, rng_states, job.backend)
            log.info("%s epoch %d/%d: loss %.4f, train top-1 %.2f, int8 val top-1 %.2f top-5 %s, "
                     "%.0f img/s%s%s", job.variant, epoch, q.epochs, row.train_loss,
                     row.train_top1,
                     row.eval_top1, report.percent(row.eval_top5), row.images_per_sec,
                     ", BN frozen" if bn_frozen else "", ", observers frozen" if observers_frozen else "")
            emit("epoch", **row.model_dump())
        dist.barrier()  # no rank starts the next epoch before the checkpoint exists
    return model


def start_worker(argv: list[str] | None = None) -> QatJob:
    """A worker's setup: read --job, size the thread pools, join the group, set up logging."""
    parser = argparse.ArgumentParser(description="quantlab QAT worker (start it with torchrun)")
    parser.add_argument("--job", required=True, help="path of the QatJob JSON file")
    args = parser.parse_args(argv)
    with open(args.job) as f:
        job = QatJob.model_validate_json(f.read())
    rank, world_size = init_process_group(job.config.qat.threads_per_worker)
    # quantlab's own progress at INFO; libraries (botocore, s3fs, ...) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout,
                        format=f"[rank {rank}/{world_size}] %(message)s", force=True)
    logging.getLogger("quantlab").setLevel(logging.INFO)
    return job


def main(argv: list[str] | None = None) -> int:
    silence_deprecations()
    job = start_worker(argv)
    try:
        train(job)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
