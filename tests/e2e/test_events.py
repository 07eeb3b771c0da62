"""Event-driven re-quantization for real: `prefect server start`, `quantlab deploy` of
deploy/prefect.yaml (the quantize deployment's trigger, the watcher deployment), a process
worker of the pool, and checkpoints landing in moto's S3 server.

The deployments are the file's own, with their parameters made tiny (tiny data, no QAT, one
PTQ variant, no sensitivity, no gate timing) and pointed at the test's buckets; the names
stay, so that re-deploying replaces what another test module registered under them.
"""

from __future__ import annotations

import io
import os
import sys
import uuid

import pytest
import torch
import yaml
from quantlab_flows.deployments import PREFECT_FILE, PROJECT_ROOT

from quantlab.checkpoints import LANDED, REJECTED, CheckpointRegistry
from quantlab.registry import load_manifest, read_alias
from quantlab.store import Store
from tests.support import background, make_config, wait_until

POOL = "quantlab-process"
QUANTIZE = "quantize/mobilenet-v2-nightly"
WATCH = "quantlab-watch/checkpoints"
WAIT = 900  # seconds: generous, the machine is shared
# Runs of the deployments before this module registered them (tests/e2e/test_deployments.py
# runs the same deployment on the same server) are not this module's.
SINCE: dict[str, object] = {}


@pytest.fixture(scope="module")
def buckets(s3_endpoint):
    """A models bucket (where training writes) and a lab bucket (the quantlab store)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing-key-id", aws_secret_access_key="testing-secret-key")
    names = {k: f"{k}-{uuid.uuid4().hex[:10]}" for k in ("models", "lab")}
    for name in names.values():
        s3.create_bucket(Bucket=name)
    return names


@pytest.fixture(scope="module")
def env(prefect_server, s3_endpoint):
    """The environment of the CLI, the worker and its flow runs: the server and the S3 endpoint."""
    return {**prefect_server.env, "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def s3_env(env):
    """This process's S3 client settings, as the worker's."""
    import s3fs

    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys})
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def deployed(buckets, env, tiny_dataset, tiny_checkpoint, tmp_path_factory):
    """deploy/prefect.yaml's quantize and watcher deployments, tiny, registered by `quantlab deploy`."""
    tmp = tmp_path_factory.mktemp("events")
    cfg = make_config(tiny_dataset, tiny_checkpoint, f"s3://{buckets['lab']}/lab", str(tmp / "cache"))
    cfg = cfg.model_copy(update={"variants": cfg.variants[:1],
                                 "qat": cfg.qat.model_copy(update={"enabled": False}),
                                 "sensitivity": cfg.sensitivity.model_copy(update={"enabled": False}),
                                 "gate": cfg.gate.model_copy(update={"enabled": False})})
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    quantize, watch = by_name["mobilenet-v2-nightly"], by_name["checkpoints"]
    quantize["parameters"] = {"config": cfg.model_dump(mode="json")}
    watch["parameters"] = {"store": cfg.store, "model": "mobilenet_v2",
                           "prefixes": [f"s3://{buckets['models']}/mobilenet_v2/"]}
    spec["deployments"] = [quantize, watch]
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    from datetime import datetime, timezone

    SINCE["created"] = datetime.now(timezone.utc)
    out = run_quantlab_env(env, "deploy", "--prefect-file", str(path), cwd=tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return cfg


@pytest.fixture(scope="module")
def worker(deployed, prefect_server, env, tmp_path_factory):
    from prefect.client.orchestration import get_client

    def online() -> bool:
        with prefect_server.settings(), get_client(sync_client=True) as client:
            return any(w.status == "ONLINE" for w in client.read_workers_for_work_pool(POOL))
    with background([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], env,
                    tmp_path_factory.mktemp("events-worker") / "worker.log", online,
                    "the worker to come online", cwd=PROJECT_ROOT) as proc:
        yield proc


def run_quantlab_env(env, *args, cwd):
    import subprocess

    return subprocess.run([sys.executable, "-m", "quantlab_cli.app", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def deployment_runs(server, name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with server.settings(), get_client(sync_client=True) as client:
        d = client.read_deployment_by_name(name)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[d.id])))
    return [r for r in runs if r.created >= SINCE["created"]]


def events_named(server, name: str):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    with server.settings(), get_client(sync_client=True) as client:
        return client.read_events(filter=EventFilter(event=EventNameFilter(name=[name])),
                                  limit=50).events


def final(server, run_id):
    from prefect.client.orchestration import get_client

    def done():
        with server.settings(), get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
        return run.state.is_final() and run
    return wait_until(done, WAIT, f"flow run {run_id} to finish", interval=2)


def run_watcher(server):
    from prefect.deployments import run_deployment

    with server.settings():
        run = run_deployment(WATCH, timeout=0)
    run = final(server, run.id)
    assert run.state.is_completed(), run.state
    return run


def quantize_runs_after(server, count: int):
    """Wait until the quantize deployment has `count` runs, all final; returns them, oldest first."""
    runs = wait_until(lambda: len(r := deployment_runs(server, QUANTIZE)) >= count and r, WAIT,
                      f"{count} quantize run(s) of the deployment", interval=2)
    return sorted((final(server, r.id) for r in runs), key=lambda r: r.created)


def checkpoint_bytes(path: str, nudge: float = 0.0) -> bytes:
    state = torch.load(path, weights_only=True)
    if nudge:
        key = next(k for k, v in state.items() if v.is_floating_point() and "weight" in k)
        state[key] = state[key] + nudge
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_deploy_registers_the_trigger_as_an_automation(deployed, prefect_server):
    from prefect.client.orchestration import get_client

    with prefect_server.settings(), get_client(sync_client=True) as client:
        d = client.read_deployment_by_name(QUANTIZE)
        automations = client.read_resource_related_automations(f"prefect.deployment.{d.id}")
        watcher = client.read_deployment_by_name(WATCH)
    assert len(automations) == 1
    trigger = automations[0].trigger
    assert trigger.expect == {LANDED}
    assert trigger.match.model_dump() == {"prefect.resource.id": "quantlab.checkpoint.*",
                                          "quantlab.model": "mobilenet_v2"}
    action = automations[0].actions[0]
    assert action.type == "run-deployment" and action.deployment_id == d.id
    assert action.parameters["checkpoint"] == "{{ event.payload.checkpoint }}"
    assert action.parameters["trigger"]["event_id"] == "{{ event.id | string }}"
    assert [s.schedule.interval.total_seconds() for s in watcher.schedules] == [300]
    assert watcher.schedules[0].active is False


def test_a_landed_checkpoint_is_quantized_once_and_promoted(deployed, worker, buckets, s3_env,
                                                             prefect_server, tiny_checkpoint):
    models = Store(f"s3://{buckets['models']}")
    lab = Store(deployed.store)
    first = checkpoint_bytes(tiny_checkpoint)
    models.write_bytes("mobilenet_v2/2026-12-01/model.pth", first)
    run_watcher(prefect_server)
    (run1,) = quantize_runs_after(prefect_server, 1)
    assert run1.state.is_completed(), run1.state
    assert run1.parameters["checkpoint"] == models.uri("mobilenet_v2/2026-12-01/model.pth")
    best = read_alias(lab, "best-mobilenet_v2")
    manifest = load_manifest(lab, best.run_id)
    assert manifest.run_id == f"flow-{run1.id}"
    assert manifest.config["model"]["checkpoint"] == run1.parameters["checkpoint"]
    assert manifest.trigger.kind == "watcher" and manifest.trigger.event_id
    (landed,) = events_named(prefect_server, LANDED)
    assert manifest.trigger.event_id == str(landed.id)
    assert landed.payload["checkpoint"] == run1.parameters["checkpoint"]

    # The same bytes under another key: no event, so no run.
    models.write_bytes("mobilenet_v2/2026-12-02/model.pth", first)
    run_watcher(prefect_server)
    # A different checkpoint: exactly one more run, which moves best-mobilenet_v2.
    models.write_bytes("mobilenet_v2/2026-12-03/model.pth", checkpoint_bytes(tiny_checkpoint, 1e-3))
    run_watcher(prefect_server)
    runs = quantize_runs_after(prefect_server, 2)
    assert len(runs) == 2 and runs[1].state.is_completed(), runs[1].state
    assert runs[1].parameters["checkpoint"] == models.uri("mobilenet_v2/2026-12-03/model.pth")
    assert read_alias(lab, "best-mobilenet_v2").run_id == f"flow-{runs[1].id}"
    assert len(events_named(prefect_server, LANDED)) == 2   # the duplicate emitted nothing
    assert len(deployment_runs(prefect_server, QUANTIZE)) == 2
    seen = CheckpointRegistry(lab)
    record = seen.get(manifest.trigger.checkpoint_sha256)
    assert record.outcome == "quantized" and record.run_id == manifest.run_id
    assert record.uris == [models.uri("mobilenet_v2/2026-12-01/model.pth"),
                           models.uri("mobilenet_v2/2026-12-02/model.pth")]


def test_a_bad_checkpoint_is_rejected_once(deployed, worker, buckets, s3_env, env, prefect_server,
                                           tmp_path):
    """`quantlab announce` of a file that is not a checkpoint: one failed run with the reason,
    a rejected event, and a second announce is refused from the seen-set."""
    models = Store(f"s3://{buckets['models']}")
    models.write_bytes("mobilenet_v2/broken/model.pth", b"not a torch file")
    uri = models.uri("mobilenet_v2/broken/model.pth")
    before = len(deployment_runs(prefect_server, QUANTIZE))
    out = run_quantlab_env(env, "announce", uri, "--model", "mobilenet_v2", "--store",
                           deployed.store, cwd=tmp_path)
    assert out.returncode == 0 and f"emitted {LANDED}" in out.stdout, out.stdout + out.stderr
    runs = quantize_runs_after(prefect_server, before + 1)
    bad = runs[-1]
    assert bad.parameters["checkpoint"] == uri and bad.state.is_failed()
    assert "is not a torch file" in bad.state.message
    rejected = wait_until(lambda: events_named(prefect_server, REJECTED), 120, "the rejected event")
    assert rejected[0].payload["checkpoint"] == uri
    assert "not a torch file" in rejected[0].payload["reason"]
    out = run_quantlab_env(env, "announce", uri, "--model", "mobilenet_v2", "--store",
                           deployed.store, cwd=tmp_path)
    assert out.returncode == 0 and "rejected earlier: checkpoint" in out.stdout, out.stdout
    assert "testing-secret-key" not in out.stdout + str([e.payload for e in rejected])


def test_announce_refuses_a_pending_checkpoint_and_retries_a_failed_one(
        deployed, worker, buckets, s3_env, env, prefect_server, tiny_checkpoint, tmp_path):
    """Pending in a run: `announce` refuses it without --force. Failed: `announce` retries it
    without --force, saying why it failed, and the triggered run quantizes it."""
    models, lab = Store(f"s3://{buckets['models']}"), Store(deployed.store)
    models.write_bytes("mobilenet_v2/2026-12-04/model.pth", checkpoint_bytes(tiny_checkpoint, 2e-3))
    uri = models.uri("mobilenet_v2/2026-12-04/model.pth")
    seen = CheckpointRegistry(lab)
    sha256 = seen.identify(uri)
    seen.remember(sha256, uri, "mobilenet_v2")
    seen.claim(sha256, "run-in-flight", str(uuid.uuid4()))

    def announce():
        out = run_quantlab_env(env, "announce", uri, "--model", "mobilenet_v2", "--store",
                               deployed.store, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout
    assert "already pending in run run-in-flight; not announced" in announce()
    seen.mark_failed(sha256, "run-in-flight", "StoreError: s3://lab unreachable\ntraceback")
    before = len(deployment_runs(prefect_server, QUANTIZE))
    out = announce()
    assert "failed earlier: StoreError: s3://lab unreachable; retrying" in out
    assert f"emitted {LANDED}" in out
    run = quantize_runs_after(prefect_server, before + 1)[-1]
    assert run.parameters["checkpoint"] == uri and run.state.is_completed(), run.state
    record = seen.get(sha256)
    assert record.outcome == "quantized" and record.run_id == f"flow-{run.id}"
    assert record.failures == 0
