"""A test-only QAT worker: trains exactly like quantlab.qat, then reports what ranks must agree on.

    launch("tests.library.qat_probe", ["--job", job_json, "--out", result_json], nproc_per_node=2)

After `qat.train` returns, every rank contributes its quantization state (fake-quant scales and
zero points, observer ranges, BN statistics), its freeze flags, and the indices of its data
shard for epoch 1; global rank 0 writes them all to --out as JSON (a list, one item per rank).
"""

from __future__ import annotations

import argparse
import json

import torch.ao.quantization as tq
import torch.distributed as dist
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

from quantlab import qat

RANGE_BUFFERS = ("scale", "zero_point", "min_val", "max_val", "running_mean", "running_var")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    job = qat.start_worker(["--job", args.job])
    try:
        model = qat.train(job)
        loader = qat.train_loader(job)
        loader.sampler.set_epoch(1)
        state = {
            "ranges": {name: b.tolist() for name, b in model.named_buffers()
                       if name.endswith(RANGE_BUFFERS)},
            "observer_enabled": sorted({int(m.observer_enabled[0]) for m in model.modules()
                                        if isinstance(m, tq.FakeQuantizeBase)}),
            "bn_frozen": sorted({bool(m.freeze_bn) for m in model.modules()
                                 if isinstance(m, _ConvBnNd)}),
            "shard": list(loader.sampler),
            "num_images": len(loader.dataset),
        }
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(states, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
