"""quantlab on S3 end to end, against the session's moto server.

One `quantlab run` (the CLI in a subprocess, reporting to the session's Prefect API) with data,
checkpoint and store all on S3, and the endpoint and credentials given only as
`--storage-option` (so the torchrun workers can reach S3 only through the environment they
inherit). Then, on what it left: the registry, `quantlab runs` and `pull`, a tampered artifact,
the metric tables through pyarrow's own S3 client and DuckDB, and a search of every stored
object, every line of output and every Prefect log for the credentials. Plus the S3 side of
staging (one paginated listing, concurrent GETs), AWS_PROFILE and a missing bucket.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.parse
import uuid
from dataclasses import dataclass

import boto3
import pytest
import s3fs
import torch
import yaml

from quantlab import data, metrics, registry
from quantlab.config import RunConfig
from quantlab.store import Store, has_copy, list_files
from tests.support import make_config, upload_tree, write_tiny_dataset
from tests.support import run_quantlab as quantlab

# Distinctive credentials (moto accepts any): they must turn up nowhere but in the environment.
CANARY_KEY = "AKIAQLCANARY7F3K2P9X"
CANARY_SECRET = "ql+Canary/Secret-5e1f0c9a7b3d"


@dataclass
class S3Run:
    bucket: str
    config: RunConfig
    output: str       # the run's stdout and stderr
    run_id: str


@pytest.fixture(scope="module")
def s3_env(s3_endpoint):
    """A bucket for this module; AWS_ENDPOINT_URL and the canary credentials in AWS_*."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", CANARY_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("QUANTLAB_STORAGE_OPTIONS", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"e2e-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield bucket
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_run(prefect, s3_env, s3_endpoint, tiny_dataset, tiny_checkpoint, tmp_path_factory) -> S3Run:
    """`quantlab run CONFIG --storage-option ...` with data, checkpoint and store on S3."""
    from prefect.settings import PREFECT_API_URL

    bucket, tmp = s3_env, tmp_path_factory.mktemp("s3run")
    root = Store(f"s3://{bucket}")
    data_uri = upload_tree(root, tiny_dataset, "datasets/shapes")
    with open(tiny_checkpoint, "rb") as f:
        root.write_bytes("models/float.pth", f.read())
    cfg = make_config(data_uri, root.uri("models/float.pth"), root.uri("lab"), str(tmp / "cache"))
    config_path = tmp / "run.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", COLUMNS="200")
    out = subprocess.run(
        [sys.executable, "-m", "quantlab_cli.app", "run", str(config_path),
         "--storage-option", f"endpoint_url={s3_endpoint}",
         "--storage-option", f"key={CANARY_KEY}", "--storage-option", f"secret={CANARY_SECRET}"],
        env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    [manifest] = registry.list_runs(Store(cfg.store))
    return S3Run(bucket, cfg, out.stdout + out.stderr, manifest.run_id)


def test_run_with_data_checkpoint_and_store_on_s3(s3_run):
    store = Store(s3_run.config.store)
    m = registry.load_manifest(store, s3_run.run_id)
    assert m.status == "succeeded" and m.dataset.uri == s3_run.config.data.uri
    assert m.dataset.num_train == 72 and m.dataset.num_val == 24
    assert [a.variant for a in m.artifacts] == ["float", "ptq-minmax", "ptq-x86",
                                                "ptq-x86-fallback", "qat-x86"]
    for a in m.artifacts:
        registry.read_artifact(store, m, a.variant)  # sha256 and size match
    # The staging manifest in the local cache records the fingerprint the run manifest cites.
    marker = os.path.join(os.path.expanduser(s3_run.config.cache_dir), "datasets",
                          m.dataset.fingerprint[:32], data.STAGED_MARKER)
    with open(marker) as f:
        assert json.load(f)["fingerprint"] == m.dataset.fingerprint
    # The QAT workers wrote their epoch row and checkpoint to S3 themselves.
    assert store.exists(f"runs/{m.run_id}/{registry.checkpoint_path(1)}")
    assert len(metrics.read_rows(store, "qat_epochs", m.run_id)) == 1
    for alias in ("latest", "best", "latest-mobilenet_v2", "best-mobilenet_v2"):
        assert registry.resolve(store, alias) == m.run_id
    assert f"selected {m.selected.variant}" in s3_run.output


def test_metric_tables_read_by_pyarrow_s3_client_and_duckdb(s3_run, s3_endpoint):
    import duckdb
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http",
                           access_key=CANARY_KEY, secret_key=CANARY_SECRET, region="us-east-1")
    # one evaluation per (variant, runtime): float in torch, each x86 int8 file under x86 and
    # onednn; every pair that did not diverge timed at 2 batch sizes
    evaluated = metrics.read_rows(Store(s3_run.config.store), "evaluations", s3_run.run_id)
    timed = [r for r in evaluated if r["equivalent"] is not False]
    expected = {"evaluations": 1 + 4 * 2, "benchmarks": 2 * len(timed), "qat_epochs": 1,
                "sensitivity": 53}
    for table, num_rows in expected.items():
        t = pq.read_table(f"{s3_run.bucket}/lab/metrics/{table}", filesystem=s3)
        assert t.num_rows == num_rows and "date" in t.column_names, table
        assert set(t.column("run_id").to_pylist()) == {s3_run.run_id}
    evaluations = pq.read_table(f"{s3_run.bucket}/lab/metrics/evaluations", filesystem=s3)
    assert set(evaluations.column("variant").to_pylist()) == {"float", "ptq-minmax", "ptq-x86",
                                                              "ptq-x86-fallback", "qat-x86"}
    con = duckdb.connect()  # no httpfs extension here: DuckDB reads s3:// through s3fs
    con.register_filesystem(s3fs.S3FileSystem())
    n = con.sql(f"select count(*) from read_parquet('s3://{s3_run.bucket}/lab/metrics/benchmarks/"
                "**/*.parquet', hive_partitioning=true)").fetchall()[0][0]
    assert n == expected["benchmarks"]


def test_runs_without_manifest_are_not_listed(s3_run):
    store = Store(s3_run.config.store)
    m = registry.load_manifest(store, s3_run.run_id)
    partial = "29990101-000000-partial"  # an interrupted run: artifacts, no manifest
    store.write_json(f"runs/{partial}/run.json", {"run_id": partial})
    store.write_bytes(f"runs/{partial}/{m.artifact('float').path}",
                      registry.read_artifact(store, m, "float"))
    try:
        assert [r.run_id for r in registry.list_runs(store)] == [s3_run.run_id]
        out = quantlab("runs", "--store", store.root)
        assert out.returncode == 0, out.stderr
        assert s3_run.run_id in out.stdout and partial not in out.stdout
        out = quantlab("pull", partial, "--store", store.root)
        assert out.returncode == 2 and "did not complete" in out.stderr
    finally:
        store.delete(f"runs/{partial}", recursive=True)


def test_pull_from_s3_verifies_and_refuses_an_overwritten_artifact(s3_run, tmp_path):
    store = Store(s3_run.config.store)
    out = quantlab("pull", "latest", "--variant", "best", "--dest", str(tmp_path / "m.pt"),
                   "--store", store.root)
    assert out.returncode == 0, out.stderr
    torch.jit.load(str(tmp_path / "m.pt"))(torch.randn(1, 3, 32, 32))

    m = registry.load_manifest(store, s3_run.run_id)
    rel = f"runs/{m.run_id}/{m.artifact('best').path}"
    original = store.read_bytes(rel)
    try:
        store.write_bytes(rel, original[:-8] + b"tampered")  # same size, other bytes
        out = quantlab("pull", "latest", "--variant", "best", "--dest", str(tmp_path / "bad.pt"),
                       "--store", store.root)
        assert out.returncode != 0
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "does not match" in lines[0] and "nothing written" in lines[0]
        assert os.listdir(tmp_path) == ["m.pt"]  # no bad.pt, no temp file
    finally:
        store.write_bytes(rel, original)


def test_credentials_are_never_printed_logged_or_stored(s3_run, s3_endpoint):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    store = Store(s3_run.config.store)
    outputs = [s3_run.output]
    for args in (["runs"], ["show", "latest"], ["show", "latest", "--json"]):
        out = quantlab(*args, "--store", store.root)
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout + out.stderr)
    # An error path with the secret as a --storage-option: the message must not echo it.
    out = quantlab("runs", "--store", "s3://quantlab-no-such-bucket/lab",
                   "--storage-option", f"key={CANARY_KEY}", "--storage-option", f"secret={CANARY_SECRET}")
    assert out.returncode == 2
    outputs.append(out.stdout + out.stderr)

    s3 = boto3.client("s3")
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_run.bucket):
        for obj in page.get("Contents", []):
            objects[obj["Key"]] = s3.get_object(Bucket=s3_run.bucket, Key=obj["Key"])["Body"].read()
    assert any(k.endswith("manifest.json") for k in objects)
    assert any(k.endswith(".parquet") for k in objects)
    cache = os.path.expanduser(s3_run.config.cache_dir)
    for root, _, names in os.walk(cache):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                objects[os.path.join(root, name)] = f.read()
    with get_client(sync_client=True) as client:
        runs = read_all(client.read_flow_runs)
        logs = read_all(client.read_logs, log_filter=LogFilter())
        artifacts = read_all(client.read_artifacts)
    prefect_logs = "\n".join(lg.message for lg in logs)
    assert f"run {s3_run.run_id} in" in prefect_logs and "[rank 0/2]" in prefect_logs
    assert any(s3_run.run_id in str(a.data) for a in artifacts)  # the run's report, among others
    prefect_records = json.dumps([r.model_dump(mode="json") for r in runs] +
                                 [lg.model_dump(mode="json") for lg in logs] +
                                 [a.model_dump(mode="json") for a in artifacts])

    for canary in (CANARY_KEY, CANARY_SECRET, urllib.parse.quote(CANARY_SECRET, safe="")):
        for text in outputs:
            assert canary not in text
        assert canary not in prefect_records
        for key, body in objects.items():
            assert canary.encode() not in body, key


def read_all(read, **kwargs) -> list:
    """Every record of a paged Prefect client query."""
    out: list = []
    while page := read(limit=200, offset=len(out), **kwargs):
        out += page
    return out


def test_staging_lists_once_paginated_and_downloads_concurrently(s3_bucket, tmp_path, monkeypatch):
    uri = upload_tree(Store(f"s3://{s3_bucket}"), write_tiny_dataset(str(tmp_path / "src"), (4, 2)),
                      "datasets/shapes")
    calls: list[tuple[str, dict]] = []
    in_flight = {"now": 0, "max": 0}
    call_s3 = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        if method == "list_objects_v2":
            kwargs["MaxKeys"] = 5  # small pages: 18 files take 4 of them
        calls.append((method, kwargs))
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        try:
            return await call_s3(self, method, *args, **kwargs)
        finally:
            in_flight["now"] -= 1

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    staged = data.stage(uri, str(tmp_path / "cache"))
    assert staged.staged_files == 18
    lists = [kw for method, kw in calls if method == "list_objects_v2"]
    assert len(lists) == 4 and all(kw["Delimiter"] == "" for kw in lists)  # recursive, paged
    assert sorted({method for method, _ in calls}) == ["get_object", "list_objects_v2"]
    assert sum(method == "get_object" for method, _ in calls) == 18
    assert in_flight["max"] > 1  # the GETs overlap

    calls.clear()
    assert data.stage(uri, str(tmp_path / "cache")).staged_files == 0
    assert {method for method, _ in calls} == {"list_objects_v2"}


def test_staging_retry_fetches_only_what_is_missing(s3_bucket, tmp_path, monkeypatch):
    uri = upload_tree(Store(f"s3://{s3_bucket}"), write_tiny_dataset(str(tmp_path / "src"), (4, 2)),
                      "datasets/shapes")
    files = list_files(uri)
    local = os.path.join(tmp_path / "cache", "datasets", data.fingerprint(files)[:32])
    gets: list[str] = []
    call_s3 = s3fs.S3FileSystem._call_s3

    async def one_transient_failure(self, method, *args, **kwargs):
        if method == "get_object":
            gets.append(kwargs["Key"])
            if len(gets) == 10:  # once the other 17 files are on disk, the connection drops
                while sum(has_copy(os.path.join(local, *f.relpath.split("/")), f) for f in files) < 17:
                    await asyncio.sleep(0.02)
                raise ConnectionResetError("Connection reset by peer")
        return await call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", one_transient_failure)
    assert data.stage(uri, str(tmp_path / "cache")).staged_files == 18
    assert len(gets) == 19 and gets[-1] == gets[9]  # the retry fetched the one missing file


def test_aws_profile_supplies_endpoint_and_credentials(s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    (tmp_path / "config").write_text(
        f"[profile quantlab-test]\nregion = us-east-1\nendpoint_url = {s3_endpoint}\n")
    (tmp_path / "credentials").write_text(
        "[quantlab-test]\naws_access_key_id = profile-key\naws_secret_access_key = profile-secret\n")
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_PROFILE", "quantlab-test")
    s3fs.S3FileSystem.clear_instance_cache()
    store = Store(f"s3://{s3_bucket}/lab")
    store.write_json("probe.json", {"via": "profile"})
    assert store.read_json("probe.json") == {"via": "profile"}


@pytest.mark.parametrize("command", ["runs", "demo"])
def test_missing_bucket_is_named(s3_bucket, command):
    out = quantlab(command, "--store", "s3://quantlab-no-such-bucket/lab")
    assert out.returncode == 2
    assert "no such bucket" in out.stderr and "Traceback" not in out.stderr
