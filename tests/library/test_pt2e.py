"""The PT2E backend (quantlab.pt2e): PTQ to an AOTInductor package that runs with torch alone,
QAT on the exported graph with the freeze schedule, preflight, and DDP around a QAT graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from quantlab import pt2e
from quantlab.backend import get_backend, supports_mixed_precision
from quantlab.config import PTQ_PRESETS
from quantlab.errors import ConfigError
from quantlab.train import train_one_epoch

SIZE = 16


class TinyNet(nn.Module):
    """conv-bn-relu, a residual conv-bn block, pooling, linear: the patterns MobileNets have."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_float(seed: int = 0) -> nn.Module:
    """A TinyNet whose BN statistics come from data (random init alone gives ~zero logits)."""
    torch.manual_seed(seed)
    model = TinyNet().train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, SIZE, SIZE))
    return model.eval()


def batches(num: int, batch_size: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, SIZE, SIZE, generator=g),
             torch.randint(0, 3, (batch_size,), generator=g)) for _ in range(num)]


@torch.inference_mode()
def calibrate(observed, loader) -> None:
    observed.eval()  # what quantlab's calibrate does: the exported graph must accept it
    for images, _ in loader:
        observed(images)


BARE_RUNNER = """
import json, sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.load(sys.argv[2])
out3, out1 = runner(x), runner(x[:1])
torch.save({"out3": out3, "out1": out1}, sys.argv[3])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("quantlab", "torchao"))
print(json.dumps({"leaked": leaked, "metadata": runner.get_metadata()}))
"""


def test_ptq_package_runs_in_a_bare_process(tmp_path):
    backend = get_backend("pt2e", input_size=SIZE)
    assert not supports_mixed_precision(backend) and supports_mixed_precision(get_backend())
    observed = backend.prepare_ptq(tiny_float(), PTQ_PRESETS["ptq-x86"])
    calibrate(observed, batches(2))
    int8 = backend.convert(observed, "x86")
    quantized_ops = {str(n.target) for n in int8.graph.nodes if n.op == "call_function"}
    assert "quantized_decomposed.quantize_per_tensor.default" in quantized_ops
    assert "quantized_decomposed.dequantize_per_channel.default" in quantized_ops  # int8 weights

    data, meta = pt2e.package_bytes(int8, SIZE)
    assert meta["torch"] == torch.__version__ and meta["vec_isa"]
    package, inputs, outputs = (str(tmp_path / n) for n in ("model.pt2", "x.pt", "out.pt"))
    with open(package, "wb") as f:
        f.write(data)
    x = torch.randn(3, 3, SIZE, SIZE)
    torch.save(x, inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", BARE_RUNNER, package, inputs, outputs],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["leaked"] == []
    assert report["metadata"]["torch"] == torch.__version__
    assert report["metadata"]["dynamic_dims"] == "batch"

    got = torch.load(outputs)
    with torch.inference_mode():
        want = int8(x)
    assert got["out3"].shape == (3, 3) and got["out1"].shape == (1, 3)  # dynamic batch
    # The package runs oneDNN int8 kernels, the converted program float ops between q/dq:
    # they agree up to float rounding, far below one output quantization step.
    tolerance = 1e-3 * want.abs().max().item()
    torch.testing.assert_close(got["out3"], want, rtol=0, atol=tolerance)
    torch.testing.assert_close(got["out1"], want[:1], rtol=0, atol=tolerance)
    assert want.abs().max() > 1e-3  # logits that say something


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # control flow on a value: torch.export cannot trace it
            return y.relu()
        return y


def test_preflight_names_the_model_and_the_reason():
    pt2e.preflight("tiny", tiny_float(), PTQ_PRESETS["ptq-x86"], SIZE)  # exportable: passes
    with pytest.raises(ConfigError, match=r"^model data_dependent cannot be exported by "
                                          r"torch.export for backend pt2e \(\w+: .+\)$"):
        pt2e.preflight("data_dependent", DataDependent(), None, SIZE)
    with pytest.raises(ConfigError, match="weight_observer 'minmax' .*valid: per_channel_minmax"):
        pt2e.preflight("tiny", tiny_float(), PTQ_PRESETS["ptq-minmax"], SIZE)
    with pytest.raises(ConfigError, match="engine 'qnnpack' .*valid: x86"):
        pt2e.check_variant(PTQ_PRESETS["ptq-x86"].model_copy(update={"engine": "qnnpack"}))
    with pytest.raises(ConfigError, match="backend pt2e needs the model's input_size"):
        get_backend("pt2e")


def activation_scales(model: nn.Module) -> torch.Tensor:
    return torch.cat([b.detach().flatten().clone() for n, b in model.named_buffers()
                      if n.endswith(".scale")])


def running_means(model: nn.Module) -> torch.Tensor:
    return torch.cat([b.detach().clone() for n, b in model.named_buffers()
                      if n.endswith("running_mean")])


def test_qat_freeze_schedule_on_the_exported_graph():
    """3 epochs; BN frozen after epoch 1, observers after epoch 2 (as QATConfig would say)."""
    freeze_bn_after, freeze_observers_after = 1, 2
    backend = get_backend("pt2e", input_size=SIZE)
    model = backend.prepare_qat(tiny_float().train(), "x86")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = batches(3, batch_size=8, seed=2)
    changed = []  # per epoch: (scales changed, running means changed)
    for epoch in range(1, 4):
        scales, means = activation_scales(model), running_means(model)
        train_one_epoch(model, loader, optimizer)  # calls model.train(), as QAT does
        changed.append((not torch.equal(scales, activation_scales(model)),
                        not torch.equal(means, running_means(model))))
        if epoch >= freeze_bn_after:
            backend.freeze_bn_stats(model)
        if epoch >= freeze_observers_after:
            backend.freeze_observers(model)
        assert all(pt2e.bn_training(model)) == (epoch < freeze_bn_after)
    assert changed == [(True, True), (True, False), (False, False)]
    # The evaluation copy (converting a QAT graph costs ~13 s of CPU whatever the model's size:
    # torchao exports ~100 conv-bn pattern graphs, so once here) leaves the model as it was.
    int8 = backend.convert(model, "x86")
    with torch.inference_mode():
        assert int8(loader[0][0]).shape == (8, 3)
    assert not any(pt2e.bn_training(model)) and pt2e.bn_training(model)
    model.train()
    assert not any(pt2e.bn_training(model))  # frozen BN survives train()


def test_qat_pt2e_on_two_gloo_workers_freezes_when_the_config_says_and_resumes(
        tiny_dataset, tiny_checkpoint, tmp_path):
    """qat-pt2e-x86 the way a run trains it: torchrun, 2 gloo workers, DDP around the exported
    graph, a checkpoint per epoch. 2 epochs, BN frozen after epoch 1 and observers after epoch
    2; then the same run asked for a 3rd epoch resumes from the stored checkpoint."""
    from quantlab import pipeline, qat
    from quantlab.config import QATConfig
    from quantlab.store import Store
    from tests.support import make_config

    schedule = QATConfig(backends=("pt2e",), epochs=2, freeze_bn_after=1,
                         freeze_observers_after=2, lr=1e-2, nproc_per_node=2,
                         threads_per_worker=1, max_restarts=0)
    cfg = make_config(tiny_dataset, tiny_checkpoint, str(tmp_path / "store"),
                      str(tmp_path / "cache"), qat=schedule)
    assert cfg.qat_variants() == [("qat-pt2e-x86", "pt2e")]
    pipeline.preflight(cfg)
    staged, run = pipeline.stage(cfg), pipeline.start_run(cfg)
    lines: list[str] = []
    rows = pipeline.train_qat(cfg, staged, run, on_line=lines.append, backend="pt2e")
    assert [(r["variant"], r["backend"], r["epoch"], r["world_size"], r["bn_frozen"],
             r["observer_frozen"]) for r in rows] == [
        ("qat-pt2e-x86", "pt2e", 1, 2, True, False), ("qat-pt2e-x86", "pt2e", 2, 2, True, True)]
    store = Store(cfg.store)
    first, second = (qat.load_checkpoint(store, run.run_id, e, "pt2e")["model"] for e in (1, 2))
    assert not qat.is_trained(store, run.run_id, 1)  # the eager variant's checkpoints are apart

    def values(state, suffix):
        return [v for k, v in state.items() if k.endswith(suffix)]

    # BN statistics stopped after epoch 1; observers ran through epoch 2 and then stopped;
    # the weights trained on.
    assert values(first, "running_mean") and all(
        torch.equal(a, b) for a, b in zip(values(first, "running_mean"), values(second, "running_mean")))
    assert any(not torch.equal(a, b) for a, b in zip(values(first, ".scale"), values(second, ".scale")))
    assert all(v.item() == 1 for v in values(first, "observer_enabled"))
    assert values(second, "observer_enabled") and all(
        v.item() == 0 for v in values(second, "observer_enabled"))
    assert any(not torch.equal(a, b) for a, b in zip(values(first, "weight"), values(second, "weight")))

    longer = cfg.model_copy(update={"qat": schedule.model_copy(update={"epochs": 3})})
    rows = pipeline.train_qat(longer, staged, run, on_line=lines.append, backend="pt2e")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert any("resuming from the checkpoint of epoch 2" in line for line in lines)
    third = qat.load_checkpoint(store, run.run_id, 3, "pt2e")["model"]
    # restored into a freshly exported graph, frozen again: epoch 3 changed neither
    for suffix in ("running_mean", ".scale"):
        assert all(torch.equal(a, b) for a, b in zip(values(second, suffix), values(third, suffix)))


def test_a_run_with_a_pt2e_variant_fails_in_preflight_where_it_cannot_be_lowered(
        tiny_config, monkeypatch):
    """One line naming the model and the reason, before anything is stored (the CPU cannot be
    changed here, so its check is made to answer as an ARM machine's would)."""
    from quantlab import pipeline

    cfg = tiny_config.model_copy(update={"variants": (*tiny_config.variants,
                                                      PTQ_PRESETS["pt2e-x86"])})
    monkeypatch.setattr(pt2e, "lowering_problem", lambda: "the CPU is aarch64, and "
                        "X86InductorQuantizer lowers to x86 only")
    with pytest.raises(ConfigError, match=r"^model mobilenet_v2: backend pt2e cannot run here: "
                                          r"the CPU is aarch64, and X86InductorQuantizer"):
        pipeline.preflight(cfg)
    assert not os.path.exists(cfg.store) or not os.listdir(cfg.store)
