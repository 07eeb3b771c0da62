"""Fashion-MNIST: what PTQ costs on an ordinarily trained model, and what the PTQ algorithms
(cross-layer equalization, bias correction, percentile calibration) win back, without training.

    apt-get install dataset-fashion-mnist           # or pass --source DIR with the four idx files
    python bench/fashion_mnist.py [--store DIR] [--source DIR] [--variants a,b,...]

1. Seeds the store with Fashion-MNIST as an ImageFolder (quantlab.data.seed_fashion_mnist:
   train/ = its 60,000 training images, val/ = its 10,000 test images), unless it is there.
2. Trains the demo's float baseline once (quantlab.demo.FASHION_MNIST: torchvision's quantizable
   MobileNetV2 at width 1.0, 28 px padded to 32, SGD + one-cycle to lr 0.1 in batches of 128,
   weight decay 4e-5, flips, 3 epochs on 30,000 training images; an ordinary recipe, not tuned
   for quantization), or reuses it.
3. For each variant, as the pipeline's PTQ step does it (quantlab.backend): prepare (fuse, CLE
   if asked, observers), calibrate on 32 batches of 32 training images (eval transforms),
   convert, apply_after_convert (bias correction if asked); then evaluate on the 10,000 test
   images (quantlab.evaluate).
4. Prints one markdown table: top-1, drop from float in points, the seconds to quantize and to
   evaluate, and the total wall time, with the CPU's int8 flags and the load average (the times
   are of a shared machine: the accuracies are not affected).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from quantlab import data, demo, models
from quantlab._deprecations import silence_deprecations
from quantlab.backend import get_backend
from quantlab.config import PTQ_PRESETS
from quantlab.evaluate import evaluate
from quantlab.report import markdown_table
from quantlab.store import Store

# The presets, and two ablations of ptq-minmax-cle-bc: each algorithm alone.
ABLATIONS = {
    "ptq-minmax-cle": PTQ_PRESETS["ptq-minmax"].model_copy(
        update={"name": "ptq-minmax-cle", "cross_layer_equalization": True}),
    "ptq-minmax-bc": PTQ_PRESETS["ptq-minmax"].model_copy(
        update={"name": "ptq-minmax-bc", "bias_correction": True}),
}
VARIANTS = {**PTQ_PRESETS, **ABLATIONS}
DEFAULT = ("ptq-minmax,ptq-minmax-cle-bc,ptq-x86,ptq-x86-cle-bc,ptq-x86-percentile,"
           "ptq-minmax-cle,ptq-minmax-bc")
NUM_CALIBRATION_BATCHES = 32  # of data.batch_size (32) images: the tutorial's calibration

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--store", default="./quantlab-store", help="where the dataset and baseline live")
parser.add_argument("--source", default=data.FASHION_MNIST_DIR, help="folder of the four idx files")
parser.add_argument("--cache-dir", default="~/.cache/quantlab")
parser.add_argument("--variants", default=DEFAULT, help=f"comma-separated; of {', '.join(VARIANTS)}")
args = parser.parse_args()
names = args.variants.split(",")
unknown = [n for n in names if n not in VARIANTS]
if unknown:
    parser.error(f"unknown variants {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
silence_deprecations()
start = time.perf_counter()
recipe = demo.FASHION_MNIST
store = Store(args.store)

# 1-2. the dataset and the float baseline
data_uri, seeded = demo.seed(store, recipe.dataset, args.source)
print(f"{'seeded' if seeded else 'reusing'} {data_uri}", flush=True)
train_start = time.perf_counter()
checkpoint, trained = demo.train_baseline(
    store, data_uri, args.cache_dir, recipe=recipe,
    on_epoch=lambda e, s, top1: print(f"baseline epoch {e}: loss {s.loss:.3f}, "
                                      f"val top-1 {top1:.2f} ({s.seconds:.0f}s)", flush=True))
train_seconds = time.perf_counter() - train_start
print(f"{'trained' if trained else 'reusing'} {checkpoint}", flush=True)
cfg = demo.demo_config(args.store, data_uri, checkpoint, recipe=recipe)
staged = data.stage(data_uri, args.cache_dir)
val = data.loader(staged, cfg.data, "val", train=False)
calibration = data.loader(staged, cfg.data, "train", train=False, batch_size=cfg.data.batch_size,
                          max_images=NUM_CALIBRATION_BATCHES * cfg.data.batch_size, seed=cfg.seed)
float_model = models.load_float_model(cfg.model.name, len(staged.classes), checkpoint,
                                      **cfg.model.kwargs)
t = time.perf_counter()
float_top1 = evaluate(float_model, val).top1
rows = [{"variant": "float", "algorithms": "", "top-1": f"{float_top1:.2f}", "drop": "",
         "quantize s": "", "evaluate s": f"{time.perf_counter() - t:.0f}"}]
print(f"float: {float_top1:.2f} on {staged.num_val} images", flush=True)

# 3. the PTQ variants
backend = get_backend()
for name in names:
    variant = VARIANTS[name]
    t = time.perf_counter()
    fused = copy.deepcopy(float_model)
    observed = backend.prepare_ptq(fused, variant)      # fuses (and equalizes) `fused` in place
    with torch.inference_mode():
        for images, _ in calibration:
            observed(images)
    int8 = backend.apply_after_convert(fused, backend.convert(observed, variant.engine),
                                       variant, calibration)
    quantize_seconds = time.perf_counter() - t
    t = time.perf_counter()
    top1 = evaluate(int8, val).top1
    rows.append({"variant": name, "algorithms": variant.algorithms, "top-1": f"{top1:.2f}",
                 "drop": f"{float_top1 - top1:+.2f}", "quantize s": f"{quantize_seconds:.0f}",
                 "evaluate s": f"{time.perf_counter() - t:.0f}"})
    print(f"{name}: {top1:.2f} ({float_top1 - top1:+.2f})", flush=True)

# 4. the table
with open("/proc/cpuinfo") as f:  # Linux
    cpu_words = set(f.read().split())
int8_flags = [flag for flag in ("avx2", "avx512_vnni", "amx_int8") if flag in cpu_words]
print()
print(markdown_table(rows))
print(f"\nFashion-MNIST, {staged.num_val} test images; baseline "
      f"{'trained in ' + format(train_seconds, '.0f') + ' s' if trained else 'reused'}; "
      f"wall time {time.perf_counter() - start:.0f} s; torch threads {torch.get_num_threads()}, "
      f"CPU flags {', '.join(int8_flags) or 'none of avx2/avx512_vnni/amx_int8'}, "
      f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
