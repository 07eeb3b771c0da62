"""The store, metric tables and data staging, against a local folder, memory:// and S3."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from quantlab import data, metrics
from quantlab.config import DataConfig
from quantlab.errors import DataError, NotFoundError, StoreError
from quantlab.store import Store, list_files
from tests.support import TINY_TRANSFORMS, upload_tree, write_tiny_dataset

RUN_DATE = metrics.now()
EVALUATION = {"run_id": "r1", "variant": "float", "method": "float", "model": "mobilenet_v2",
              "backend": "eager", "engine": "", "algorithms": "", "top1": 71.9, "top5": 90.3, "loss": 1.1,
              "num_images": 50000, "size_bytes": 14_000_000, "runtime": "torch",
              "format": "torchscript", "agreement": None, "float_agreement": None,
              "sqnr_db": None, "equivalent": None}


def test_bytes_json_listing_and_delete(store_uri):
    store = Store(store_uri)
    store.write_bytes("a/b/c.bin", b"\x00\x01")
    store.write_json("a/x.json", {"k": 1})
    assert store.read_bytes("a/b/c.bin") == b"\x00\x01"
    assert store.read_json("a/x.json") == {"k": 1}
    assert store.exists("a/x.json") and not store.exists("a/y.json")
    assert store.list_dir("a") == ["b", "x.json"]
    assert store.list_dir("nothing-here") == []
    assert [f.relpath for f in store.find("a")] == ["b/c.bin", "x.json"]
    store.write_bytes("a/x.json", b"{}")  # overwrite in place
    assert store.read_json("a/x.json") == {}
    store.delete("a", recursive=True)
    assert not store.exists("a/x.json")


def test_missing_object_is_a_clear_error(store_uri):
    with pytest.raises(NotFoundError, match="no such"):
        Store(store_uri).read_bytes("runs/none/manifest.json")


def test_paths_cannot_escape_the_root(store_uri):
    with pytest.raises(StoreError, match="escapes the store root"):
        Store(store_uri).read_bytes("../outside")


def test_local_writes_leave_no_temp_files(tmp_path):
    store = Store(str(tmp_path))
    for i in range(3):
        store.write_bytes("m/f.bin", bytes([i]) * 100)
    assert os.listdir(tmp_path / "m") == ["f.bin"]


def test_metric_tables_are_append_only_and_readable(store_uri):
    store = Store(store_uri)
    row = EVALUATION
    metrics.write_rows(store, "evaluations", [row], "r1", "float", RUN_DATE)
    metrics.write_rows(store, "evaluations", [{**row, "run_id": "r2"}], "r2", "float", RUN_DATE)
    metrics.write_rows(store, "evaluations", [{**row, "top1": 72.0}], "r1", "float", RUN_DATE)  # retry
    rows = metrics.read_rows(store, "evaluations")
    assert sorted((r["run_id"], r["top1"]) for r in rows) == [("r1", 72.0), ("r2", 71.9)]
    assert rows[0]["date"] == f"{RUN_DATE:%Y-%m-%d}"
    assert [r["run_id"] for r in metrics.read_rows(store, "evaluations", "r2")] == ["r2"]
    with pytest.raises(ValueError, match="missing"):
        metrics.write_rows(store, "evaluations", [{"run_id": "r3"}], "r3", "x", RUN_DATE)


def test_concurrent_writers_never_clobber_metric_files(store_uri):
    store = Store(store_uri)
    variants = ["float", "ptq-minmax", "ptq-x86", "qat-x86"]
    start = threading.Barrier(2)

    def write_run(run_id: str) -> None:
        start.wait()
        for v in variants:  # the same part names and partition in both runs
            metrics.write_rows(store, "evaluations", [{**EVALUATION, "run_id": run_id, "variant": v}],
                               run_id, v, RUN_DATE)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write_run, ["run-a", "run-b"]))
    rows = metrics.read_rows(store, "evaluations")
    assert sorted((r["run_id"], r["variant"]) for r in rows) == sorted(
        (run, v) for run in ("run-a", "run-b") for v in variants)
    assert len(store.find("metrics/evaluations")) == 8


def test_metric_tables_read_by_plain_pyarrow_and_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    store = Store(str(tmp_path))
    row = {"run_id": "r1", "variant": "qat-x86", "backend": "eager", "epoch": 1, "world_size": 2,
           "train_loss": 0.5, "train_top1": 80.0,
           "eval_top1": 79.0, "eval_top5": 95.0, "observer_frozen": False, "bn_frozen": True,
           "lr": 1e-4, "seconds": 3.0, "images_per_sec": 100.0}
    metrics.write_rows(store, "qat_epochs", [row], "r1", "epoch-0001", RUN_DATE)
    table = pq.read_table(str(tmp_path / "metrics" / "qat_epochs"))
    assert table.column("eval_top1").to_pylist() == [79.0]
    n = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/metrics/qat_epochs/**/*.parquet', "
                   "hive_partitioning=true)").fetchall()[0][0]
    assert n == 1


def _upload_dataset(store_uri, tmp_path) -> str:
    local = write_tiny_dataset(str(tmp_path / "src"), per_class=(4, 2))
    return upload_tree(Store(store_uri), local, "datasets/shapes")


def test_stage_downloads_once_and_resumes(store_uri, tmp_path):
    uri = _upload_dataset(store_uri, tmp_path)
    cache = str(tmp_path / "cache")
    first = data.stage(uri, cache)
    assert (first.num_train, first.num_val, first.classes) == (12, 6, ["circle", "cross", "square"])
    remote = not uri.startswith("/")
    assert first.staged_files == (18 if remote else 0)
    again = data.stage(uri, cache)
    assert again.staged_files == 0 and again.fingerprint == first.fingerprint
    if remote:  # an interrupted copy: one file missing, one truncated, no completion marker
        os.remove(os.path.join(first.local_path, "train", "cross", "000.png"))
        with open(os.path.join(first.local_path, "val", "circle", "001.png"), "wb") as f:
            f.write(b"trunc")
        os.remove(os.path.join(first.local_path, data.STAGED_MARKER))
        resumed = data.stage(uri, cache)
        assert resumed.staged_files == 2 and resumed.fingerprint == first.fingerprint


def test_fingerprint_changes_with_content(store_uri, tmp_path):
    uri = _upload_dataset(store_uri, tmp_path)
    before = data.fingerprint(list_files(uri))
    Store(uri).write_bytes("val/cross/extra.png", b"not really a png")
    assert data.fingerprint(list_files(uri)) != before


@pytest.mark.parametrize("mutate, needle", [
    (lambda root: None, "is missing or empty"),
    (lambda root: write_tiny_dataset(root, per_class=(2, 0)), "has no images under val/"),
])
def test_bad_layouts_are_named(tmp_path, mutate, needle):
    root = str(tmp_path / "ds")
    os.makedirs(root)
    mutate(root)
    with pytest.raises(DataError, match=needle):
        data.stage(root, str(tmp_path / "cache"))


def test_classes_must_match_between_splits(tmp_path):
    root = write_tiny_dataset(str(tmp_path / "ds"), per_class=(2, 1))
    os.rename(os.path.join(root, "val", "cross"), os.path.join(root, "val", "plus"))
    with pytest.raises(DataError, match=r"only in train: \['cross'\]; only in val: \['plus'\]"):
        data.stage(root, str(tmp_path / "cache"))


def test_undecodable_images_are_named_at_staging_or_left_out(tmp_path):
    root = write_tiny_dataset(str(tmp_path / "ds"), per_class=(2, 2))
    with open(os.path.join(root, "val", "square", "000.png"), "wb") as f:
        f.write(b"\x89PNG garbage")
    with open(os.path.join(root, "train", "cross", "001.png"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)  # a cut-off download
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError) as e:
        data.stage(root, cache)
    assert "2 image(s)" in str(e.value) and "--skip-bad-images" in str(e.value)
    assert f"{root}/val/square/000.png (UnidentifiedImageError" in str(e.value)
    assert f"{root}/train/cross/001.png (OSError" in str(e.value)

    staged = data.stage(root, cache, skip_bad_images=True)  # the decode check is cached
    assert staged.skipped == ["train/cross/001.png", "val/square/000.png"]
    assert (staged.num_train, staged.num_val) == (5, 5)
    ds = data.image_folder(staged, "val", None)
    assert len(ds) == 5 and not any(p.endswith("square/000.png") for p, _ in ds.samples)
    assert len(data.image_folder(staged, "train", None)) == 5

    os.remove(os.path.join(root, "val", "square", "001.png"))  # the class's only good image
    with pytest.raises(DataError, match="without its undecodable images, val/square/ would have"):
        data.stage(root, cache, skip_bad_images=True)


def test_image_broken_after_staging_is_named_by_the_loader(tmp_path):
    root = write_tiny_dataset(str(tmp_path / "ds"), per_class=(2, 1))
    staged = data.stage(root, str(tmp_path / "cache"))
    with open(os.path.join(root, "val", "square", "000.png"), "wb") as f:
        f.write(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot decode image .*square/000.png"):
        list(data.loader(staged, DataConfig(uri=root, transforms=TINY_TRANSFORMS), "val", train=False))


def test_digits_seed_once(tmp_path):
    store = Store(str(tmp_path))
    uri, written = data.seed_digits(store)
    assert written
    staged = data.stage(uri, str(tmp_path / "cache"))
    assert staged.num_train + staged.num_val == 1797 and len(staged.classes) == 10
    assert 340 <= staged.num_val <= 380
    assert data.seed_digits(store) == (uri, False)
