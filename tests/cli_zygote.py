"""Run many short `quantlab` commands quickly: import quantlab once, fork one child per command.

    python -m tests.cli_zygote      # reads one JSON request per line, answers one per line

Each child is a new process that runs the console script's `main()` with its own argv,
environment, working directory, stdout, stderr and exit code, as `quantlab ...` would, minus
the seconds that importing torch and torchvision takes again for every command. Only for
commands that stop before a flow starts (bad input caught by preflight): a child that ran a
Prefect flow would inherit nothing it needs, but forking is not the way to start one.

request: {"argv": [...], "env": {...}, "cwd": "...", "supported_engines": [...] | null}
reply:   {"returncode": int, "stdout": str, "stderr": str, "seconds": float}

`supported_engines` makes the child's torch report those quantized engines, to stand in for
a CPU without x86/fbgemm support (e.g. an ARM machine); nothing else is simulated.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

import quantlab_cli.app
import torch

import quantlab.pipeline  # noqa: F401 (the slow imports, once: torch, torchvision, pyarrow)


def _child(request: dict) -> int:
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if request.get("supported_engines") is not None:
        engines = list(request["supported_engines"])
        type(torch.backends.quantized).supported_engines = property(lambda self: engines)
    sys.argv = ["quantlab", *request["argv"]]
    try:
        quantlab_cli.app.main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


def run(request: dict) -> dict:
    """Fork, run one command in the child, collect its exit code and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                code = _child(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return {"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(),
                "stderr": err.read().decode(), "seconds": seconds}


def main() -> None:
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
