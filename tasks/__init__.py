"""Prefect tasks: thin wrappers over quantlab.pipeline that add retries, logs and artifacts.

Imports point one way: flows -> tasks -> quantlab.
"""

import logging

from prefect.logging import get_logger


def route_quantlab_logs() -> None:
    """Send the `quantlab` library's log records to the Prefect API (the run's log in the UI).

    This is what PREFECT_LOGGING_EXTRA_LOGGERS=quantlab does, applied here so that it holds
    however Prefect was started (CLI, worker, test harness).
    """
    target = logging.getLogger("quantlab")
    target.setLevel(logging.INFO)
    for handler in get_logger("prefect.extra").handlers:
        if handler not in target.handlers:
            target.addHandler(handler)


route_quantlab_logs()
