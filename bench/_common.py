"""Helpers shared by the bench scripts: run `quantlab bench` and read back the rows it stored."""

from __future__ import annotations

import contextlib
import shlex
import sys
import tempfile

from quantlab import metrics
from quantlab._deprecations import silence_deprecations
from quantlab_cli.app import app
from quantlab.store import Store


silence_deprecations()


def run_quantlab_bench(args: list[str]) -> tuple[str, list[dict]]:
    """Run `quantlab bench ARGS` (the CLI's own code, in this process) into a temporary store.

    Returns the command as a user would type it (without --store) and the `benchmarks` rows.
    """
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-") as store:
        # Its printed tables go to stderr: stdout carries the section's markdown.
        with contextlib.redirect_stdout(sys.stderr):
            app(["bench", *args, "--store", store], standalone_mode=False)
        rows = metrics.read_rows(Store(store), "benchmarks")
    return shlex.join(["quantlab", "bench", *args]), rows


def fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
