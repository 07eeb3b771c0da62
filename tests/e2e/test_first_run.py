"""The README's first command on a fresh machine: `quantlab demo` with a fresh PREFECT_HOME and
none of Prefect's settings, so that the CLI starts Prefect's ephemeral API itself (its
database migrations included) with quantlab's start-up timeout; and that timeout reaching
Prefect from the CLI's `main` and from every flow's `__main__` block.

The demo is as small as its options make it (1 QAT epoch on 1 worker; the float baseline is
trained, the store being new): the slowest test of the suite.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantlab_flows import EPHEMERAL_STARTUP_TIMEOUT_SECONDS
from tests.support import ROOT

TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


@pytest.fixture
def no_prefect_env(monkeypatch):
    """No PREFECT_* variable in this process; afterwards, the environment and Prefect's
    global settings as they were."""
    import prefect.context

    for key in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(key)
    yield monkeypatch
    monkeypatch.undo()
    prefect.context.refresh_global_settings_context()


def run_main(monkeypatch, *argv: str) -> None:
    from quantlab_cli import app

    monkeypatch.setattr(sys, "argv", ["quantlab", *argv])
    try:
        app.main()
    except SystemExit as e:
        assert e.code in (0, None), e.code


def test_main_gives_prefect_the_start_up_timeout_unless_the_user_set_one(no_prefect_env):
    import prefect.context

    run_main(no_prefect_env, "--help")
    assert os.environ[TIMEOUT_VAR] == str(EPHEMERAL_STARTUP_TIMEOUT_SECONDS)
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    # Prefect was imported before main ran (as in a flow's __main__): its settings were re-read
    settings = prefect.context.GLOBAL_SETTINGS_CONTEXT.settings
    assert settings.server.ephemeral.startup_timeout_seconds == EPHEMERAL_STARTUP_TIMEOUT_SECONDS
    assert settings.server.analytics_enabled is False

    no_prefect_env.setenv(TIMEOUT_VAR, "300")
    no_prefect_env.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    run_main(no_prefect_env, "--help")
    assert os.environ[TIMEOUT_VAR] == "300"
    settings = prefect.context.GLOBAL_SETTINGS_CONTEXT.settings
    assert settings.server.ephemeral.startup_timeout_seconds == 300
    assert settings.server.analytics_enabled is True


def test_every_flow_main_block_sets_the_defaults_before_its_flow_runs():
    flows = sorted(Path(ROOT, "flows").glob("*.py"))
    mains = {}
    for path in flows:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
                mains[path.name] = [ast.unparse(s) for s in node.body]
    assert {"quantize.py", "demo.py", "watch.py"} <= set(mains)
    for name, body in mains.items():
        assert "set_prefect_defaults()" in body, name
        assert body.index("set_prefect_defaults()") < len(body) - 1, name  # before the flow call


@pytest.mark.timeout(2400)
def test_the_first_quantlab_demo_on_a_fresh_prefect_home(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), COLUMNS="200")
    quantlab = Path(sys.executable).with_name("quantlab")   # the console script, as the README
    out = subprocess.run([str(quantlab), "demo", "--store", str(tmp_path / "store"),
                          "--cache-dir", str(tmp_path / "cache"), "--qat-epochs", "1",
                          "--nproc-per-node", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert re.search(r"^selected \S+ in \S+: ", out.stdout, re.M), out.stdout[-3000:]
    # the verdict a user acts on: does int8 pay off here, at which ratio per batch size
    assert re.search(r"^verdict at serving batch 1: (int8 pays off|int8 does not pay off|no int8)",
                     out.stdout, re.M), out.stdout[-3000:]
    assert "Timed out while attempting to connect" not in out.stderr
    assert (tmp_path / "prefect-home").is_dir()              # the run's own Prefect home
