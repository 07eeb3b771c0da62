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

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch

from quantlab.config import PTQ_PRESETS, DataConfig, FormatsConfig, RunConfig
from tests.support import (
    ROOT,
    TINY_TRANSFORMS,
    free_port,
    make_config,
    write_tiny_dataset,
)


def pytest_configure(config):
    """pytest resets warning filters per test: give it quantlab's deliberate ones."""
    from quantlab._deprecations import SILENCED

    for category, message in SILENCED:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


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
    from quantlab_flows import EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    results = str(tmp_path_factory.mktemp("prefect-results"))
    with prefect_test_harness(server_startup_timeout=EPHEMERAL_STARTUP_TIMEOUT_SECONDS), \
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}):
        yield


@pytest.fixture(scope="session")
def completed_run(prefect, tiny_dataset, tiny_checkpoint, tmp_path_factory):
    """One complete flow run, shared by the flow, registry and CLI tests."""
    from quantlab_flows.quantize import quantize

    tmp = tmp_path_factory.mktemp("flowrun")
    cfg = make_config(tiny_dataset, tiny_checkpoint, str(tmp / "store"), str(tmp / "cache"),
                      formats=FormatsConfig())  # every format and the nncf-ptq peer
    pt2e = PTQ_PRESETS["pt2e-x86"].model_copy(update={"num_calibration_batches": 2})
    cfg = cfg.model_copy(update={  # and both stacks: pt2e-x86, qat-pt2e-x86 beside the eager ones
        "variants": (*cfg.variants, pt2e),
        "qat": cfg.qat.model_copy(update={"backends": ("eager", "pt2e")})})
    return cfg, quantize(cfg)
