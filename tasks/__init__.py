"""Prefect tasks: thin wrappers over quantlab.pipeline that add retries, logs and artifacts.

Imports point one way: flows -> tasks -> quantlab. Every flow calls `setup_logging()` first.
"""

import logging

from prefect.logging import get_logger

from quantlab._deprecations import silence_deprecations


def setup_logging() -> None:
    """Send the `quantlab` library's log records to the Prefect API (the run's log in the UI),
    and silence the deprecation warnings quantlab expects (quantlab/_deprecations.py).

    The first is what PREFECT_LOGGING_EXTRA_LOGGERS=quantlab does, applied here so that it
    holds however Prefect was started (CLI, worker, test harness). Idempotent.
    """
    silence_deprecations()
    target = logging.getLogger("quantlab")
    target.setLevel(logging.INFO)
    for handler in get_logger("prefect.extra").handlers:
        if handler not in target.handlers:
            target.addHandler(handler)
