"""Task helpers that need no engine: how the QAT worker group's output lines are logged."""

import logging

import pytest
from quantlab_tasks.steps import worker_line_level


# Lines as torchrun and a failing gloo worker print them (merged stdout and stderr).
@pytest.mark.parametrize("line, level", [
    ("[rank 0/2] qat-x86 epoch 1/3: loss 0.4210, train top-1 88.10", logging.INFO),
    ("[rank1]: Traceback (most recent call last):", logging.ERROR),
    ("[rank1]: RuntimeError: boom in worker", logging.ERROR),
    ("W1127 03:33:03.652000 11514 torch/distributed/elastic/multiprocessing/api.py:1028] "
     "Sending process 12279 closing signal SIGTERM", logging.WARNING),
    ("E1127 03:33:03.717000 11514 torch/distributed/elastic/multiprocessing/api.py:1002] "
     "failed (exitcode: 1) local_rank: 1 (pid: 12280) of binary: python", logging.ERROR),
    ("I1127 03:33:01.000000 11514 torch/distributed/run.py:800] starting", logging.INFO),
    ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", logging.INFO),
])
def test_worker_lines_are_logged_at_their_level(line, level):
    assert worker_line_level(line) == level
