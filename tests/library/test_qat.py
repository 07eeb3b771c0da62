"""Distributed QAT: real gloo workers under torchrun, on one node, as two nodes, and killed.

Every test here launches real worker processes (2 workers x 1 thread, tiny model and data).
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading

import psutil
import pytest
import torch
import yaml

from quantlab import metrics, pipeline, qat
from quantlab.config import parse_config
from quantlab.distributed import LaunchError, launch, torchrun_command
from quantlab.errors import ConfigError
from quantlab.store import Store
from tests.support import (
    ROOT,  # noqa: E402
    free_port,
)

WORKER_MODULES = ("quantlab.qat", "tests.library.qat_probe")


def with_qat(cfg, **qat_fields):
    return cfg.model_copy(update={"qat": cfg.qat.model_copy(update=qat_fields)})


@pytest.fixture(autouse=True)
def no_stray_workers():
    """Whatever a test does, no torchrun or worker process outlives it."""
    yield
    for p in launched_processes():
        p.kill()


def launched_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "torch.distributed.run" in cmd or any(m in cmd for m in WORKER_MODULES):
            out.append(p)
    return out


def kill_worker(rank: int) -> int:
    """SIGKILL the QAT worker of global rank `rank` (a descendant of this process); its pid."""
    for p in launched_processes():
        if "torch.distributed.run" not in p.cmdline() and p.environ().get("RANK") == str(rank):
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
            return p.pid
    raise AssertionError(f"no QAT worker of rank {rank} is running")


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
OBSERVER_STATE = ("min_val", "max_val", "scale", "zero_point")


def _buffers(state: dict, suffixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in state.items() if k.endswith(suffixes)}


def check_freezing(before: dict, after: dict, bn_trained: bool, observers_trained: bool,
                   observers_frozen: bool, epoch: int) -> None:
    """An epoch's effect on the QAT model's state, from the state dicts before and after it:
    BN statistics and observer ranges change iff they were not frozen during the epoch, and
    the observers' enabled flags say whether they are frozen now."""
    bn = [k for k in _buffers(after, BN_STATS) if not torch.equal(before[k], after[k])]
    assert bool(bn) == bn_trained, f"epoch {epoch}: BN statistics changed: {bn[:3]}"
    if bn_trained:
        tracked = _buffers(after, ("num_batches_tracked",))
        assert all(after[k] > before[k] for k in tracked), f"epoch {epoch}: a BN did not train"
    ranges = [k for k in _buffers(after, OBSERVER_STATE) if not torch.equal(before[k], after[k])]
    assert bool(ranges) == observers_trained, f"epoch {epoch}: ranges changed: {ranges[:3]}"
    flags = {int(v) for v in _buffers(after, ("observer_enabled",)).values()}
    assert flags == {0 if observers_frozen else 1}, f"epoch {epoch}: observer_enabled {flags}"
    assert {int(v) for v in _buffers(after, ("fake_quant_enabled",)).values()} == {1}


def check_qat_result(cfg, run_id: str, num_epochs: int, world_size: int,
                     frozen: list[tuple[bool, bool]]) -> None:
    """The shape of a finished QAT stage: rows, checkpoints, and an exportable final model.

    `frozen`: (BN frozen, observers frozen) after each epoch, as the test's schedule says;
    checked in the rows and in the model state each epoch's checkpoint holds."""
    assert len(frozen) == num_epochs
    store = Store(cfg.store)
    rows = sorted(metrics.read_rows(store, "qat_epochs", run_id), key=lambda r: r["epoch"])
    assert [r["epoch"] for r in rows] == list(range(1, num_epochs + 1))  # each exactly once
    assert all(r["world_size"] == world_size and r["images_per_sec"] > 0 for r in rows)
    assert all(0 <= r["eval_top1"] <= 100 for r in rows)
    assert [(r["bn_frozen"], r["observer_frozen"]) for r in rows] == frozen
    assert qat.latest_checkpoint(store, run_id) == num_epochs
    staged = pipeline.stage(cfg)
    state = qat.build_qat_model(cfg, len(staged.classes)).state_dict()  # before epoch 1
    was = (False, False)
    for epoch, (bn_frozen, observers_frozen) in enumerate(frozen, 1):
        ckpt = qat.load_checkpoint(store, run_id, epoch)
        assert (ckpt["epoch"], ckpt["bn_frozen"], ckpt["observers_frozen"]) == (
            epoch, bn_frozen, observers_frozen)
        check_freezing(state, ckpt["model"], bn_trained=not was[0], observers_trained=not was[1],
                       observers_frozen=observers_frozen, epoch=epoch)
        state, was = ckpt["model"], (bn_frozen, observers_frozen)
    assert len(ckpt["rng_states"]) == world_size
    run = pipeline.RunInfo.model_validate(store.read_json(f"runs/{run_id}/run.json"))
    result = pipeline.export_qat(cfg, staged, run)
    assert result.method == "qat" and result.eval.num_images == staged.num_val
    assert result.artifact.bytes > 0
    # The last epoch's distributed evaluation (shards, all_reduce) = the final model's, in one process.
    assert (rows[-1]["eval_top1"], rows[-1]["eval_top5"]) == (result.eval.top1, result.eval.top5)


class Training:
    """pipeline.train_qat in a thread, its output lines and epoch events collected."""

    def __init__(self, cfg, run, staged, num_classes):
        self.lines: list[str] = []
        self.epochs: queue.Queue[int] = queue.Queue()
        self.rows = self.error = None
        self.thread = threading.Thread(target=self._run, args=(cfg, run, staged, num_classes),
                                       daemon=True)
        self.thread.start()

    def _on_line(self, line: str) -> None:
        self.lines.append(line)
        event = qat.parse_event(line)
        if event and event["event"] == "epoch":
            self.epochs.put(event["epoch"])

    def _run(self, cfg, run, staged, num_classes) -> None:
        try:
            self.rows = pipeline.train_qat(cfg, staged, run, on_line=self._on_line)
        except Exception as e:  # noqa: BLE001 (the test inspects it)
            self.error = e

    def join(self) -> None:
        self.thread.join(timeout=400)
        assert not self.thread.is_alive(), "QAT did not finish"

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


# -- one node ----------------------------------------------------------------------------------
def test_qat_on_two_gloo_workers_then_export(run_ctx):
    cfg, run, staged, num_classes = run_ctx
    cfg = with_qat(cfg, epochs=2, freeze_bn_after=1, freeze_observers_after=2, max_train_batches=2)
    lines = []
    rows = pipeline.train_qat(cfg, staged, run, on_line=lines.append)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert any("[rank 0/2] qat-x86 epoch 1/2" in line for line in lines)
    assert any(qat.parse_event(line) for line in lines)
    # 72 training images: each of the 2 ranks gets its own 36
    assert sum("a shard of 36 of 72 training images, 1 threads" in line for line in lines) == 2
    check_qat_result(cfg, run.run_id, num_epochs=2, world_size=2,
                     frozen=[(True, False), (True, True)])
    # Once every epoch is done, a re-run launches nothing and retrains nothing.
    again = pipeline.train_qat(cfg, staged, run, on_line=lines.append)
    assert again == rows
    assert lines[-1] == f"all 2 QAT epochs of qat-x86 in run {run.run_id} are already done"


def test_ranks_agree_on_ranges_and_freezing_and_see_distinct_shards(run_ctx, tmp_path):
    cfg, run, staged, num_classes = run_ctx
    # Observers still update during the last epoch, so only the end-of-epoch broadcast makes
    # the ranks' ranges equal; BN freezes at epoch 1, observers at epoch 2 (the last).
    cfg = with_qat(cfg, epochs=2, freeze_bn_after=1, freeze_observers_after=2, max_train_batches=3)
    job = qat.QatJob(config=cfg, staged=staged, run_id=run.run_id, run_date=run.created_at,
                     num_classes=num_classes)
    (tmp_path / "job.json").write_text(job.model_dump_json())
    out = tmp_path / "probe.json"
    launch("tests.library.qat_probe", ["--job", str(tmp_path / "job.json"), "--out", str(out)],
           nproc_per_node=2, on_line=lambda line: None,
           env={"PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})
    rank0, rank1 = json.loads(out.read_text())
    assert len(rank0["ranges"]) > 100
    assert rank1["ranges"] == rank0["ranges"]  # bit for bit
    assert rank0["observer_enabled"] == rank1["observer_enabled"] == [0]
    assert rank0["bn_frozen"] == rank1["bn_frozen"] == [True]
    assert not set(rank0["shard"]) & set(rank1["shard"])
    assert sorted(rank0["shard"] + rank1["shard"]) == list(range(rank0["num_images"]))


# -- two nodes on loopback ------------------------------------------------------------------
def test_two_nodes_rendezvous_on_loopback(tiny_config, tmp_path):
    """Two `quantlab qat` launchers, 1 worker each, meet at a c10d rendezvous on 127.0.0.1."""
    cfg = with_qat(tiny_config, epochs=2, freeze_bn_after=1, freeze_observers_after=2,
                   max_train_batches=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "quantlab_cli.app", "qat", str(config), "--run-id", "two-nodes",
           "--nnodes", "2", "--rdzv-endpoint", endpoint, "--nproc-per-node", "1"]
    env = {**os.environ, "COLUMNS": "200"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=400)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    # Each node ran one of the two ranks; both print the job's epoch table.
    hosted = sorted("[rank 0/2]" in out for out in outputs)
    assert hosted == [False, True], outputs
    assert all("[rank 1/2]" in out for out in outputs if "[rank 0/2]" not in out)
    assert all("quantlab run" in out and "two-nodes" in out for out in outputs)
    check_qat_result(cfg, "two-nodes", num_epochs=2, world_size=2,
                     frozen=[(True, False), (True, True)])


# -- faults --------------------------------------------------------------------------------
def test_sigkilled_worker_is_restarted_and_training_resumes(run_ctx):
    cfg, run, staged, num_classes = run_ctx
    # BN frozen after epoch 1, observers after 2: the resumed group must freeze them again
    cfg = with_qat(cfg, epochs=3, freeze_bn_after=1, freeze_observers_after=2,
                   max_train_batches=2, max_restarts=1)
    training = Training(cfg, run, staged, num_classes)
    assert training.epochs.get(timeout=400) == 1
    kill_worker(rank=0)  # the rank that writes; it has just checkpointed epoch 1
    resumed_from = qat.latest_checkpoint(Store(cfg.store), run.run_id)  # final: rank 0 is dead
    training.join()
    assert training.error is None, training.log[-8000:]
    assert 1 <= resumed_from < 3
    assert f"resuming from the checkpoint of epoch {resumed_from}" in training.log
    check_qat_result(cfg, run.run_id, num_epochs=3, world_size=2,
                     frozen=[(True, False), (True, True), (True, True)])


def test_rerun_after_a_crash_resumes_from_the_runs_checkpoints(run_ctx):
    cfg, run, staged, num_classes = run_ctx
    cfg = with_qat(cfg, epochs=3, freeze_bn_after=2, freeze_observers_after=3,
                   max_train_batches=2, max_restarts=0).model_copy(update={"run_id": run.run_id})
    training = Training(cfg, run, staged, num_classes)
    assert training.epochs.get(timeout=400) == 1
    kill_worker(rank=0)
    training.join()
    assert isinstance(training.error, LaunchError)  # no restarts left: the stage failed
    done = qat.latest_checkpoint(Store(cfg.store), run.run_id)
    assert 1 <= done < 3
    before = {r["epoch"]: r["created_at"] for r in pipeline.qat_epochs(pipeline.store_of(cfg), run)}

    # Re-running the flow with the run's id resumes the run, and QAT its checkpoints.
    rerun = pipeline.start_run(cfg)
    assert rerun.resumed and rerun.created_at == run.created_at
    lines = []
    rows = pipeline.train_qat(cfg, staged, rerun, on_line=lines.append)
    assert f"resuming from the checkpoint of epoch {done}" in "\n".join(lines)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["created_at"] == before[r["epoch"]] for r in rows if r["epoch"] <= done)  # not redone
    check_qat_result(cfg, run.run_id, num_epochs=3, world_size=2,
                     frozen=[(False, False), (True, False), (True, True)])


# -- launch settings ----------------------------------------------------------------------------
def test_torchrun_command_line():
    assert torchrun_command("quantlab.qat", ["--job", "j"], 2, max_restarts=3)[2:] == [
        "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=3", "--standalone",
        "-m", "quantlab.qat", "--job", "j"]
    assert torchrun_command("quantlab.qat", [], 1, nnodes="1:4", rdzv_endpoint="h:29400",
                            rdzv_id="r1", rdzv_timeout=60)[5:-2] == [
        "--nnodes=1:4", "--rdzv-backend=c10d", "--rdzv-endpoint=h:29400", "--rdzv-id=r1",
        "--rdzv-conf=join_timeout=60"]


@pytest.mark.parametrize("qat_fields, needle", [
    ({"nnodes": "2"}, "qat.nnodes=2 needs qat.rdzv_endpoint"),
    ({"nnodes": "3:2", "rdzv_endpoint": "h:1"}, "nnodes '3:2' must be N or MIN:MAX"),
    ({"nnodes": "2", "rdzv_endpoint": "node-0"}, "rdzv_endpoint 'node-0' must be HOST:PORT"),
    ({"rdzv_id": "a b"}, "rdzv_id 'a b' must be letters"),
])
def test_bad_launch_settings(qat_fields, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config({"model": {"checkpoint": "f.pth"}, "data": {"uri": "d"}, "qat": qat_fields})


# -- Kubernetes ------------------------------------------------------------------------------
def test_k8s_manifest_is_valid_and_its_pods_form_one_qat_job(tmp_path):
    """deploy/k8s/qat-job.yaml: valid Kubernetes objects whose command `quantlab qat` accepts,
    with a rendezvous endpoint that names pod 0 through the headless Service.

    (No cluster here: this checks the manifest offline, it does not run it.)
    """
    import kubernetes_validate
    import typer.main
    from quantlab_cli.app import app, qat_config

    with open(os.path.join(ROOT, "deploy", "k8s", "qat-job.yaml")) as f:
        docs = {d["kind"]: d for d in yaml.safe_load_all(f)}
    for doc in docs.values():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    broken = {**docs["Job"], "spec": {**docs["Job"]["spec"], "completionMod": "Indexed"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)

    job, service, config_map = docs["Job"], docs["Service"], docs["ConfigMap"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    args = [a.replace("$(RUN_ID)", env["RUN_ID"]) for a in container["command"]]
    assert args[:2] == ["quantlab", "qat"]

    # Parse the command with the real CLI, then build the config it would run.
    cli = typer.main.get_command(app)
    qat_cmd = cli.get_command(None, "qat")
    params = qat_cmd.make_context("qat", args[2:]).params
    config_path = params["config"]
    (mount,) = [m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    local = tmp_path / "run.yaml"
    local.write_text(config_map["data"][os.path.relpath(config_path, mount["mountPath"])])
    cfg = qat_config(str(local), **{k: v for k, v in params.items()
                                    if k not in ("config", "storage_option")})
    q = cfg.qat
    assert q.nnodes == str(spec["completions"]) and cfg.run_id == env["RUN_ID"]
    port = service["spec"]["ports"][0]["port"]
    assert q.rdzv_endpoint == f"{job['metadata']['name']}-0.{service['metadata']['name']}:{port}"
    assert port in [p["containerPort"] for p in container["ports"]]
    assert q.nproc_per_node * q.threads_per_worker == int(container["resources"]["requests"]["cpu"])
    assert cfg.store.startswith("s3://")  # shared by the nodes
    assert torchrun_command("quantlab.qat", [], q.nproc_per_node, q.nnodes, q.rdzv_endpoint,
                            cfg.run_id, q.max_restarts, q.rdzv_timeout)[3:9] == [
        "--nproc-per-node=2", "--max-restarts=3", "--nnodes=2", "--rdzv-backend=c10d",
        "--rdzv-endpoint=quantlab-qat-0.quantlab-qat:29400", f"--rdzv-id={env['RUN_ID']}"]


def test_val_shards_partition_the_evaluated_images(run_ctx):
    from quantlab import data

    cfg, _, staged, _ = run_ctx
    shards = [data.loader(staged, cfg.data, "val", train=False, shard=(rank, 3, 10)).dataset.indices
              for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]


def test_quantlab_qat_refuses_bad_launch_flags_before_any_work(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {checkpoint: f.pth}\ndata: {uri: d}\n")
    out = subprocess.run([sys.executable, "-m", "quantlab_cli.app", "qat", str(config), "--run-id", "r1",
                          "--nnodes", "2", "--store", str(tmp_path / "store")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "qat.nnodes=2 needs qat.rdzv_endpoint" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "store").exists()
