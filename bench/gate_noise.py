"""How often would noise alone fail the regression gate? Time one artifact against itself.

The gate times the previous best and the new model side by side at batch 1
(`quantlab.bench.compare`) and fails above 1 + `gate.max_latency_increase` (default 1.10)
only if every one of `gate.latency_attempts` (default 3) measurements says so. Timing a model
against a byte-identical copy of itself shows how often noise alone crosses the threshold on
this machine, with one attempt and with the default three.

    flock /work/bench.lock python bench/gate_noise.py --store ./quantlab-store [--ref best] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics

from quantlab import export, registry
from quantlab.bench import compare
from quantlab.store import Store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="./quantlab-store")
    p.add_argument("--ref", default="best", help="run id or alias whose selected model is timed")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--iterations", type=int, default=200, help="the demo's bench.iterations")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-ratio", type=float, default=1.10)
    args = p.parse_args()
    store = Store(args.store)
    manifest = registry.load_manifest(store, registry.resolve(store, args.ref))
    payload = registry.read_artifact(store, manifest, "best")
    engine = manifest.artifact("best").engine
    a, b = export.load(payload, engine), export.load(payload, engine)
    for attempts in (1, 3):
        ratios, used = [], []
        for _ in range(args.repeats):
            old, new, n = compare(a, b, manifest.input_size, args.max_ratio, attempts,
                                  args.threads, args.warmup, args.iterations)
            ratios.append(new.latency_ms / old.latency_ms)
            used.append(n)
        print(f"{manifest.run_id}/{manifest.selected.variant}, batch 1, {args.threads} threads, "
              f"{args.iterations} iterations, up to {attempts} attempt(s), {args.repeats} gates: "
              f"identical models' ratio median {statistics.median(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}; false failures "
              f"{sum(r > args.max_ratio for r in ratios)}/{len(ratios)} "
              f"({sum(used)} measurements)")


if __name__ == "__main__":
    main()
