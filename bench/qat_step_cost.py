"""The cost of a QAT training step against a float training step (target: <= 1.6x).

    python bench/qat_step_cost.py [--input-size 224] [--batch-size 8] [--threads 1]

MobileNetV2 (torchvision's quantizable one, width 1.0, 1000 classes: the tutorial's model) at
224x224, batch 8, one thread (what each QAT worker gets by default), random weights and inputs
(the cost does not depend on the values). The float model is trained as a float model is
(unfused, train mode); the QAT model is what quantlab's workers train: fused Conv+BN(+ReLU)
with fake quantization on weights and activations (prepare_qat, engine x86), timed as in the
first epochs (BN statistics and observers updating) and, as a third contender, as in the last
ones (both frozen). All take full SGD steps (forward, loss, backward, optimizer) through
quantlab.train.train_one_epoch, in interleaved rounds (float, QAT, frozen QAT, then the
reverse, ...) after a warm-up round, so drift hits all alike.
Figure: median QAT step time / median float step time, measured in one run.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import torch

from quantlab import models
from quantlab.backend import get_backend
from quantlab.timing import cpu_info, threads
from quantlab.train import train_one_epoch


def measure(input_size: int = 224, batch_size: int = 8, num_threads: int = 1, rounds: int = 6,
            steps_per_round: int = 3, num_classes: int = 1000) -> dict:
    """Median seconds per training step of the float and the QAT model, and their ratio."""
    torch.manual_seed(0)
    backend = get_backend()
    float_model = models.build("mobilenet_v2", num_classes=num_classes).train()
    qat_model, frozen_model = (backend.prepare_qat(models.build("mobilenet_v2", num_classes=num_classes),
                                                   "x86") for _ in range(2))
    backend.freeze_bn_stats(frozen_model)  # the schedule's last epochs
    backend.freeze_observers(frozen_model)
    batches = [(torch.randn(batch_size, 3, input_size, input_size),
                torch.randint(0, num_classes, (batch_size,))) for _ in range(steps_per_round)]
    contenders = {name: (model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9))
                  for name, model in (("float", float_model), ("qat", qat_model),
                                      ("qat_frozen", frozen_model))}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    with threads(num_threads):
        for r in range(rounds + 1):  # round 0 warms up (allocator, packing, observers)
            order = list(contenders) if r % 2 else list(reversed(contenders))
            for name in order:
                model, optimizer = contenders[name]
                stats = train_one_epoch(model, batches, optimizer)
                if r:
                    seconds[name].append(stats.seconds / stats.num_images * batch_size)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    return {"float_step_s": median["float"], "qat_step_s": median["qat"],
            "qat_frozen_step_s": median["qat_frozen"], "ratio": median["qat"] / median["float"],
            "ratio_frozen": median["qat_frozen"] / median["float"], "input_size": input_size,
            "batch_size": batch_size, "num_threads": num_threads,
            "num_steps": rounds * steps_per_round, "cpu": cpu_info()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    r = measure(args.input_size, args.batch_size, args.threads, args.rounds)
    print(f"MobileNetV2 {r['input_size']}x{r['input_size']}, batch {r['batch_size']}, "
          f"{r['num_threads']} thread(s), {r['num_steps']} steps each, {r['cpu']}")
    print(f"float training step: {r['float_step_s'] * 1000:.0f} ms (median)")
    print(f"QAT training step:   {r['qat_step_s'] * 1000:.0f} ms (median; BN and observers "
          f"updating), {r['qat_frozen_step_s'] * 1000:.0f} ms once both are frozen")
    print(f"QAT step / float step: {r['ratio']:.2f}x  (target <= 1.6x); "
          f"{r['ratio_frozen']:.2f}x once BN and observers are frozen")
    print("reproduce: python "
          + shlex.join(["bench/qat_step_cost.py", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
