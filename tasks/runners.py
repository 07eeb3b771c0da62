"""Where fanned-out tasks run: the flow's own task runner, or a Dask cluster.

    with fan_out(config.dask_address) as submit:
        futures = [submit(ptq_variant, config=config, variant=v, ...) for v in config.variants]

Without an address, tasks go to the flow's task runner (threads of the flow's process).
With one (tcp://scheduler:8786), prefect-dask's DaskTaskRunner sends them to that cluster's
workers, which report their task runs and logs to the same Prefect API. Dask workers need
quantlab installed, the Prefect API reachable, and the store and dataset readable (a task
stages the dataset again where its local copy is missing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture

Submit = Callable[..., PrefectFuture]


@contextmanager
def fan_out(dask_address: str | None) -> Iterator[Submit]:
    """Yield `submit(task, **parameters) -> future` on the chosen task runner."""
    if not dask_address:
        yield lambda task, **parameters: task.submit(**parameters)
        return
    from prefect_dask import DaskTaskRunner

    with DaskTaskRunner(address=dask_address) as runner:
        def submit(task: Task, **parameters: Any) -> PrefectFuture:
            return runner.submit(task, parameters)
        yield submit
