"""The timing loop of every latency figure, and the torch-only process that runs it on files.

    rounds = time_rounds(modules, inputs, warmup=10, iterations=50)   # in this process
    python -P -W ignore quantlab/_timer.py < spec.json     # what timing.measure_files runs

This module imports only torch and the standard library, so that the process which times the
models is a plain torch process (the child reports that quantlab was not imported and how many
Python threads ran). A model with a `runtime` other than torch (ONNX Runtime, OpenVINO) is
loaded through quantlab/runtimes.py, read by its file path (not as part of quantlab), and
timed in the same interleaved rounds on the same input as a numpy array. In the child, every (thread count, batch size) setting sets the thread
count first and then loads every model afresh from its file: a quantized model's packed
weights cache the oneDNN primitive of their first call, built for that call's thread count and
input shape, and later calls at another thread count or batch size run that primitive about
2x slower (measured: MobileNetV2 int8 at 96 px, 2 threads, 1.58 ms after 1-thread calls
against 0.59 ms when loaded and first run at 2 threads; batch 8 after batch 1, 2.4-2.8 ms
against 1.6 ms). Timing every setting on the same loaded modules is what made `quantlab bench`
report int8 at 2 threads slower than at 1.

Models are timed in interleaved rounds of `block` calls each (A B C A B C ..., who goes first
rotates), so that drift in the machine hits all of them alike; the samples come back per round.
There are always at least MIN_ROUNDS rounds (fewer calls per round for a short timing).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Mapping

import torch

BLOCK = 5   # consecutive timed calls of one model before the next model's turn
MIN_ROUNDS = 3  # interleaved rounds at least: noise is the spread of per-round medians, and
                # one or two rounds have no spread to speak of (a 5-call timing read noise 0)
REWARM = 1  # untimed calls that start each turn (caches warm again, as in a serving process)


def time_rounds(modules: Mapping[str, Callable], inputs: Mapping[str, torch.Tensor], warmup: int,
                iterations: int, block: int = BLOCK,
                engines: Mapping[str, str | None] | None = None,
                rewarm: int = REWARM) -> dict[str, list[list[float]]]:
    """Per model, the seconds of each timed call, grouped by interleaved round.

    `engines` names the quantized engine set while a model runs (int8 models). Call it under
    the thread count wanted and torch.inference_mode().
    """
    engines = engines or {}
    # fewer calls per round rather than fewer than MIN_ROUNDS rounds (5 calls: 5 rounds of 1)
    per_round = max(1, min(block, iterations // MIN_ROUNDS))
    num_rounds = max(MIN_ROUNDS, round(iterations / per_round))
    names = list(modules)

    def use_engine(name: str) -> None:
        if engines.get(name):
            torch.backends.quantized.engine = engines[name]

    for name in names:
        use_engine(name)
        for _ in range(warmup):
            modules[name](inputs[name])
    rounds: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(num_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            m, x = modules[name], inputs[name]
            use_engine(name)
            for _ in range(rewarm):  # untimed: the previous model's turn evicted this one's cache
                m(x)
            samples = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                m(x)
                samples.append(time.perf_counter() - t0)
            rounds[name].append(samples)
    return rounds


def _runtimes():
    """quantlab/runtimes.py as a stand-alone module (it imports nothing from quantlab)."""
    import importlib.util
    import os

    if "_quantlab_runtimes" not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtimes.py")
        spec = importlib.util.spec_from_file_location("_quantlab_runtimes", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["_quantlab_runtimes"] = module
    return sys.modules["_quantlab_runtimes"]


def _in_torch(model: dict) -> bool:
    """Whether a model of the spec runs in torch (TorchScript) rather than another runtime."""
    return (model.get("runtime") or "torch").startswith("torch")


def _load(model: dict) -> Callable:
    if not _in_torch(model):
        return _runtimes().get_runtime(model["runtime"]).load(model["path"],
                                                              torch.get_num_threads()).run
    if model.get("engine"):
        torch.backends.quantized.engine = model["engine"]
    module = torch.jit.load(model["path"], map_location="cpu").eval()
    if model.get("optimize_for_inference"):  # cannot be saved in that form (export.py)
        module = torch.jit.optimize_for_inference(module)
    return module


def main() -> None:
    """A spec on stdin; per setting the rounds of every model, as one JSON line on stdout.

    spec: {"models": {name: {"path", "engine", "channels_last", "optimize_for_inference",
                             "runtime"}},
           "settings": [[num_threads, batch_size], ...], "input_size", "channels", "warmup",
           "iterations", "block"}
    """
    spec = json.loads(sys.stdin.read())
    models = spec["models"]
    out = []
    for num_threads, batch_size in spec["settings"]:
        torch.set_num_threads(num_threads)  # before loading and before any call
        modules = {name: _load(m) for name, m in models.items()}
        x = torch.randn(batch_size, spec["channels"], spec["input_size"], spec["input_size"])
        inputs = {name: x.numpy() if not _in_torch(m)
                  else x.contiguous(memory_format=torch.channels_last)
                  if m.get("channels_last") else x for name, m in models.items()}
        engines = {name: m.get("engine") for name, m in models.items()}
        with torch.inference_mode():
            rounds = time_rounds(modules, inputs, spec["warmup"], spec["iterations"],
                                 spec["block"], engines)
        out.append({"num_threads": torch.get_num_threads(), "batch_size": batch_size,
                    "rounds": rounds})
        del modules
    print(json.dumps({"settings": out, "python_threads": threading.active_count(),
                      "quantlab_imported": any(m.split(".")[0] == "quantlab"
                                               for m in sys.modules)}))


if __name__ == "__main__":
    main()
