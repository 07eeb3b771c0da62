"""Helpers shared by the tests of every layer: tiny real data, a test-sized run config, free
ports, background servers, the CLI as a subprocess. Fixtures live in conftest.py files.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

from quantlab.config import (
    FormatsConfig,
    TimingConfig,
    DataConfig,
    ModelConfig,
    QATConfig,
    RunConfig,
    TransformConfig,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLASSES = ("circle", "cross", "square")
TINY_TRANSFORMS = TransformConfig(input_size=32, resize_size=32, mean=(0.5, 0.5, 0.5),
                                  std=(0.25, 0.25, 0.25), train_crop_scale=(0.8, 1.0), hflip=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def make_config(data_uri: str, checkpoint: str, store: str, cache_dir: str, **overrides) -> RunConfig:
    """A run config sized for tests: tiny inputs, 2 calibration batches, 1 QAT epoch on 2 workers,
    TorchScript artifacts only (the shared `completed_run` exports to ONNX and OpenVINO too)."""
    base = RunConfig(
        model=ModelConfig(name="mobilenet_v2", checkpoint=checkpoint, kwargs={"width_mult": 0.25}),
        data=DataConfig(uri=data_uri, batch_size=8, eval_batch_size=16, transforms=TINY_TRANSFORMS),
        store=store, cache_dir=cache_dir,
        variants=[{**p.model_dump(), "num_calibration_batches": 2}
                  for p in RunConfig.model_fields["variants"].default],
        qat=QATConfig(epochs=1, freeze_bn_after=1, freeze_observers_after=1, lr=1e-3,
                      nproc_per_node=2, threads_per_worker=1, max_restarts=0),
        timing=TimingConfig(num_threads=1, batch_sizes=(1, 4), warmup=1, iterations=5),
        formats=FormatsConfig(export=(), nncf_peer=False),  # TorchScript only: see completed_run
    )
    return base.model_copy(update=overrides)


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


def run_quantlab(*args, cwd=None, columns=200):
    """`quantlab ARGS` in a fresh Python process, output captured."""
    return subprocess.run([sys.executable, "-m", "quantlab_cli.app", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "COLUMNS": str(columns)})
