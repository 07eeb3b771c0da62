"""The whole `quantize` flow end to end under a real Prefect API: tiny data, 2 gloo workers."""

import json
import os

import pytest
import torch

from quantlab import metrics, registry
from quantlab.store import Store


def test_flow_writes_artifacts_metrics_manifest_and_aliases(completed_run):
    cfg, result = completed_run
    store = Store(cfg.store)
    m = registry.load_manifest(store, result.manifest.run_id)
    assert m.status == "succeeded" and m.input_size == 32
    assert m.run_id.startswith("flow-")  # from the flow run: a retry would resume it
    assert [(a.variant, a.format) for a in m.artifacts] == [
        ("float", "torchscript"), ("ptq-minmax", "torchscript"), ("ptq-x86", "torchscript"),
        ("pt2e-x86", "aoti"), ("ptq-x86-fallback", "torchscript"), ("qat-x86", "torchscript"),
        ("qat-pt2e-x86", "aoti")]
    for a in m.artifacts:
        registry.read_artifact(store, m, a.variant)  # sha256 matches
    assert {"torch", "torchvision", "quantlab"} <= set(m.versions)
    assert m.dataset.fingerprint and m.config["data"]["transforms"]["input_size"] == 32
    # float competes: an int8 pair is shipped only if it beat the fastest float pair beyond the
    # noise at the serving batch; the verdict in the manifest says which, at each batch size
    verdict = m.selected.verdict
    assert verdict.serving_batch_size == cfg.timing.serving_batch_size == 1
    assert [s.batch_size for s in verdict.speedups] == list(cfg.timing.timed_batch_sizes)
    serving = verdict.speedups[0]
    assert verdict.int8_pays == (m.selected.variant != "float")
    assert verdict.int8_pays or not serving.beyond_noise  # an int8 pair that pays is taken
    assert serving.float_runtime == min(
        (r for r in m.runtime_results if r.variant == "float"), key=lambda r: r.latency_ms).runtime
    if not verdict.int8_pays:
        assert m.selected.runtime == serving.float_runtime
        assert verdict.sentence.startswith("int8 does not pay off on this CPU at this size")
    assert m.gate.passed and "no previous best-mobilenet_v2" in m.gate.reason
    assert m.max_accuracy_drop == cfg.max_accuracy_drop
    by_variant = {r.variant: r for r in m.results}
    assert by_variant["float"].speedup == pytest.approx(1.0)
    assert all(r.latency_ms > 0 for r in m.results)
    fallback = by_variant["ptq-x86-fallback"]
    assert fallback.float_layers == [x.layer for x in result.most_sensitive][
        :len(fallback.float_layers)]
    # every variant in every runtime: float in torch, ONNX Runtime, OpenVINO (default and f32);
    # each x86 int8 TorchScript under x86 and onednn, its ONNX and its IR; nncf-ptq's IR;
    # each PT2E variant's AOTInductor package (no exports: they are of eager modules)
    pairs = {(r.variant, r.runtime) for r in m.runtime_results}
    assert len(pairs) == len(m.runtime_results) == 4 + 4 * 4 + 1 + 2
    assert {(r.variant, r.runtime, r.backend, r.format) for r in m.runtime_results
            if r.backend == "pt2e"} == {("pt2e-x86", "aoti", "pt2e", "aoti"),
                                        ("qat-pt2e-x86", "aoti", "pt2e", "aoti")}
    assert {rt for v, rt in pairs if v == "float"} == {"torch", "onnxruntime", "openvino",
                                                       "openvino-f32"}
    assert {rt for v, rt in pairs if v == "qat-x86"} == {"torch-x86", "torch-onednn",
                                                         "onnxruntime", "openvino"}
    assert {rt for v, rt in pairs if v == "nncf-ptq"} == {"openvino"}
    assert {(a.variant, a.format) for a in m.exports} == {
        (v, f) for v in ["float", "ptq-minmax", "ptq-x86", "ptq-x86-fallback", "qat-x86"]
        for f in ("onnx", "openvino")} | {("nncf-ptq", "openvino")}
    for a in m.exports:
        for f in a.all_files():
            registry.read_verified(store, m.run_id, f)  # every file, both of an IR
        assert {"onnx", "openvino", "torch"} <= set(a.made_by)
    diverged = [r for r in m.runtime_results if r.equivalent is False]  # test_export_checks_...
    assert all(r.agreement is not None for r in m.runtime_results
               if r.format not in registry.OWN_FORMATS and r.variant != "nncf-ptq")
    assert all(r.float_agreement is not None for r in m.runtime_results)
    assert m.float_runtime == by_variant["float"].runtime
    assert m.selected.load_snippet.count("\n") == 2
    for table, expected in [("evaluations", len(m.runtime_results)),
                            ("benchmarks", 2 * (len(m.runtime_results) - len(diverged))),
                            ("qat_epochs", 2), ("sensitivity", 53)]:
        assert len(metrics.read_rows(store, table, result.manifest.run_id)) == expected, table
    assert store.exists(f"runs/{m.run_id}/report/comparison.png")
    report = store.read_bytes(f"runs/{m.run_id}/report/report.md").decode()
    assert "Selected" in report and "Per-layer sensitivity of `ptq-x86`" in report
    assert f"**Verdict**: {verdict.sentence}" in report
    assert "Float fallback `ptq-x86-fallback`" in report and "Regression gate passed" in report
    for alias in ("latest", "best", "latest-mobilenet_v2", "best-mobilenet_v2"):
        assert registry.resolve(store, alias) == m.run_id
    assert registry.read_alias(store, "best").variant == m.selected.variant


def test_printed_table_fits_an_80_column_terminal(completed_run):
    from rich.console import Console

    from quantlab import report

    cfg, result = completed_run
    rows = [registry.ResultRow.model_validate(r) for r in result.manifest.results]
    console = Console(width=80, record=True)
    console.print(report.rich_table(rows, result.manifest.selected.variant, title=result.manifest.run_id))
    text = console.export_text()
    assert "\u2026" not in text  # nothing cut off with an ellipsis
    assert f"{result.manifest.selected.variant} *" in text and "* selected" in text and "qat-x86" in text
    assert "qat-pt2e-x86" in text and "SQNR" in text


def test_flow_publishes_keyed_artifacts(completed_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    _, result = completed_run
    # The session may hold other quantize runs (test_cli imports this fixture): read this one's.
    flow_run_id = result.manifest.run_id.removeprefix("flow-")
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["quantlab-comparison", "quantlab-report", "quantlab-progress"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {"quantlab-comparison", "quantlab-report", "quantlab-progress"}
    table = by_key["quantlab-comparison"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [r["variant"].split(" ")[0] for r in table] == [
        "float", "ptq-minmax", "ptq-x86", "pt2e-x86", "nncf-ptq", "ptq-x86-fallback", "qat-x86",
        "qat-pt2e-x86"]
    assert {r["runtime"] for r in table} <= {"torch", "torch-x86", "torch-onednn", "onnxruntime",
                                             "openvino", "openvino-f32", "aoti"}
    assert {(r["variant"], r["backend"], r["format"]) for r in table if r["runtime"] == "aoti"} == {
        ("pt2e-x86", "pt2e", "aoti"), ("qat-pt2e-x86", "pt2e", "aoti")}
    assert [r["variant"] for r in table].count(f"{result.manifest.selected.variant} (selected)") == 1
    assert float(by_key["quantlab-progress"].data) == 100.0
    assert result.manifest.run_id in by_key["quantlab-report"].data


def test_export_checks_follow_the_rule_and_a_failed_export_is_not_used(completed_run, tmp_path):
    """Every (variant, runtime) checked against its own artifact passed exactly when its
    figures meet formats' rule (and an int8 export's file is int8); whatever failed is neither
    timed nor selected, and `pull` refuses it. Holds whether or not anything diverged."""
    import tempfile

    from quantlab import formats

    cfg, result = completed_run
    store = Store(cfg.store)
    m = registry.load_manifest(store, result.manifest.run_id)
    rows = {(r["variant"], r["runtime"]): r for r in metrics.read_rows(store, "evaluations",
                                                                       m.run_id)}
    own = {a.variant: a.runtimes[0] for a in m.artifacts}  # the artifact's run: the reference
    with tempfile.TemporaryDirectory() as tmp:
        paths = registry.verified_copies(
            store, {f"{e.variant}.{e.format}": (m.run_id, e) for e in m.exports}, tmp)
        lost = {(e.variant, e.format): formats.quantization_lost(paths[f"{e.variant}.{e.format}"])
                for e in m.exports}
    for (variant, fmt), reason in lost.items():  # int8 exports kept their Q/DQ; float has none
        assert (reason is None) == (variant != "float"), (variant, fmt, reason)
    checked = {(v, rt): r for (v, rt), r in rows.items() if v in own and rt != own[v]}
    assert {rt for _, rt in checked} == {"torch-onednn", "onnxruntime", "openvino", "openvino-f32"}
    for (variant, runtime), row in checked.items():
        ref = rows[(variant, own[variant])]
        assert row["agreement"] is not None, (variant, runtime)
        int8_lost = row["format"] not in registry.OWN_FORMATS and variant != "float" \
            and lost[(variant, row["format"])] is not None
        sqnr_kept = row["sqnr_db"] is None or ref["sqnr_db"] is None or \
            row["sqnr_db"] >= ref["sqnr_db"] - formats.MAX_SQNR_LOSS_DB
        assert row["equivalent"] is (row["agreement"] >= formats.MIN_AGREEMENT and sqnr_kept
                                     and abs(row["top1"] - ref["top1"]) <= formats.MAX_TOP1_DIFF
                                     and not int8_lost), (variant, runtime, row)
    peer = rows[(cfg.nncf_peer, "openvino")]  # no artifact to agree with: only int8 can fail it
    assert peer["agreement"] is None and peer["equivalent"] is None

    failed = {pair for pair, r in rows.items() if r["equivalent"] is False}
    timed = {(r["variant"], r["runtime"]) for r in metrics.read_rows(store, "benchmarks", m.run_id)}
    assert timed == set(rows) - failed
    assert (m.selected.variant, m.selected.runtime) not in failed
    assert all((r.variant, r.runtime) not in failed for r in m.results)
    for e in m.exports:
        dest = tmp_path / f"{e.variant}-{e.format}"
        dest.mkdir()
        bad = [rt for rt in e.runtimes if (e.variant, rt) in failed]
        if not bad:
            registry.pull(cfg.store, m.run_id, e.variant, str(dest), format=e.format)
            assert len(list(dest.iterdir())) == 1 + len(e.files)
            continue
        with pytest.raises(registry.ExportCheckError, match=(
                rf"^{e.variant}'s {e.format} export .* in ({'|'.join(bad)}): .+; "
                r"--force pulls it anyway$")):
            registry.pull(cfg.store, m.run_id, e.variant, str(dest), format=e.format)
        assert list(dest.iterdir()) == []


def test_pull_verifies_and_refuses_tampered_artifacts(completed_run, tmp_path):
    cfg, result = completed_run
    store = Store(cfg.store)
    dest = registry.pull(cfg.store, "latest", variant="best", dest=str(tmp_path / "m.pt"),
                         format="torchscript")
    torch.jit.load(dest)(torch.randn(1, 3, 32, 32))
    m = registry.load_manifest(store, result.manifest.run_id)
    entry = m.artifact("ptq-minmax")
    rel = f"runs/{m.run_id}/{entry.path}"
    original = store.read_bytes(rel)
    try:
        store.write_bytes(rel, original[:-10] + b"0123456789")
        with pytest.raises(registry.IntegrityError, match="does not match"):
            registry.pull(cfg.store, m.run_id, variant="ptq-minmax", dest=str(tmp_path / "bad.pt"))
        assert not (tmp_path / "bad.pt").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    finally:
        store.write_bytes(rel, original)


def test_pull_fetches_onnx_and_both_ir_files_or_nothing(completed_run, tmp_path):
    import onnxruntime
    import openvino

    cfg, result = completed_run
    run_id = result.manifest.run_id
    # force: on these 24 images an export may fail its check (one flipped image is 95.8%
    # agreement); refusing those is test_export_checks_follow_the_rule_...'s, the files are this
    onnx_path = registry.pull(cfg.store, run_id, "qat-x86", str(tmp_path), format="onnx",
                              force=True)
    assert onnx_path.endswith(f"mobilenet_v2-qat-x86-{run_id}.onnx")
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": torch.randn(2, 3, 32, 32).numpy()})[0].shape == (2, 3)
    with pytest.raises(registry.ConfigError, match="must end with .xml .or be a folder.: an "
                                                   "OpenVINO IR's .bin is written beside it"):
        registry.pull(cfg.store, run_id, "qat-x86", str(tmp_path / "ir"), format="openvino",
                      force=True)
    (tmp_path / "ir").mkdir()
    xml = registry.pull(cfg.store, run_id, "qat-x86", str(tmp_path / "ir"), format="openvino",
                        force=True)
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == [
        f"mobilenet_v2-qat-x86-{run_id}.bin", f"mobilenet_v2-qat-x86-{run_id}.xml"]
    assert registry.pull(cfg.store, run_id, "qat-x86", f"{tmp_path}/new/",  # a folder, made
                         format="openvino", force=True) == str(
        tmp_path / "new" / os.path.basename(xml))
    compiled = openvino.Core().compile_model(xml, "CPU")
    assert compiled(torch.randn(1, 3, 32, 32).numpy())[0].shape == (1, 3)

    store = Store(cfg.store)
    entry = result.manifest.artifact("ptq-x86", "openvino")
    rel = f"runs/{run_id}/{entry.files[0].path}"
    assert rel.endswith("model.bin")
    original = store.read_bytes(rel)
    try:  # a tampered weights file: refused, and neither file of the IR is written
        store.write_bytes(rel, original[:-4] + b"\0\0\0\0")
        (tmp_path / "bad").mkdir()
        with pytest.raises(registry.IntegrityError, match="model.bin does not match"):
            registry.pull(cfg.store, run_id, "ptq-x86", str(tmp_path / "bad"), format="openvino",
                          force=True)
        assert list((tmp_path / "bad").iterdir()) == []
    finally:
        store.write_bytes(rel, original)
    with pytest.raises(registry.NotFoundError, match="no onnx artifact of nncf-ptq; valid "
                                                     "formats: openvino"):
        registry.pull(cfg.store, run_id, "nncf-ptq", str(tmp_path), format="onnx")


BARE_AOTI = """
import json, sys
import numpy as np, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
images = torch.from_numpy(np.load(sys.argv[2]))
with torch.inference_mode():
    logits = torch.cat([runner(images[i:i + 5]) for i in range(0, len(images), 5)])
np.save(sys.argv[3], logits.numpy())
print(json.dumps({"leaked": sorted(m for m in sys.modules
                                   if m.split(".")[0] in ("quantlab", "torchao"))}))
"""


def test_a_pulled_pt2e_package_runs_in_a_bare_process_as_evaluated(completed_run, tmp_path):
    """pt2e-x86 and qat-pt2e-x86 as AOTInductor packages: pulled (sha256 verified), loaded
    with torch alone, their val/ top-1 is the one the run stored."""
    import subprocess
    import sys

    import numpy as np

    from quantlab import data, pipeline
    from quantlab.formats import as_numpy

    cfg, result = completed_run
    m = result.manifest
    staged = pipeline.stage(cfg)
    images, labels = as_numpy(data.loader(staged, cfg.data, "val", train=False))
    np.save(tmp_path / "val.npy", images)
    stored = {(r["variant"], r["runtime"]): r for r in metrics.read_rows(Store(cfg.store),
                                                                        "evaluations", m.run_id)}
    for variant in ("pt2e-x86", "qat-pt2e-x86"):
        entry = m.artifact(variant)
        assert entry.format == "aoti" and entry.runtimes == ["aoti"]
        assert entry.made_by["torch"] == torch.__version__ and entry.made_by["vec_isa"]
        path = registry.pull(cfg.store, m.run_id, variant, str(tmp_path) + "/")  # its own format
        assert path.endswith(f"mobilenet_v2-{variant}-{m.run_id}.pt2")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-P", "-c", BARE_AOTI, path,
                               str(tmp_path / "val.npy"), str(tmp_path / "logits.npy")],
                              capture_output=True, text=True, env=env, cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["leaked"] == []
        top1 = 100.0 * float((np.load(tmp_path / "logits.npy").argmax(1) == labels).mean())
        row = stored[(variant, "aoti")]
        assert (row["backend"], row["format"]) == ("pt2e", "aoti")
        assert top1 == pytest.approx(row["top1"]) and row["num_images"] == len(labels)
        assert row["sqnr_db"] is not None and row["float_agreement"] is not None


def test_unknown_refs_and_variants_are_named(completed_run):
    cfg, result = completed_run
    with pytest.raises(registry.NotFoundError, match="neither a complete run nor an alias"):
        registry.pull(cfg.store, "nope")
    with pytest.raises(registry.NotFoundError, match="no variant 'ptq-y'; valid: best, float"):
        registry.pull(cfg.store, result.manifest.run_id, variant="ptq-y")


def test_a_retried_flow_run_resumes_its_run(prefect):
    """Without a run id, quantize takes the flow run's id, which a retry keeps: it resumes."""
    from prefect import flow
    from prefect.runtime import flow_run
    from quantlab_flows.quantize import with_flow_run_id

    from quantlab.config import parse_config

    cfg = parse_config({"model": {"checkpoint": "f.pth"}, "data": {"uri": "d"}})
    attempts = []

    @flow(retries=1, retry_delay_seconds=0)
    def crashes_once():
        attempts.append((flow_run.id, with_flow_run_id(cfg).run_id))
        if len(attempts) == 1:
            raise RuntimeError("lost a QAT node")

    crashes_once()
    (first_id, first_run), (second_id, second_run) = attempts
    assert first_id == second_id and first_run == second_run == f"flow-{first_id}"
    assert with_flow_run_id(cfg.model_copy(update={"run_id": "mine"})).run_id == "mine"
    assert with_flow_run_id(cfg).run_id is None  # outside a flow run: start_run picks a new id


def test_a_parent_flow_shows_the_table_and_report_on_its_own_page(completed_run):
    """The demo flow calls `publish` on the quantize subflow's outcome: a user who opens the
    demo run (not the subflow) sees the comparison and the report under its Artifacts."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.runtime import flow_run

    from quantlab_tasks.steps import publish

    _, result = completed_run

    @flow
    def parent() -> str:
        publish(result)
        return flow_run.id

    parent_id = parent()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[parent_id])))
    assert {"quantlab-comparison", "quantlab-report"} <= {a.key for a in arts}
