"""Shared fixtures: tiny real data, tiny models, a real S3 endpoint, a real Prefect API.

- `s3_endpoint`: moto's standalone server on a free loopback port, started by the session (the
  way s3fs tests itself); `s3_bucket` gives each test a fresh bucket with AWS_* set.
- `store_uri`: the same test against a local folder, memory:// and S3.
- `tiny_dataset` / `tiny_checkpoint` / `tiny_config`: a 3-class ImageFolder of 16x16 PNGs and a
  width-0.25 MobileNetV2 trained on it for some seconds (~90% val top-1).
- `prefect`: a session-wide `prefect_test_harness` (a real, temporary Prefect API).
- `prefect_server`: `prefect server start` (API and UI) on a free loopback port, with its own
  PREFECT_HOME, for the tests of deployments, workers, cancellation and the UI.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from quantlab.config import BenchConfig, DataConfig, ModelConfig, QATConfig, RunConfig, TransformConfig

TINY_CLASSES = ("circle", "cross", "square")
TINY_TRANSFORMS = TransformConfig(input_size=32, resize_size=32, mean=(0.5, 0.5, 0.5),
                                  std=(0.25, 0.25, 0.25), train_crop_scale=(0.8, 1.0), hflip=False)


def pytest_configure(config):
    """pytest resets warning filters per test: give it quantlab's deliberate ones."""
    from quantlab._deprecations import SILENCED

    for category, message in SILENCED:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- S3 ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server for the whole session (real HTTP, real botocore/s3fs clients)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket; AWS_ENDPOINT_URL and test credentials in the environment."""
    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(params=["local", "memory", "s3"])
def store_uri(request, tmp_path):
    """The same storage test against every backend."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://quantlab-{uuid.uuid4().hex[:8]}"
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/lab"


# -- tiny data and models -------------------------------------------------------------------
def _shape_image(kind: str, rng: np.random.Generator, size: int = 16) -> bytes:
    img = np.full((size, size, 3), rng.integers(0, 40), dtype=np.uint8)
    c, r = size // 2 + rng.integers(-2, 3), int(rng.integers(4, 7))
    yy, xx = np.mgrid[:size, :size]
    if kind == "circle":
        mask = (yy - c) ** 2 + (xx - c) ** 2 <= r * r
    elif kind == "cross":
        mask = (abs(yy - c) <= 1) | (abs(xx - c) <= 1)
    else:
        mask = (abs(yy - c) <= r) & (abs(xx - c) <= r) & ~((abs(yy - c) < r - 1) & (abs(xx - c) < r - 1))
    img[mask] = rng.integers(180, 255, size=3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_dataset(root: str, per_class: tuple[int, int] = (24, 8), seed: int = 0) -> str:
    """A 3-class ImageFolder (train/ and val/) of 16x16 PNG shapes under `root`."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for cls in TINY_CLASSES:
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(n):
                with open(os.path.join(root, split, cls, f"{i:03d}.png"), "wb") as f:
                    f.write(_shape_image(cls, rng))
    return root


def upload_tree(store, local: str, prefix: str) -> str:
    """Copy a local folder into a quantlab Store under `prefix`; returns its URI."""
    files = {}
    for root, _, names in os.walk(local):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[f"{prefix}/{os.path.relpath(path, local)}"] = f.read()
    store.write_many(files)
    return store.uri(prefix)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    return write_tiny_dataset(str(tmp_path_factory.mktemp("data") / "shapes"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_dataset) -> str:
    """A width-0.25 MobileNetV2 state_dict trained on the tiny shapes to well above chance.

    Accuracy matters to the sensitivity, fallback and regression-gate tests (SGD for 4 epochs
    left the model at chance, 33%); Adam for 16 epochs reaches ~90% val top-1.
    """
    from quantlab import data, models
    from quantlab.train import train_one_epoch

    torch.manual_seed(0)
    staged = data.stage(tiny_dataset, str(tmp_path_factory.mktemp("cache")))
    cfg = DataConfig(uri=tiny_dataset, batch_size=8, transforms=TINY_TRANSFORMS)
    model = models.build("mobilenet_v2", num_classes=3, width_mult=0.25)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = data.loader(staged, cfg, "train", train=True)
    for _ in range(16):
        train_one_epoch(model, loader, optimizer)
    path = str(tmp_path_factory.mktemp("ckpt") / "float.pth")
    torch.save(model.state_dict(), path)
    return path


def make_config(data_uri: str, checkpoint: str, store: str, cache_dir: str, **overrides) -> RunConfig:
    """A run config sized for tests: tiny inputs, 2 calibration batches, 1 QAT epoch on 2 workers."""
    base = RunConfig(
        model=ModelConfig(name="mobilenet_v2", checkpoint=checkpoint, kwargs={"width_mult": 0.25}),
        data=DataConfig(uri=data_uri, batch_size=8, eval_batch_size=16, transforms=TINY_TRANSFORMS),
        store=store, cache_dir=cache_dir,
        variants=[{**p.model_dump(), "num_calibration_batches": 2}
                  for p in RunConfig.model_fields["variants"].default],
        qat=QATConfig(epochs=1, freeze_bn_after=1, freeze_observers_after=1, lr=1e-3,
                      nproc_per_node=2, threads_per_worker=1, max_restarts=0),
        bench=BenchConfig(num_threads=1, batch_sizes=(1, 4), warmup=1, iterations=5),
    )
    return base.model_copy(update=overrides)


@pytest.fixture
def tiny_config(tiny_dataset, tiny_checkpoint, tmp_path) -> RunConfig:
    return make_config(tiny_dataset, tiny_checkpoint, str(tmp_path / "store"), str(tmp_path / "cache"))


@pytest.fixture
def run_ctx(tiny_config):
    """A started run of `tiny_config`: (config, RunInfo, StagedData, num_classes)."""
    from quantlab import pipeline

    num_classes = pipeline.preflight(tiny_config)
    run = pipeline.start_run(tiny_config)
    staged = pipeline.stage(tiny_config)
    return tiny_config, run, staged, num_classes


# -- the command line ------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def quantlab_cli():
    """`quantlab ARGS` in a new process per call, for commands that stop before a flow starts.

    The processes are forked from one that imported quantlab already (tests/cli_zygote.py):
    each call costs a fraction of a second instead of re-importing torch.
    `env` entries override the environment (None removes a variable).
    """
    proc = subprocess.Popen([sys.executable, "-m", "tests.cli_zygote"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def run(*args: str, env: dict | None = None, cwd: str | None = None,
            supported_engines: list[str] | None = None) -> subprocess.CompletedProcess:
        child_env = {**os.environ, "COLUMNS": "200", **(env or {})}
        request = {"argv": list(args), "cwd": str(cwd or os.getcwd()),
                   "env": {k: v for k, v in child_env.items() if v is not None},
                   "supported_engines": supported_engines}
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        return subprocess.CompletedProcess(["quantlab", *args], reply["returncode"],
                                           reply["stdout"], reply["stderr"])

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)


# -- Prefect --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect(tmp_path_factory):
    """A real temporary Prefect API (SQLite) for the session; task results in a temp folder."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = str(tmp_path_factory.mktemp("prefect-results"))
    with prefect_test_harness(server_startup_timeout=60), \
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}):
        yield


@dataclass
class PrefectServer:
    url: str        # the UI
    api_url: str
    env: dict       # the environment of a process that talks to this server

    @contextmanager
    def settings(self):
        """This process's Prefect client, pointed at the server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}):
            yield


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return result


@contextmanager
def background(cmd: list[str], env: dict, log_path, ready, what: str, cwd=None):
    """A long-running command (server, worker, serve) in its own session, output to
    `log_path`; yields once `ready()` is true, and is stopped (the whole session) at the end."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)

    def check() -> bool:
        assert proc.poll() is None, f"{what}: the process exited: " + log_path.read_text()[-3000:]
        return ready()
    try:
        wait_until(check, 180, what, interval=1)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on loopback: a real API and UI, with its own PREFECT_HOME.

    The scheduler service is off, so that the deployments' cron schedules create no runs
    while tests use the server.
    """
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    server_env.update(PREFECT_HOME=str(home / "server"), PREFECT_UI_API_URL=f"{url}/api",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False
    with background([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                     "--port", str(port)], server_env, home / "server.log", healthy,
                    "prefect server start"):
        yield PrefectServer(url=url, api_url=f"{url}/api",
                            env={**server_env, "PREFECT_HOME": str(home / "client"),
                                 "PREFECT_API_URL": f"{url}/api"})
