"""The regression gate: may this run's selected model replace `best-<model>`?

    verdict = regression_gate(cfg, store, staged, run_id, selected_artifact, runtime, top1)
    verdict.passed                      # False: the run is recorded as rejected, `best` stays

Numbers from different runs are never compared: the previous best is evaluated on this run's
val/ and timed side by side with the candidate, here and now (`judge` is the rule).
"""

from __future__ import annotations

import tempfile

from quantlab import data, formats, registry
from quantlab.timing import NOISE_MULTIPLE, TimedFile, compare, noise_of
from quantlab.config import RunConfig
from quantlab.data import StagedData
from quantlab.evaluate import result_of_logits
from quantlab.registry import ArtifactEntry, GateVerdict, Selection
from quantlab.store import Store


def regression_gate(cfg: RunConfig, store: Store, staged: StagedData, run_id: str,
                    candidate: ArtifactEntry, candidate_runtime: str,
                    candidate_top1: float) -> GateVerdict | None:
    """The verdict on `candidate` (this run's selected artifact, in the runtime it was
    selected in); None when the gate is disabled.

    Stored accuracies may come from another dataset or evaluation setting, stored latencies
    from another machine or load. So the previous best's artifact (sha256-verified) is
    evaluated on this run's val/ in the runtime it was selected in and timed at the serving
    batch size side by side with the candidate (each in its runtime), interleaved, measured
    again (up to `gate.latency_attempts` in all) while it looks slower than allowed or noisy;
    the median ratio fails only beyond its noise (`judge`). If the previous best was made for
    other classes or another input size, the two models do not solve the same task: the gate
    passes, saying so.
    """
    if not cfg.gate.enabled:
        return None
    alias = f"best-{cfg.model.name}"
    limits = dict(max_accuracy_drop=cfg.max_accuracy_drop,
                  max_latency_increase=cfg.gate.max_latency_increase)
    if not store.exists(f"aliases/{alias}.json"):
        return GateVerdict(passed=True, reason=f"no previous {alias}: this run's model is the "
                           "first", **limits)
    pointer = registry.read_alias(store, alias)
    previous = registry.load_manifest(store, pointer.run_id)
    entry = previous.artifact(pointer.variant or "best", previous.selected.format)
    previous_runtime = selected_runtime(previous.selected, entry)
    if (previous.dataset.classes != staged.classes
            or previous.input_size != cfg.data.transforms.input_size):
        return GateVerdict(passed=True, previous_run_id=previous.run_id,
                           previous_variant=entry.variant, same_dataset=False, **limits,
                           reason=f"not compared with {alias} ({previous.run_id}/"
                                  f"{entry.variant}): it was made for other "
                                  "classes or another input size, so it does not solve the same "
                                  "task")
    b = cfg.timing
    with tempfile.TemporaryDirectory(prefix="quantlab-gate-") as tmp:
        paths = registry.verified_copies(store, {"reference": (previous.run_id, entry),
                                                 "candidate": (run_id, candidate)}, tmp)
        logits, labels = formats.predict(paths["reference"], previous_runtime,
                                         data.loader(staged, cfg.data, "val", train=False),
                                         b.num_threads, cfg.data.max_eval_batches)
        previous_top1 = result_of_logits(logits, labels).top1
        old, now, attempts = compare(TimedFile(path=paths["reference"], runtime=previous_runtime),
                                     TimedFile(path=paths["candidate"], runtime=candidate_runtime),
                                     cfg.data.transforms.input_size,
                                     1.0 + cfg.gate.max_latency_increase,
                                     cfg.gate.latency_attempts, b.num_threads, b.warmup,
                                     b.iterations, batch_size=b.serving_batch_size)
    return judge(candidate_top1, now.latency_ms, previous_top1, old.latency_ms,
                 previous_run_id=previous.run_id, previous_variant=entry.variant,
                 same_dataset=previous.dataset.fingerprint == staged.fingerprint,
                 latency_attempts=attempts, latency_noise=noise_of(old, now),
                 batch_size=b.serving_batch_size, **limits)


def selected_runtime(selected: Selection, entry: ArtifactEntry) -> str:
    """The runtime a run's selected artifact runs in (runs from before runtimes were recorded
    say "torch": their int8 TorchScript runs under its own engine)."""
    if selected.runtime == "torch" and entry.engine:
        return f"torch-{entry.engine}"
    return selected.runtime


def judge(top1: float, latency_ms: float, previous_top1: float, previous_latency_ms: float, *,
          previous_run_id: str, previous_variant: str, same_dataset: bool,
          max_accuracy_drop: float, max_latency_increase: float,
          latency_attempts: int = 1, latency_noise: float = 0.0,
          batch_size: int = 1) -> GateVerdict:
    """The regression gate's rule: fail if top-1 fell more than `max_accuracy_drop` points
    below the previous best, or the (median) latency ratio exceeds 1 + `max_latency_increase`
    beyond `latency_noise`, the measured noise of that ratio (by more than NOISE_MULTIPLE x it,
    as a selection's "faster"): a rise the timing cannot tell from noise is no evidence of a
    regression. Both pairs of numbers must come from the
    same data and the same machine.
    """
    drop = previous_top1 - top1
    ratio = latency_ms / previous_latency_ms
    allowed = 1.0 + max_latency_increase
    noise = f"noise ±{latency_noise:.0%}, median of {latency_attempts} measurement(s)"
    problems = []
    if drop > max_accuracy_drop:
        problems.append(f"top-1 {top1:.2f} is {drop:.2f} points below the previous best's "
                        f"{previous_top1:.2f} (allowed: {max_accuracy_drop:g})")
    if ratio / allowed - 1.0 > NOISE_MULTIPLE * latency_noise:
        problems.append(f"batch-{batch_size} latency {latency_ms:.3f} ms is {ratio:.2f}x the "
                        f"previous best's {previous_latency_ms:.3f} ms (allowed: {allowed:.2f}x; "
                        f"{noise})")
    data = ("same dataset" if same_dataset else
            "the dataset changed since (other fingerprint); both evaluated on this run's val/")
    where = (f"previous best {previous_run_id}/{previous_variant}, measured side by side in "
             f"this run ({data})")
    if problems:
        reason = "regression against the " + where + ": " + "; ".join(problems)
    else:
        within = " (above the allowed ratio, but within the noise)" if ratio > allowed else ""
        reason = (f"no regression against the {where}: top-1 {top1:.2f} vs {previous_top1:.2f}, "
                  f"batch-{batch_size} latency {ratio:.2f}x ({noise}){within}")
    return GateVerdict(passed=not problems, reason=reason, previous_run_id=previous_run_id,
                       previous_variant=previous_variant, same_dataset=same_dataset,
                       previous_top1=previous_top1, top1=top1,
                       previous_latency_ms=previous_latency_ms, latency_ms=latency_ms,
                       latency_attempts=latency_attempts, latency_noise=latency_noise,
                       batch_size=batch_size, max_accuracy_drop=max_accuracy_drop,
                       max_latency_increase=max_latency_increase)
