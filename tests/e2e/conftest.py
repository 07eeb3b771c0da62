"""Fixtures of the end-to-end tests: a real `prefect server start` (API and UI) on loopback."""

from __future__ import annotations

import os
import sys
import urllib.request

import pytest

from quantlab_flows import PREFECT_DEFAULTS
from tests.support import PrefectServer, background, free_port


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
    server_env.update(PREFECT_DEFAULTS, PREFECT_HOME=str(home / "server"),
                      PREFECT_UI_API_URL=f"{url}/api",
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
