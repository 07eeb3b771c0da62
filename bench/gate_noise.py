"""How often would noise alone fail the regression gate? Time one artifact against itself.

The gate times the previous best and the new model side by side at the serving batch size
(`quantlab.timing.compare`: measured again, up to `gate.latency_attempts`, default 3, while it
looks slower than allowed or noisy; the median kept) and fails only if that median ratio
exceeds 1 + `gate.max_latency_increase` (default 1.10) by more than twice its noise
(`quantlab.gate.judge`). Timing a model
against a byte-identical copy of itself shows how often noise alone crosses the threshold on
this machine, with one attempt and with the default three, and what the noise measure says:
how often the measurement is flagged noisy (bench.NOISE_THRESHOLD, TAIL_THRESHOLD) and how
often `faster_beyond_noise` would call one of the two identical models faster. Both copies
are timed from files in a fresh torch-only process, as the gate times them.

    python bench/gate_noise.py --store ./quantlab-store [--ref best] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from quantlab import registry
from quantlab.timing import NOISE_MULTIPLE, capacity, compare, faster_beyond_noise, noise_of
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
    with tempfile.TemporaryDirectory(prefix="quantlab-gate-noise-") as tmp:
        paths = []
        for name in ("a", "b"):
            paths.append(os.path.join(tmp, f"{name}.pt"))
            with open(paths[-1], "wb") as f:
                f.write(payload)
        print(f"start: {capacity().describe()}")
        for attempts in (1, 3):
            ratios, used, noise, flagged, wrong, failed = [], [], [], 0, 0, 0
            for _ in range(args.repeats):
                old, new, n = compare(*paths, manifest.input_size, args.max_ratio, attempts,
                                      args.threads, args.warmup, args.iterations,
                                      engines={"reference": engine, "candidate": engine})
                ratios.append(new.latency_ms / old.latency_ms)
                failed += (ratios[-1] / args.max_ratio - 1  # gate.judge's rule
                           > NOISE_MULTIPLE * noise_of(old, new))
                used.append(n)
                noise += [old.noise, new.noise]
                flagged += old.noisy or new.noisy
                wrong += faster_beyond_noise(old, new) or faster_beyond_noise(new, old)
            print(f"{manifest.run_id}/{manifest.selected.variant}, batch 1, {args.threads} "
                  f"threads asked ({old.num_threads} used), {args.iterations} iterations, up to "
                  f"{attempts} attempt(s), {args.repeats} gates: identical models' ratio median "
                  f"{statistics.median(ratios):.3f}, min {min(ratios):.3f}, max "
                  f"{max(ratios):.3f}; false failures {failed}"
                  f"/{len(ratios)} ({sum(used)} measurements); noise median "
                  f"{statistics.median(noise):.1%}, max {max(noise):.1%}; flagged noisy "
                  f"{flagged}/{len(ratios)}; called faster beyond the noise {wrong}/{len(ratios)}")
        print(f"end: load average {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
