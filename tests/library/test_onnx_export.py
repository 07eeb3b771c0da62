"""ONNX (QDQ) and OpenVINO exports of int8 variants: they run without quantlab or torch and
compute what the TorchScript int8 artifact computes; a diverging export is detected."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from quantlab import data, export, formats, models, onnx_export, runtimes
from quantlab.backend import get_backend
from quantlab.config import PTQ_PRESETS, DataConfig
from quantlab.errors import ConfigError
from quantlab.timing import TimedFile, measure_files
from quantlab.train import train_one_epoch
from tests.support import TINY_TRANSFORMS

ENGINE = "x86"


@pytest.fixture(scope="module")
def tiny(tiny_dataset, tiny_checkpoint, tmp_path_factory):
    """The trained tiny float model, its calibration and val loaders, and the val images."""
    staged = data.stage(tiny_dataset, str(tmp_path_factory.mktemp("cache")))
    cfg = DataConfig(uri=tiny_dataset, batch_size=8, eval_batch_size=8, transforms=TINY_TRANSFORMS)
    model = models.build("mobilenet_v2", 3, width_mult=0.25)
    with open(tiny_checkpoint, "rb") as f:
        models.load_float_weights(model, f.read(), tiny_checkpoint, "mobilenet_v2")
    val = list(data.loader(staged, cfg, "val", train=False))
    calibration = list(data.loader(staged, cfg, "train", train=False, max_images=16, seed=0))
    train = data.loader(staged, cfg, "train", train=True)
    return model.eval(), calibration, val, train


def _ptq(model, calibration, float_layers=()):
    backend = get_backend()
    observed = backend.prepare_ptq(copy.deepcopy(model), PTQ_PRESETS["ptq-x86"], float_layers)
    with torch.inference_mode():
        for images, _ in calibration:
            observed(images)
    return backend.convert(observed, ENGINE)


def _qat(model, train):
    backend = get_backend()
    qat_model = backend.prepare_qat(copy.deepcopy(model).train(), ENGINE)
    optimizer = torch.optim.SGD(qat_model.parameters(), lr=1e-3)
    train_one_epoch(qat_model, train, optimizer)
    backend.freeze_observers(qat_model)
    backend.freeze_bn_stats(qat_model)
    return backend.convert(qat_model.eval(), ENGINE)


def _write(folder, int8, float_model) -> dict[str, str]:
    files = {"model.torchscript.pt": export.artifact_bytes(int8, ENGINE),
             **formats.export_int8(int8, ENGINE, 32),
             "float.pt": export.artifact_bytes(models.fuse(copy.deepcopy(float_model), False))}
    onnx_export.write_files(files, str(folder))
    return {name: str(folder / name) for name in files}


def _predict_in_child(path: str, runtime: str, images_path: str, tmp_path) -> tuple[np.ndarray, list]:
    """Logits from runtimes.py run as a script: a process that never imports quantlab."""
    out = str(tmp_path / f"logits-{runtime}.npy")
    spec = {"path": path, "runtime": runtime, "num_threads": 1, "inputs": images_path,
            "output": out}
    proc = subprocess.run([sys.executable, "-W", "ignore", runtimes.__file__, "predict"],
                          input=json.dumps(spec), capture_output=True, text=True,
                          cwd=str(tmp_path), env={k: v for k, v in os.environ.items()
                                                  if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(out), json.loads(proc.stdout.strip().splitlines()[-1])["modules"]


@pytest.mark.parametrize("method", ["ptq-per-channel", "qat"])
def test_export_runs_without_quantlab_or_torch_and_agrees(method, tiny, tmp_path):
    model, calibration, val, train = tiny
    int8 = _ptq(model, calibration) if method == "ptq-per-channel" else _qat(model, train)
    paths = _write(tmp_path, int8, model)
    images, labels = formats.as_numpy(val)
    np.save(tmp_path / "images.npy", images)
    reference, _ = formats.predict(paths["model.torchscript.pt"], f"torch-{ENGINE}", val)
    float_logits, _ = formats.predict(paths["float.pt"], "torch", val)
    graph = onnx.load(paths["model.onnx"]).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    int8_weights = [i for i in graph.initializer
                    if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == sum(n.op_type in ("Conv", "Gemm") for n in graph.node)
    _graph_computes_the_torchscript_logits(paths["model.onnx"], images, reference)
    if method == "ptq-per-channel":  # per-channel weight scales: one per output channel
        scales = {n.input[1] for n in graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] in {w.name for w in int8_weights}}
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        assert all(inits[s].ndim == 1 and inits[s].size > 1 for s in scales)
    for file, runtime in (("model.onnx", "onnxruntime"), ("model.xml", "openvino")):
        logits, modules = _predict_in_child(paths[file], runtime, str(tmp_path / "images.npy"),
                                            tmp_path)
        assert modules == [runtime], modules  # neither quantlab nor torch was imported
        eq = formats.compare_logits(logits, labels, float_logits, reference, runtime)
        # The runtimes' int8 kernels round differently from fbgemm's (int32 biases, their own
        # requantization): on these 24 images of a barely separable tiny model (the QAT one
        # at ~54% top-1), OpenVINO flipped up to 4 near-tie predictions. What the graph
        # computes is checked exactly above; the run's rule (98% of val/) is the pipeline's.
        assert eq.agreement >= 75 and eq.num_images == 24, eq.reason
        # Its logits (3 classes, output step ~0.06) are the artifact's to a few output steps:
        assert formats.sqnr_db(reference, logits) > 10
        assert eq.sqnr_db > 3 and eq.sqnr_db > formats.sqnr_db(float_logits, reference) - 6


def test_fallback_float_layers_stay_float(tiny, tmp_path):
    model, calibration, val, _ = tiny
    fused = models.fuse(copy.deepcopy(model), False)
    first = get_backend().quantizable_layers(fused)[0].name
    int8 = _ptq(model, calibration, float_layers=[first])
    paths = _write(tmp_path, int8, model)
    graph = onnx.load(paths["model.onnx"]).graph
    producer = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    float_convs = [n for n in convs if n.input[1] not in producer
                   or producer[n.input[1]].op_type != "DequantizeLinear"]
    assert len(float_convs) == 1 and len(convs) > 1  # only the fallback's layer runs in float
    images, _ = formats.as_numpy(val)
    reference, _ = formats.predict(paths["model.torchscript.pt"], f"torch-{ENGINE}", val)
    _graph_computes_the_torchscript_logits(paths["model.onnx"], images, reference)


def _graph_computes_the_torchscript_logits(path, images, reference):
    """The exported graph, run op by op (no fusion into the runtime's int8 kernels), gives the
    TorchScript int8 artifact's logits to within one output quantization step."""
    import onnxruntime as ort

    graph = onnx.load(path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    last_dq = next(n for n in graph.node if n.output[0] == "logits")
    step = float(inits[last_dq.input[1]])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    logits = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(
        None, {"input": images})[0]
    assert np.abs(logits - reference).max() <= 1.01 * step


def test_corrupted_scale_is_detected(tiny, tmp_path):
    model, calibration, val, _ = tiny
    paths = _write(tmp_path, _ptq(model, calibration), model)
    proto = onnx.load(paths["model.onnx"])
    graph = proto.graph
    consts = {i.name: i for i in graph.initializer}
    # the input's QuantizeLinear: its scale, 20x too coarse
    q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    scale_of = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    if q.input[1] in consts:
        t = consts[q.input[1]]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 20, t.name))
    else:
        attr = scale_of[q.input[1]].attribute[0]
        attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t) * 20))
    good = formats.check_equivalence(paths["model.onnx"], "onnxruntime",
                                    paths["model.torchscript.pt"], f"torch-{ENGINE}",
                                    paths["float.pt"], val, num_threads=1)
    assert good.passed, good.reason
    bad = str(tmp_path / "bad.onnx")
    onnx.save(proto, bad)
    eq = formats.check_equivalence(bad, "onnxruntime", paths["model.torchscript.pt"],
                                  f"torch-{ENGINE}", paths["float.pt"], val, num_threads=1)
    assert eq.passed is False
    assert "agrees with the TorchScript artifact on" in eq.reason


def test_nncf_peer_is_int8_openvino(tiny, tmp_path):
    model, calibration, val, _ = tiny
    fused = models.fuse(copy.deepcopy(model), False)
    files = formats.nncf_peer(formats.export_float(fused, 32)["model.onnx"], calibration)
    assert set(files) == {"model.xml", "model.bin"}
    assert files["model.xml"].count(b'type="FakeQuantize"') > 10
    path = onnx_export.write_files(files, str(tmp_path / "nncf"))
    float_path = onnx_export.write_files({"float.pt": export.artifact_bytes(fused)},
                                         str(tmp_path / "float"))
    assert formats.quantization_lost(path) is None
    eq = formats.check_equivalence(path, "openvino", None, None, float_path, val, num_threads=1)
    assert eq.passed is None and eq.float_agreement >= 75


def test_unsupported_module_is_refused_by_name():
    from torch.ao.nn import quantized as nnq

    net = torch.nn.Sequential(nnq.Quantize(0.1, 0, torch.quint8),
                              nnq.LayerNorm([4], torch.nn.Parameter(torch.ones(4)),
                                            torch.nn.Parameter(torch.zeros(4)), 0.1, 0))
    with pytest.raises(onnx_export.ExportError, match=r"^1: .*LayerNorm has no ONNX QDQ form"):
        onnx_export.fake_quantized(net, torch.rand(1, 4))


def test_measure_files_times_each_runtime_in_the_same_rounds(tiny, tmp_path):
    model, calibration, _, _ = tiny
    paths = _write(tmp_path, _ptq(model, calibration), model)
    pairs = {"int8/onnxruntime": TimedFile(path=paths["model.onnx"], runtime="onnxruntime"),
             "int8/openvino": TimedFile(path=paths["model.xml"], runtime="openvino"),
             "int8/torch-onednn": TimedFile(path=paths["model.torchscript.pt"],
                                            runtime="torch-onednn"),
             "int8/torch-x86": TimedFile(path=paths["model.torchscript.pt"], runtime="torch-x86")}
    rows = measure_files(pairs, 32, (1, 2), num_threads=1, warmup=1, iterations=5,
                         max_remeasure=0, say=lambda line: None)
    assert sorted((r.variant, r.batch_size) for r in rows) == sorted(
        (k, b) for k in pairs for b in (1, 2))
    # 5 calls are 5 interleaved rounds of 1 (at least 3 rounds: the noise is their spread)
    assert all(r.latency_ms > 0 and r.iterations == 5 and r.runtime == pairs[r.variant].runtime
               and len(r.round_ms) == 5 for r in rows)
    assert all(len({r.session for r in rows if r.batch_size == b}) == 1 for b in (1, 2))
    with pytest.raises(ConfigError, match="runtime openvino cannot run .*model.onnx; valid for "
                                          "onnx: onnxruntime"):
        measure_files({"x": TimedFile(path=paths["model.onnx"], runtime="openvino")}, 32)


def test_manifest_entries_and_load_snippets(tiny, tmp_path):
    model, calibration, val, _ = tiny
    files = formats.export_int8(_ptq(model, calibration), ENGINE, 32)
    entries = {e.format: e for e in formats.artifact_entries(files, "v", "ptq", ENGINE)}
    assert set(entries) == {"onnx", "openvino"}
    assert [f.path for f in entries["openvino"].all_files()] == ["artifacts/v/model.xml",
                                                                 "artifacts/v/model.bin"]
    assert entries["onnx"].runtimes == ["onnxruntime"]
    assert entries["openvino"].runtimes == ["openvino"]
    assert {"onnx", "openvino", "torch"} <= set(entries["onnx"].made_by)
    import hashlib
    assert entries["onnx"].sha256 == hashlib.sha256(files["model.onnx"]).hexdigest()
    onnx_export.write_files(files, str(tmp_path))
    images, _ = formats.as_numpy(val[:1])
    for fmt, runtime in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        scope = {"images": images}
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            exec(runtimes.load_snippet(runtime, num_threads=1), scope)
        finally:
            os.chdir(cwd)
        assert np.asarray(scope["logits"]).shape == (len(images), 3)
    with pytest.raises(ValueError, match="unknown runtime 'tflite'; valid: torch, torch-x86"):
        runtimes.load_snippet("tflite")


def _logits_of(predictions: np.ndarray, rng, num_classes: int = 10) -> np.ndarray:
    """Logits whose top-1 is `predictions`, with a clear margin (no near-ties)."""
    return rng.normal(scale=0.3, size=(len(predictions), num_classes)) \
        + 4.0 * np.eye(num_classes)[predictions]


def _flip(predictions: np.ndarray, where: np.ndarray) -> np.ndarray:
    out = predictions.copy()
    out[where] = (out[where] + 1) % 10
    return out


def test_two_models_that_each_change_a_different_tenth_of_predictions_diverge():
    """Each changes 10% of float's predictions, so each is as close to float as the other
    (same top-1, same float agreement): they agree on 80% of images, and the export fails."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 10_000)
    float_logits = _logits_of(labels, rng)
    artifact = _logits_of(_flip(labels, np.arange(0, 1000)), rng)
    export = _logits_of(_flip(labels, np.arange(1000, 2000)), rng)

    eq = formats.compare_logits(export, labels, float_logits, artifact, "onnxruntime")
    assert eq.agreement == pytest.approx(80.0) and eq.top1 == eq.reference_top1 == 90.0
    assert eq.float_agreement == 90.0
    assert eq.passed is False
    assert eq.reason == "top-1 agrees with the TorchScript artifact on 80.00% of images (< 98%)"


def test_an_export_equal_to_float_fails_unless_it_agrees_with_its_artifact():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 10_000)
    float_logits = _logits_of(labels, rng)
    artifact = _logits_of(_flip(labels, np.arange(0, 1000)), rng)  # int8 changed 10%
    eq = formats.compare_logits(float_logits.copy(), labels, float_logits, artifact, "openvino")
    assert eq.sqnr_db is None  # exactly float's logits: no loss against float to measure
    assert eq.passed is False and "on 90.00% of images (< 98%)" in eq.reason
    # ... and top-1 10 points better than the artifact's is not "within 0.3 points" either
    assert "top-1 100.00 vs 90.00 of the TorchScript artifact" in eq.reason


def test_a_good_export_passes_and_top1_and_sqnr_are_further_conditions():
    """A runtime that rounds its own way flips near-ties: 1.5% of images, as many right as
    wrong, logits otherwise as close to float as the artifact's. That passes; at the same
    agreement, flips that all lose a correct prediction do not, nor do logits 3x too large."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 10_000)
    float_logits = _logits_of(labels, rng)
    ties = np.arange(300)  # near-ties of the label and the next class, alternately won
    other = (labels[ties] + 1) % 10
    float_logits[ties, other] = float_logits[ties, labels[ties]] + np.where(ties % 2, 0.02, -0.02)
    artifact = float_logits + rng.normal(scale=0.003, size=float_logits.shape)
    # every near-tie keeps its winner under noise of 0.003: the artifact predicts what float does
    assert (artifact.argmax(1) == float_logits.argmax(1)).all()

    def swapped(logits, rows):
        out = logits.copy()
        out[rows, labels[rows]], out[rows, (labels[rows] + 1) % 10] = \
            logits[rows, (labels[rows] + 1) % 10], logits[rows, labels[rows]]
        return out

    export = swapped(float_logits + rng.normal(scale=0.003, size=float_logits.shape), ties[:150])
    eq = formats.compare_logits(export, labels, float_logits, artifact, "onnxruntime")
    assert eq.agreement == pytest.approx(98.5) and eq.top1 == eq.reference_top1, eq.reason
    assert eq.passed, eq.reason
    assert eq.reason.startswith("top-1 agrees with the TorchScript artifact on 98.50% of images")

    lost = swapped(artifact, ties[::2][:150])  # 150 correct near-ties made wrong
    eq = formats.compare_logits(lost, labels, float_logits, artifact, "onnxruntime")
    assert eq.agreement == pytest.approx(98.5) and eq.passed is False
    assert eq.reason == ("top-1 {:.2f} vs {:.2f} of the TorchScript artifact (> 0.3 points "
                         "apart); top-1 agrees with the TorchScript artifact on 98.50% of "
                         "images").format(eq.top1, eq.reference_top1)
    scaled = formats.compare_logits(3 * artifact, labels, float_logits, artifact, "openvino")
    assert scaled.agreement == 100.0 and scaled.passed is False
    assert scaled.reason.startswith("logits SQNR against float")
    assert scaled.reason.endswith("agrees with the TorchScript artifact on 100.00% of images")


def test_an_int8_export_must_still_be_int8(tiny, tmp_path):
    """The int8 check reads the files: the tiny model's QDQ ONNX and its IR are int8; the
    float ONNX and IR of the same model are not, and as an int8 variant's export they fail
    even when their logits agree with the artifact."""
    model, calibration, val, _ = tiny
    int8 = formats.export_int8(_ptq(model, calibration), ENGINE, 32)
    floats = formats.export_float(models.fuse(copy.deepcopy(model), False), 32)
    int8_onnx = onnx_export.write_files(int8, str(tmp_path / "int8"))
    float_onnx = onnx_export.write_files(floats, str(tmp_path / "float"))
    int8_xml, float_xml = (os.path.join(os.path.dirname(p), "model.xml")
                           for p in (int8_onnx, float_onnx))
    assert formats.quantization_lost(int8_onnx) is None
    assert formats.quantization_lost(int8_xml) is None
    assert formats.quantization_lost(float_onnx) == (
        "model.onnx has no QuantizeLinear/DequantizeLinear nodes and no int8 weights: its "
        "quantization was lost")
    assert formats.quantization_lost(float_xml) == (
        "model.xml has no FakeQuantize nodes and no i8/u8 constants: its quantization was lost")

    logits, labels = formats.predict(float_onnx, "onnxruntime", val)
    eq = formats.check_export(float_onnx, logits, labels, logits, logits.copy(), "onnxruntime",
                              int8=True)
    assert eq.agreement == 100.0 and eq.passed is False
    assert eq.reason.startswith("model.onnx has no QuantizeLinear/DequantizeLinear nodes")
    assert "\n" not in eq.reason
    as_float = formats.check_export(float_onnx, logits, labels, logits, logits.copy(),
                                    "onnxruntime", int8=False)  # the float baseline: exempt
    assert as_float.passed
    nncf_like = formats.check_export(float_xml, logits, labels, logits, None, "openvino",
                                     int8=True)  # no artifact to agree with: the int8 check
    assert nncf_like.passed is False and nncf_like.reason.startswith("model.xml has no")
