"""torch.distributed on CPU: the process group in a worker, and the torchrun-style launcher.

In a worker (started by torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR, ...):

    rank, world_size = init_process_group()       # gloo
    ...
    dist.destroy_process_group()

From the orchestrating process:

    launch("quantlab.qat", ["--job", path], nproc_per_node=2, on_line=log.info)

`launch` runs `python -m torch.distributed.run` (torchrun) as a child process: one node with a
standalone rendezvous on loopback by default, or one node of a multi-node job through a c10d
rendezvous endpoint. torchrun restarts the whole worker group when a worker dies, up to
`max_restarts` times; workers resume from their last checkpoint (see quantlab.qat).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from quantlab.errors import QuantlabError

_PR_SET_PDEATHSIG = 1
# Bound once, here: the launcher calls prctl between fork and exec, where loading a library
# could deadlock on a lock held by another thread.
try:
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform.startswith("linux") else None
except OSError:
    _prctl = None


class LaunchError(QuantlabError):
    """The worker group failed (after torchrun's restarts)."""


def init_process_group(threads: int | None = None) -> tuple[int, int]:
    """Join the gloo group described by torchrun's environment; returns (rank, world_size).

    `threads` caps this worker's torch intra-op and inter-op thread pools (call it first
    thing in the worker: the inter-op pool can only be sized before it starts).
    """
    die_with_parent()
    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # already started (a second call in the same process)
            pass
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to signal this process when its parent exits (no orphaned workers)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(sig))


def torchrun_command(module: str, args: list[str], nproc_per_node: int, nnodes: str = "1",
                     rdzv_endpoint: str | None = None, rdzv_id: str = "quantlab",
                     max_restarts: int = 0, rdzv_timeout: int = 600) -> list[str]:
    """The `python -m torch.distributed.run ...` command line for a worker module.

    Without `rdzv_endpoint`: one node, a standalone c10d rendezvous on a free loopback port.
    With it: this node's part of a job of `nnodes` nodes ("N" or "MIN:MAX") that meet at the
    c10d rendezvous HOST:PORT under `rdzv_id`; the node whose address matches HOST serves it.
    c10d assigns node ranks in the order nodes join (there is no --node-rank), so global rank
    0 may be on any node.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
           f"--max-restarts={max_restarts}"]
    if rdzv_endpoint is None:
        if nnodes.split(":")[-1] != "1":
            raise ValueError(f"nnodes={nnodes} needs a rendezvous endpoint (HOST:PORT)")
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}", f"--rdzv-conf=join_timeout={rdzv_timeout}"]
    return [*cmd, "-m", module, *args]


def launch(module: str, args: list[str], nproc_per_node: int, threads_per_worker: int = 1,
           nnodes: str = "1", rdzv_endpoint: str | None = None, rdzv_id: str = "quantlab",
           max_restarts: int = 0, on_line: Callable[[str], None] = print,
           env: dict[str, str] | None = None, rdzv_timeout: int = 600) -> None:
    """Run this node's worker group to completion, streaming its output lines to `on_line`.

    See `torchrun_command` for the rendezvous arguments. Threads: each worker gets
    `threads_per_worker` OpenMP/MKL/torch intra-op threads (and as many inter-op threads), so
    that N workers on N cores do not oversubscribe. If this process is interrupted or
    cancelled, the group is terminated (SIGTERM to torchrun, which stops its workers; SIGKILL
    after 10 s). Raises LaunchError with the last lines of output when the group fails.
    """
    cmd = torchrun_command(module, args, nproc_per_node, nnodes, rdzv_endpoint, rdzv_id,
                           max_restarts, rdzv_timeout)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1",
                 "OMP_NUM_THREADS": str(threads_per_worker),
                 "MKL_NUM_THREADS": str(threads_per_worker),
                 # Workers of a restarted group must not share the rendezvous' TCPStore:
                 # its keys outlive the attempt, and the new gloo group would read the dead
                 # workers' addresses (pytorch/pytorch#135712). Each attempt gets its own.
                 "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    tail: deque[str] = deque(maxlen=30)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env, start_new_session=True,
                            preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            on_line(line)
        code = proc.wait()
    finally:
        stop(proc)
    if code != 0:
        raise LaunchError(f"worker group {module} failed with exit code {code}; last output:\n"
                          + "\n".join(tail))


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate a launched group (torchrun and its workers share its session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
