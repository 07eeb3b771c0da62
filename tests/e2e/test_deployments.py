"""Deployments for real: `prefect server start`, `quantlab deploy`, a process worker that runs
a deployment, the run in the UI (headless Chromium), and cancelling a run while QAT trains.

Runs are the tiny quantize flow: the deployment of deploy/prefect.yaml with its config
parameter replaced by a tiny one at trigger time, as `prefect deployment run --param` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from quantlab_flows.deployments import (
    PREFECT_FILE,
    PROJECT_ROOT,
    load_deployment_specs,
    runner_deployments,
)

from tests.e2e.browser import Chromium
from tests.support import background, make_config, wait_until

POOL = "quantlab-process"
QUANTIZE = "quantize/mobilenet-v2-nightly"
DEMO = "quantlab-demo/digits-nightly"


def quantlab_cli(*args, env, cwd, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "quantlab_cli.app", *args], capture_output=True,
                          text=True, env={**env, "COLUMNS": "200"}, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """`quantlab deploy`, run from elsewhere than the project root."""
    out = quantlab_cli("deploy", env=prefect_server.env, cwd=tmp_path_factory.mktemp("elsewhere"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def worker(deployed, prefect_server, tmp_path_factory):
    """`prefect worker start --pool quantlab-process`, online."""
    from prefect.client.orchestration import get_client

    def online() -> bool:
        with prefect_server.settings(), get_client(sync_client=True) as client:
            return any(w.status == "ONLINE" for w in client.read_workers_for_work_pool(POOL))
    with background([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
                    prefect_server.env, tmp_path_factory.mktemp("worker") / "worker.log",
                    online, "the worker to come online", cwd=PROJECT_ROOT) as proc:
        yield proc


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    """`quantlab serve` of deploy/prefect.yaml's deployments, renamed *-served so that they do
    not clash with the worker's."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    tmp = tmp_path_factory.mktemp("serve")
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    for d in spec["deployments"]:
        d["name"] += "-served"
    (tmp / "prefect.yaml").write_text(yaml.safe_dump(spec))

    def registered() -> bool:
        with prefect_server.settings(), get_client(sync_client=True) as client:
            try:
                return client.read_deployment_by_name(QUANTIZE + "-served").work_pool_name is None
            except ObjectNotFound:
                return False
    with background([sys.executable, "-m", "quantlab_cli.app", "serve", "--prefect-file",
                     str(tmp / "prefect.yaml")], prefect_server.env, tmp / "serve.log",
                    registered, "quantlab serve to register its deployments",
                    cwd=PROJECT_ROOT) as proc:
        yield proc


def trigger(server, deployment: str, parameters: dict):
    from prefect.deployments import run_deployment

    with server.settings():
        return run_deployment(deployment, parameters=parameters, timeout=0)


def read_flow_run(server, flow_run_id):
    from prefect.client.orchestration import get_client

    with server.settings(), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def wait_for_final_state(server, flow_run_id, timeout: float):
    return wait_until(lambda: (run := read_flow_run(server, flow_run_id)).state.is_final() and run,
                      timeout, f"flow run {flow_run_id} to finish", interval=1)


def tiny_parameters(tiny_dataset, tiny_checkpoint, tmp_path, **overrides) -> dict:
    cfg = make_config(tiny_dataset, tiny_checkpoint, str(tmp_path / "store"), str(tmp_path / "cache"),
                      **overrides)
    return {"config": cfg.model_dump(mode="json")}


# -- registration ---------------------------------------------------------------------------
def test_deploy_registers_pool_qat_limit_and_scheduled_deployments(deployed, prefect_server):
    from prefect.client.orchestration import get_client

    specs = {s["name"]: s for s in load_deployment_specs(PREFECT_FILE)}
    with prefect_server.settings(), get_client(sync_client=True) as client:
        assert client.read_work_pool(POOL).type == "process"
        assert client.read_global_concurrency_limit_by_name("tag:quantlab-compute").limit == 1
        deployments = {name: client.read_deployment_by_name(name) for name in (QUANTIZE, DEMO)}
    for name, d in deployments.items():
        spec = specs[d.name]
        assert d.entrypoint == spec["entrypoint"] and d.work_pool_name == POOL
        assert d.parameters == spec["parameters"]
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                 {"directory": str(PROJECT_ROOT)}}]
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules] == [
            (s["cron"], s["timezone"], s["active"]) for s in spec["schedules"]]
    assert deployments[DEMO].schedules[0].active and deployments[DEMO].schedules[0].schedule.timezone
    assert deployments[QUANTIZE].entrypoint == "flows/quantize.py:quantize"


def test_deploy_and_serve_refuse_what_cannot_work(deployed, prefect_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    out = quantlab_cli("deploy", env=env, cwd=tmp_path)
    assert out.returncode == 2 and "PREFECT_API_URL is not set" in out.stderr
    out = quantlab_cli("serve", "--prefect-file", str(tmp_path / "nope.yaml"), env=env, cwd=tmp_path)
    assert out.returncode == 2 and "nope.yaml does not exist" in out.stderr
    # Serving what `quantlab deploy` registered for the work pool would break it.
    out = quantlab_cli("serve", env=prefect_server.env, cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and "is registered for work pool 'quantlab-process'" in out.stderr


def test_serve_builds_the_files_deployments(monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)
    specs = load_deployment_specs(PREFECT_FILE)
    served = {d.name: d for d in runner_deployments(specs)}
    assert set(served) == {s["name"] for s in specs}
    for spec in specs:
        d = served[spec["name"]]
        assert d.entrypoint == spec["entrypoint"] and d.parameters == spec["parameters"]
        assert [schedule_of(s.schedule) + (s.active,) for s in d.schedules] == [
            (s.get("cron"), s.get("timezone"), seconds(s.get("interval")), s["active"])
            for s in spec["schedules"]]
        assert [t.expect for t in d.triggers] == [set(t["expect"]) for t in spec.get("triggers", [])]


def seconds(interval) -> float | None:
    """An interval of prefect.yaml (seconds, or the ISO duration its loader makes of them)."""
    from datetime import timedelta

    from pydantic import TypeAdapter

    return None if interval is None else TypeAdapter(timedelta).validate_python(interval).total_seconds()


def schedule_of(schedule) -> tuple:
    """(cron, timezone, interval seconds) of a cron or an interval schedule."""
    interval = getattr(schedule, "interval", None)
    return (getattr(schedule, "cron", None), getattr(schedule, "timezone", None) if interval is None
            else None, interval.total_seconds() if interval is not None else None)


# -- a worker runs it; the UI shows it ----------------------------------------------------------
@pytest.fixture(scope="module")
def worker_run(worker, prefect_server, tiny_dataset, tiny_checkpoint, tmp_path_factory):
    """A tiny quantize run of the deployment, executed by the worker to completion."""
    params = tiny_parameters(tiny_dataset, tiny_checkpoint, tmp_path_factory.mktemp("worker-run"))
    run = trigger(prefect_server, QUANTIZE, params)
    run = wait_for_final_state(prefect_server, run.id, timeout=900)
    assert run.state.is_completed(), run.state
    return run


def test_worker_run_publishes_keyed_artifacts(worker_run, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect_server.settings(), get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[worker_run.id])))
    by_key = {a.key: a for a in arts}
    assert {"quantlab-comparison", "quantlab-report", "quantlab-progress"} <= set(by_key)
    assert by_key["quantlab-comparison"].type == "table" and by_key["quantlab-report"].type == "markdown"
    report = by_key["quantlab-report"].data
    assert "data:image/png;base64," in report and "comparison.png" in report
    assert "fingerprint" in report and "Selected" in report and '"store"' in report


def test_ui_shows_the_run_its_state_and_the_table(worker_run, prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect_server.settings(), get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[worker_run.id])))}
    table = arts["quantlab-comparison"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    with Chromium(tmp_path / "profile") as browser:
        browser.open(f"{prefect_server.url}/runs/flow-run/{worker_run.id}")
        browser.wait_for_text([worker_run.name, "Completed", "Task runs", "Finished in state"])
        browser.screenshot(tmp_path / "flow-run.png")
        browser.click_text("Artifacts")
        browser.wait_for_text(["quantlab-progress", "quantlab-comparison", "quantlab-report"])
        browser.screenshot(tmp_path / "flow-run-artifacts.png")

        browser.open(f"{prefect_server.url}/artifacts/artifact/{table.id}")
        browser.wait_for_text(["top-1 %", "speed-up", *(r["variant"] for r in rows),
                               *(r["top-1 %"] for r in rows)])
        shot = browser.screenshot(tmp_path / "comparison-table.png")

        browser.open(f"{prefect_server.url}/artifacts/artifact/{arts['quantlab-report'].id}")
        browser.wait_for_text(["Selected", "Dataset", "fingerprint", "Config"])
        plot_width = wait_until(lambda: browser.evaluate(
            "Math.max(0, ...[...document.images].map(i => i.naturalWidth))"), 30, "the plot")
        browser.screenshot(tmp_path / "report.png")
    assert shot.stat().st_size > 10_000 and plot_width > 500


# -- cancelling ---------------------------------------------------------------------------------
def qat_processes(root: psutil.Process) -> list[psutil.Process]:
    """torchrun and its QAT workers below `root` (the worker and its flow-run processes)."""
    procs = []
    for p in root.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "quantlab.qat" in cmd:
            procs.append(p)
    return procs


@pytest.mark.parametrize("runner", ["worker", "served"])
def test_cancelling_a_run_stops_its_qat_workers(runner, request, prefect_server, tiny_dataset,
                                                 tiny_checkpoint, tmp_path):
    """Cancel as the UI does (state Cancelling) while QAT trains: Prefect terminates the
    flow-run process, which stops torchrun, which stops the workers; none is left."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    parent = psutil.Process(request.getfixturevalue(runner).pid)
    deployment = QUANTIZE if runner == "worker" else QUANTIZE + "-served"
    params = tiny_parameters(tiny_dataset, tiny_checkpoint, tmp_path, variants=())
    params["config"]["qat"].update(epochs=500, freeze_bn_after=500, freeze_observers_after=500)
    run = trigger(prefect_server, deployment, params)
    # torchrun (its command line names the worker module too) and its 2 workers
    procs = wait_until(lambda: len(found := qat_processes(parent)) >= 3 and found, 600,
                       "torchrun and 2 QAT workers", interval=0.5)
    time.sleep(2)  # into training
    with prefect_server.settings(), get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test, as in the UI"))
    run = wait_for_final_state(prefect_server, run.id, timeout=180)
    assert run.state.is_cancelled(), run.state

    def all_gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    wait_until(all_gone, 60, "the QAT processes to exit")
    assert not qat_processes(parent)
