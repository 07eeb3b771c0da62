"""Fault injection: storage that goes down or throttles, runs killed with SIGKILL, runs at once.

- The store: an endpoint restarted mid-call and 503 SlowDown answers are retried with backoff;
  when they persist the error says so (and is marked transient, for task retries).
- A run (the CLI in a subprocess, against a moto server that the test stops and restarts on
  the same port): an outage that outlasts the retries fails it clearly and leaves no
  manifest; the same run id then resumes, riding out a short outage, and completes.
- SIGKILL of the flow process during QAT, then again after the last artifact is stored and
  before the manifest: no worker outlives it, nothing is listed or pulled, and the third
  attempt completes with every QAT epoch exactly once.
- Two runs at once against one store, and aliases hammered from threads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import s3fs
import yaml

from quantlab import metrics, qat, registry
from quantlab.errors import CheckpointError, DataError, StoreError
from quantlab.store import Store
from tests.storage.faults import RestartableS3, ThrottlingProxy
from tests.support import make_config, upload_tree


@pytest.fixture(scope="module")
def flaky_s3():
    server = RestartableS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("QUANTLAB_STORAGE_OPTIONS", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


# -- the store -------------------------------------------------------------------------------
def test_endpoint_restart_mid_call_is_ridden_out_and_keeps_the_data(flaky_s3, aws_env):
    boto3.client("s3", endpoint_url=flaky_s3.endpoint).create_bucket(Bucket="restart")
    store = Store("s3://restart/lab", {"endpoint_url": flaky_s3.endpoint})
    store.write_bytes("a.bin", b"before the restart")
    flaky_s3.stop()
    back = threading.Timer(2.0, flaky_s3.start)
    back.start()
    try:
        assert store.read_bytes("a.bin") == b"before the restart"  # retried until it is back
    finally:
        back.join()


def test_throttling_is_retried_and_then_reported(s3_bucket, s3_endpoint, caplog):
    proxy = ThrottlingProxy(s3_endpoint)
    try:
        store = Store(f"s3://{s3_bucket}/lab", {"endpoint_url": proxy.endpoint}, retry_delays=(0.1,))
        proxy.throttle = 7  # s3fs tries 5 times inside each of our attempts: the second one passes
        store.write_bytes("a.bin", b"throttled 7 times")
        assert proxy.num_throttled == 7
        assert "storage error on write" in caplog.text and "retry 1 in 0.1s" in caplog.text
        assert store.read_bytes("a.bin") == b"throttled 7 times"
        proxy.throttle = -1  # for good
        with pytest.raises(StoreError, match=r"cannot write .*/b\.bin: the store is unreachable or "
                           r"overloaded \(SlowDown\) after 2 attempts in 0\.1 s") as e:
            store.write_bytes("b.bin", b"never")
        assert e.value.transient
        proxy.throttle = 0
        assert not store.exists("b.bin")
    finally:
        proxy.close()


def test_task_retries_skip_user_errors():
    from prefect.states import Failed
    from quantlab_tasks.steps import retry_transient

    def retried(exc: BaseException) -> bool:
        return retry_transient(None, None, Failed(data=exc))

    assert retried(StoreError("the store is unreachable or overloaded", transient=True))
    assert retried(RuntimeError("a bug, or something unforeseen"))
    assert not retried(StoreError("permission denied (AccessDenied)"))
    assert not retried(DataError("1 image(s) cannot be decoded"))
    assert not retried(CheckpointError("checkpoint does not exist"))


def test_leftovers_of_a_killed_writer_are_never_read(tmp_path):
    store = Store(str(tmp_path))
    row = {"run_id": "r1", "variant": "qat-x86", "backend": "eager", "epoch": 1, "world_size": 2,
           "train_loss": 0.5, "train_top1": 80.0,
           "eval_top1": 79.0, "eval_top5": 95.0, "observer_frozen": False, "bn_frozen": True,
           "lr": 1e-4, "seconds": 3.0, "images_per_sec": 100.0}
    rel = metrics.write_rows(store, "qat_epochs", [row], "r1", "epoch-0001", metrics.now())
    store.write_bytes(f"runs/r1/{registry.checkpoint_path(1)}", b"epoch 1")
    # What write_bytes leaves when killed before its os.replace: a hidden, partial temp file.
    for path in (f"runs/r1/{registry.checkpoint_path(2)}", rel.replace("epoch-0001", "epoch-0002")):
        folder, name = os.path.split(path)
        (tmp_path / folder / f".{name}.tmp-0badc0de").write_bytes(b"PAR1 half of a fi")
    assert qat.latest_checkpoint(store, "r1") == 1
    assert [r["epoch"] for r in metrics.read_rows(store, "qat_epochs", "r1")] == [1]
    assert registry.list_runs(store) == []


# -- runs --------------------------------------------------------------------------------------
class Cli:
    """`quantlab ...` started in the background; its stdout and stderr go to files."""

    def __init__(self, tmp: Path, name: str, args: list[str], env: dict[str, str]):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "quantlab_cli.app", *args],
                                         stdout=out, stderr=err, env=env)

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    @property
    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
        """Poll until `condition()` holds; fail if the command ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"ended before {what}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.output[-3000:]}"
            time.sleep(0.1)

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)


def cli_env(**extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200", **extra}


def write_config(path: Path, cfg, **qat) -> str:
    """The run config as YAML, with `qat` settings changed; no sensitivity analysis and no gate
    (the faults under test are in storage and processes; those stages only add minutes)."""
    settings = cfg.model_dump(mode="json")
    settings["qat"].update(qat)
    settings["sensitivity"]["enabled"] = settings["gate"]["enabled"] = False
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def processes_with(mark: str) -> list[int]:
    """Processes whose environment holds QUANTLAB_TEST_MARK=mark (a run and its workers)."""
    found = []
    needle = f"QUANTLAB_TEST_MARK={mark}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def no_processes_left(mark: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while processes_with(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not processes_with(mark)


def test_outage_fails_the_run_clearly_then_the_same_run_id_resumes(
        prefect, flaky_s3, aws_env, tiny_dataset, tiny_checkpoint, tmp_path):
    boto3.client("s3", endpoint_url=flaky_s3.endpoint).create_bucket(Bucket="outage")
    options = {"endpoint_url": flaky_s3.endpoint}
    root = Store("s3://outage", options)
    data = upload_tree(root, tiny_dataset, "datasets/shapes")
    root.write_bytes("models/float.pth", Path(tiny_checkpoint).read_bytes())
    cfg = make_config(data, root.uri("models/float.pth"), root.uri("lab"), str(tmp_path / "cache"))
    config = write_config(tmp_path / "run.yaml", cfg, enabled=False)
    store = Store(cfg.store, options)
    run_id = "outage-run"
    base = f"runs/{run_id}"
    env = cli_env(AWS_ENDPOINT_URL=flaky_s3.endpoint)

    # The endpoint goes down once the float model is stored, and stays down.
    first = Cli(tmp_path, "first", ["run", config, "--run-id", run_id], env)
    first.wait_for(lambda: store.exists(f"{base}/{registry.artifact_path('float')}"),
                   "the float artifact")
    with flaky_s3.outage():
        assert first.wait() == 2, first.output[-3000:]
    assert first.stderr.strip().splitlines()[-1].startswith("error: cannot ")
    assert "the store is unreachable or overloaded" in first.stderr.strip().splitlines()[-1]
    assert "after 6 attempts in 15.5 s" in first.stderr
    assert "Traceback" not in first.output
    assert store.exists(f"{base}/run.json") and not store.exists(f"{base}/manifest.json")
    assert registry.list_runs(store) == []

    # The same run id resumes; a short outage on the way is ridden out.
    second = Cli(tmp_path, "second", ["run", config, "--run-id", run_id], env)
    second.wait_for(lambda: f"resuming run {run_id}" in second.output, "the resumed run")
    with flaky_s3.outage():
        second.wait_for(lambda: "storage error on" in second.output, "a retried storage call")
    assert second.wait() == 0, second.output[-3000:]
    assert "Traceback" not in second.output
    [m] = registry.list_runs(store)
    assert m.run_id == run_id and [a.variant for a in m.artifacts] == ["float", "ptq-minmax", "ptq-x86"]
    for a in m.artifacts:
        registry.read_artifact(store, m, a.variant)
    rows = metrics.read_rows(store, "evaluations", run_id)
    assert sorted((r["variant"], r["runtime"]) for r in rows) == [("float", "torch"), ("ptq-minmax", "torch-onednn"), ("ptq-minmax", "torch-x86"),
         ("ptq-x86", "torch-onednn"), ("ptq-x86", "torch-x86")]  # once each
    assert registry.resolve(store, "latest") == run_id


def test_sigkill_during_qat_and_before_the_manifest_then_the_run_completes(
        prefect, tiny_dataset, tiny_checkpoint, tmp_path):
    cfg = make_config(tiny_dataset, tiny_checkpoint, str(tmp_path / "store"), str(tmp_path / "cache"))
    config = write_config(tmp_path / "run.yaml", cfg, epochs=2, freeze_bn_after=1,
                          freeze_observers_after=2)
    store = Store(cfg.store)
    run_id = "killed-run"
    base = Path(cfg.store) / "runs" / run_id
    mark = uuid.uuid4().hex
    env = cli_env(QUANTLAB_TEST_MARK=mark)
    args = ["run", config, "--run-id", run_id]

    def killed_when(name: str, path: Path) -> Cli:
        cli = Cli(tmp_path, name, args, env)
        cli.wait_for(path.exists, str(path.relative_to(base)))
        cli.proc.send_signal(signal.SIGKILL)
        cli.wait()
        assert no_processes_left(mark), f"left behind: {processes_with(mark)}"  # no orphan workers
        assert not (base / "manifest.json").exists()
        assert registry.list_runs(store) == []
        with pytest.raises(registry.NotFoundError, match="did not complete"):
            registry.pull(store, run_id, dest=str(tmp_path / "m.pt"))
        return cli

    killed_when("during-qat", base / registry.checkpoint_path(1))
    second = killed_when("before-manifest", base / registry.artifact_path(cfg.qat.name))
    assert "resuming from the checkpoint of epoch 1" in second.output

    third = Cli(tmp_path, "third", args, env)
    assert third.wait() == 0, third.output[-3000:]
    assert f"all 2 QAT epochs of qat-x86 in run {run_id} are already done" in third.output
    [m] = registry.list_runs(store)
    assert m.run_id == run_id and m.artifact(cfg.qat.name)
    for a in m.artifacts:
        registry.read_artifact(store, m, a.variant)
    epochs = metrics.read_rows(store, "qat_epochs", run_id)
    assert sorted(r["epoch"] for r in epochs) == [1, 2]  # each once, through two kills
    assert not processes_with(mark)


def test_two_runs_at_once_against_one_store(prefect, s3_bucket, tiny_dataset, tiny_checkpoint,
                                            tmp_path):
    root = Store(f"s3://{s3_bucket}")
    data = upload_tree(root, tiny_dataset, "datasets/shapes")
    root.write_bytes("models/float.pth", Path(tiny_checkpoint).read_bytes())
    # One cache too: both stage the same data at the same time (they take turns).
    cfg = make_config(data, root.uri("models/float.pth"), root.uri("lab"), str(tmp_path / "cache"))
    config = write_config(tmp_path / "run.yaml", cfg, enabled=False)
    runs = [Cli(tmp_path, f"run-{i}", ["run", config], cli_env()) for i in range(2)]
    for cli in runs:
        assert cli.wait() == 0, cli.output[-3000:]

    store = Store(cfg.store)
    manifests = registry.list_runs(store)
    assert len(manifests) == 2
    run_ids = {m.run_id for m in manifests}
    for m in manifests:
        assert m.run_id in "".join(cli.output for cli in runs)
        for a in m.artifacts:
            registry.read_artifact(store, m, a.variant)  # no artifact was overwritten by the other
        rows = metrics.read_rows(store, "evaluations", m.run_id)
        assert sorted((r["variant"], r["runtime"]) for r in rows) == [
            ("float", "torch"), ("ptq-minmax", "torch-onednn"), ("ptq-minmax", "torch-x86"),
            ("ptq-x86", "torch-onednn"), ("ptq-x86", "torch-x86")]
        timed = [r for r in rows if r["equivalent"] is not False]  # a diverged pair is not timed
        assert len(metrics.read_rows(store, "benchmarks", m.run_id)) == 2 * len(timed)
    assert len(store.find("metrics")) == 2 * 4
    for name in ("latest", "best", "latest-mobilenet_v2", "best-mobilenet_v2"):
        assert registry.read_alias(store, name).run_id in run_ids
    best = registry.read_alias(store, "best")
    assert best.variant == registry.load_manifest(store, best.run_id).selected.variant


def test_alias_writes_are_atomic_and_the_last_writer_wins(store_uri):
    store = Store(store_uri)
    when = metrics.now()
    registry.write_alias(store, "latest", "run-start", "mobilenet_v2", None, when)
    num_writers, num_writes = 4, 25
    written = {"run-start"} | {f"run-{w}-{i}" for w in range(num_writers) for i in range(num_writes)}
    done = threading.Event()
    reads: list[str] = []
    errors: list[BaseException] = []

    def write(w: int) -> None:
        for i in range(num_writes):
            registry.write_alias(store, "latest", f"run-{w}-{i}", "mobilenet_v2", f"ptq-{w}", when)

    def read() -> None:
        while not done.is_set():
            try:
                reads.append(registry.read_alias(store, "latest").run_id)
            except BaseException as e:  # a torn or half-written alias would land here
                errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(w,)) for w in range(num_writers)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    assert len(reads) > 0 and set(reads) <= written
    final = registry.read_alias(store, "latest")
    assert final.run_id in {f"run-{w}-{num_writes - 1}" for w in range(num_writers)}
    assert final.variant == f"ptq-{final.run_id.split('-')[1]}"
    assert [f.relpath for f in store.find("aliases")] == ["latest.json"]  # no temp files left
