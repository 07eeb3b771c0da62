"""Register or serve the deployments of deploy/prefect.yaml (what `quantlab deploy|serve` run).

    quantlab deploy    # work pool + compute concurrency limit if missing, then `prefect deploy --all`
    quantlab serve     # the same deployments, executed by this process (no work pool, no worker)

Both talk to the Prefect API of PREFECT_API_URL (`prefect server start` serves one on
http://127.0.0.1:4200/api). Registration is Prefect's own: `prefect deploy --all` reads the
file, from the project root, so that entrypoints (flows/quantize.py:quantize) resolve and the
default pull step points workers at this checkout. Serving reads the file with Prefect's
prefect.yaml loader and schedule parser.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL
from rich.console import Console

from quantlab.errors import ConfigError, QuantlabError
from quantlab_tasks.steps import COMPUTE_CONCURRENCY_TAG

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_ROOT / "deploy" / "prefect.yaml"
POOL_TYPE = "process"
console = Console(stderr=True)


def prefect_file_path(prefect_file: str | None) -> Path:
    path = Path(prefect_file).resolve() if prefect_file else PREFECT_FILE
    if not path.is_file():
        raise ConfigError(f"deployments file {path} does not exist; pass --prefect-file PATH "
                          f"(the project's is deploy/prefect.yaml)")
    return path


def load_deployment_specs(prefect_file: Path) -> list[dict[str, Any]]:
    """The deployments of a prefect.yaml, validated by Prefect's loader, env placeholders applied."""
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.utilities.templating import apply_values

    specs, _ = _load_deploy_configs_and_actions(prefect_file=prefect_file, console=console)
    specs = [apply_values(s, os.environ, remove_notset=False) for s in specs]
    if not specs:
        raise ConfigError(f"{prefect_file} lists no valid deployments (see the messages above)")
    incomplete = [s.get("name") or s.get("entrypoint") for s in specs
                  if not (s.get("name") and s.get("entrypoint"))]
    if incomplete:
        raise ConfigError(f"{prefect_file}: every deployment needs a name and an entrypoint "
                          f"(flows/<file>.py:<flow>); incomplete: {incomplete}")
    return specs


def check_api() -> str:
    """The configured API URL, reachable; refuses the ephemeral API (gone with this process)."""
    url = PREFECT_API_URL.value()
    if not url:
        raise QuantlabError("PREFECT_API_URL is not set: start a server (`prefect server start`) "
                            "and `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise QuantlabError(f"the Prefect API at {url} does not answer ({type(error).__name__}); "
                            "is `prefect server start` running?")
    return url


def ensure_work_pools(specs: list[dict[str, Any]]) -> None:
    """Create the (process) work pools that the deployments name, where they are missing."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    names = sorted({(s.get("work_pool") or {}).get("name") for s in specs} - {None})
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                pool = client.read_work_pool(name)
                console.print(f"work pool {name!r} exists (type {pool.type})")
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type=POOL_TYPE,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
                console.print(f"created work pool {name!r} (type {POOL_TYPE})")


def ensure_compute_concurrency_limit(slots: int) -> None:
    """Create the tag concurrency limit that bounds the heavy compute stages, if missing.

    Task runs tagged `quantlab-compute` (QAT training, the benchmark, the gate's timing) take a
    slot of `tag:quantlab-compute` while they run; with no such limit (a local run against the
    ephemeral API) they are not limited at all.
    """
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"tag:{COMPUTE_CONCURRENCY_TAG}"
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            console.print(f"created concurrency limit {name!r}: {slots} heavy compute stage(s) "
                          "(QAT, timing) at a time")
        except ObjectAlreadyExists:
            limit = client.read_global_concurrency_limit_by_name(name).limit
            console.print(f"concurrency limit {name!r} exists: {limit} compute stage(s) at a time "
                          f"(change it with `prefect gcl update {name} --limit N`)")


def deploy(prefect_file: str | None = None, compute_slots: int = 1) -> None:
    """Work pools and the compute concurrency limit if missing, then `prefect deploy --all` from the project root."""
    path = prefect_file_path(prefect_file)
    specs = load_deployment_specs(path)
    url = check_api()
    console.print(f"deploying {len(specs)} deployments from {path} to {url}")
    ensure_work_pools(specs)
    ensure_compute_concurrency_limit(compute_slots)
    code = subprocess.call([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                            "--prefect-file", str(path)], cwd=PROJECT_ROOT)
    if code != 0:
        raise QuantlabError(f"`prefect deploy --all --prefect-file {path}` failed (exit code {code})")


def runner_deployments(specs: list[dict[str, Any]]):
    """RunnerDeployments (for serve) built from prefect.yaml deployment specs, entrypoints
    relative to the current directory."""
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers
    from prefect.flows import load_flow_from_entrypoint

    out = []
    for spec in specs:
        limit = spec.get("concurrency_limit")
        flow = load_flow_from_entrypoint(spec["entrypoint"])
        out.append(flow.to_deployment(
            name=spec["name"], parameters=spec.get("parameters") or {},
            description=spec.get("description"),
            tags=spec.get("tags") or [], paused=spec.get("paused"),
            concurrency_limit=limit.get("limit") if isinstance(limit, dict) else limit,
            schedules=[_schedule_config_to_deployment_schedule(s) for s in spec.get("schedules") or []],
            triggers=_initialize_deployment_triggers(
                f"{flow.name}/{spec['name']}", spec.get("triggers") or [])))
    return out


def serve(prefect_file: str | None = None, compute_slots: int = 1) -> None:
    """Serve the file's deployments from this process until interrupted (Ctrl-C)."""
    from prefect import serve as prefect_serve

    path = prefect_file_path(prefect_file)
    specs = load_deployment_specs(path)
    check_api()
    os.chdir(PROJECT_ROOT)  # entrypoints and relative store paths resolve as under a worker
    deployments = runner_deployments(specs)
    refuse_work_pool_deployments(deployments)
    ensure_compute_concurrency_limit(compute_slots)
    prefect_serve(*deployments)


def refuse_work_pool_deployments(deployments) -> None:
    """Serving a deployment that `quantlab deploy` registered for a work pool would leave it
    half taken over (Prefect keeps its pool and drops its code location): refuse, clearly."""
    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                existing = client.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                raise QuantlabError(
                    f"deployment {d.flow_name}/{d.name} is registered for work pool "
                    f"{existing.work_pool_name!r} (quantlab deploy); run it with `prefect worker "
                    f"start --pool {existing.work_pool_name}`, or delete it first to serve it "
                    f"(`prefect deployment delete {d.flow_name}/{d.name}`)")
