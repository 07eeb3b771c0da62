"""QAT throughput: 2 gloo workers x 1 thread against 1 worker x 2 threads (target: >= 1.3x).

    python bench/qat_scaling.py [--input-size 112] [--global-batch 32] [--rounds 2]

Runs quantlab's real QAT stage (pipeline.train_qat: torchrun, gloo workers, DDP, fake
quantization, per-epoch int8 evaluation, checkpoints) on MobileNetV2 (width 1.0, random
weights: throughput does not depend on them) over a synthetic ImageFolder of 160x160 JPEGs in
10 classes (decoded and augmented by the real loaders, RandomResizedCrop to 112x112). Both
settings use the whole machine's 2 cores and the same effective batch (32: one worker of 32,
or two of 16), so they train the same way and differ only in how the cores are used. The
figure is `images_per_sec` from the `qat_epochs` rows (images trained by all ranks / the
slowest rank's training time; epoch 1 is warm-up and not counted), median per setting, in
interleaved rounds (1x2, 2x1, then 2x1, 1x2, ...) so drift hits both alike.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import statistics
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from quantlab import models, pipeline
from quantlab.timing import cpu_info
from quantlab.config import DataConfig, ModelConfig, QATConfig, RunConfig, TransformConfig

NUM_CLASSES = 10
SETTINGS = {"1x2": (1, 2), "2x1": (2, 1)}  # name: (world size, threads per worker)


def write_dataset(root: str, num_train: int, num_val: int, side: int = 160) -> None:
    """A synthetic ImageFolder of random JPEGs (decoding cost like real photos of that size)."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", num_train // NUM_CLASSES), ("val", num_val // NUM_CLASSES)):
        for c in range(NUM_CLASSES):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                    buf, format="JPEG", quality=90)
                with open(os.path.join(folder, f"{i:04d}.jpg"), "wb") as f:
                    f.write(buf.getvalue())


def measure(input_size: int = 112, global_batch: int = 32, num_batches: int = 6, epochs: int = 3,
            rounds: int = 2) -> dict:
    """images/s of each setting (median over rounds of the per-epoch figures) and the ratio."""
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-qat-") as tmp:
        data_dir = os.path.join(tmp, "data")
        # Enough for num_batches per epoch in either setting (the sampler splits the set).
        write_dataset(data_dir, num_train=round(global_batch * num_batches * 1.25),
                      num_val=5 * NUM_CLASSES)
        checkpoint = os.path.join(tmp, "float.pth")
        torch.manual_seed(0)
        torch.save(models.build("mobilenet_v2", num_classes=NUM_CLASSES).state_dict(), checkpoint)
        per_epoch: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for r in range(rounds):
            for name in (list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))):
                world_size, num_threads = SETTINGS[name]
                cfg = RunConfig(
                    model=ModelConfig(name="mobilenet_v2", checkpoint=checkpoint),
                    data=DataConfig(uri=data_dir, batch_size=global_batch // world_size,
                                    eval_batch_size=25, max_eval_batches=1,
                                    transforms=TransformConfig(input_size=input_size)),
                    store=os.path.join(tmp, "store"), cache_dir=os.path.join(tmp, "cache"),
                    variants=[], run_id=f"scaling-{name}-{r}",
                    qat=QATConfig(epochs=epochs, freeze_bn_after=epochs, freeze_observers_after=epochs,
                                  max_train_batches=num_batches, nproc_per_node=world_size,
                                  threads_per_worker=num_threads, max_restarts=0))
                pipeline.preflight(cfg)
                run = pipeline.start_run(cfg)
                rows = pipeline.train_qat(cfg, pipeline.stage(cfg), run, on_line=lambda line: None)
                assert [row["world_size"] for row in rows] == [world_size] * epochs
                rate = [row["images_per_sec"] for row in rows if row["epoch"] > 1]
                per_epoch[name] += rate
                print(f"  round {r + 1}, {name}: " + ", ".join(f"{x:.1f}" for x in rate) + " img/s",
                      flush=True)
    median = {name: statistics.median(v) for name, v in per_epoch.items()}
    return {"images_per_sec": median, "ratio": median["2x1"] / median["1x2"],
            "input_size": input_size, "global_batch": global_batch, "cpu": cpu_info()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--global-batch", type=int, default=32, help="effective batch, even")
    parser.add_argument("--batches", type=int, default=6, help="optimizer steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"MobileNetV2 QAT, {args.input_size}x{args.input_size}, effective batch "
          f"{args.global_batch}, {cpu_info()}, {os.cpu_count()} cores")
    r = measure(args.input_size, args.global_batch, args.batches, args.epochs, args.rounds)
    ips = r["images_per_sec"]
    print(f"world size 1 x 2 threads: {ips['1x2']:.1f} img/s (median)")
    print(f"world size 2 x 1 thread:  {ips['2x1']:.1f} img/s (median)")
    print(f"2x1 / 1x2: {r['ratio']:.2f}x  (target >= 1.3x)")
    print("reproduce: python "
          + shlex.join(["bench/qat_scaling.py", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
