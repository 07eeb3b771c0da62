"""Prefect flows, one per file: quantize (the pipeline), demo (the embedded default), watch
(checkpoint events); deployments.py registers and serves them.

Here too, imported before Prefect: the Prefect settings every entry point (the CLI's `main`,
each flow's `__main__` block) gives its defaults, where the user has not set their own.
"""

import os
import sys

# Seconds that Prefect waits for its ephemeral API server (the one a flow starts without
# PREFECT_API_URL) to answer; Prefect's own default is 20. On a fresh PREFECT_HOME the first
# start also runs the database migrations. Measured on a 2-core machine (fresh home; warm home
# 3-4 s): 7 s quiet, 22 s beside 2 CPU-bound processes, 43-51 s beside 4 to 6. Prefect counts
# only its 0.1 s polling sleeps, not the wait for each answer, so on a busy machine its timeout
# is longer in wall time than it says (the first `quantlab demo` that failed gave up after
# 36.7 s on the default 20). 120: over twice the slowest start measured; a server that dies at
# start-up makes a start fail after that long instead of 20 s.
EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 120

PREFECT_DEFAULTS = {
    # The ephemeral server would otherwise phone home from a machine that may have no internet
    # (and log the failure every ten minutes).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(EPHEMERAL_STARTUP_TIMEOUT_SECONDS),
}


def set_prefect_defaults() -> None:
    """Put PREFECT_DEFAULTS in the environment where it has no value of its own: a user's
    environment variable wins.

    Prefect reads the environment when it is imported: call this before, or (a flow's
    `__main__`, whose module imported Prefect already) Prefect's settings are read again.
    """
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
