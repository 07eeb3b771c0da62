"""Tasks of the demo flow: seed the digits dataset, train the float baseline once."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from quantlab import demo
from quantlab.store import Store
from quantlab_tasks.steps import HOUR, IO_RETRIES


@task(name="seed-demo-data", cache_policy=NO_CACHE, tags=["quantlab", "demo", "store"],
      timeout_seconds=0.5 * HOUR, **IO_RETRIES)
def seed_demo_data(store: str, dataset: str = "digits", source: str | None = None) -> str:
    """Write the demo's dataset into the store as an ImageFolder (once)."""
    uri, written = demo.seed(Store(store), dataset, source)
    get_run_logger().info("%s %s dataset at %s", "seeded" if written else "reusing", dataset, uri)
    return uri


@task(name="train-baseline", cache_policy=NO_CACHE, tags=["quantlab", "demo", "train"],
      timeout_seconds=2 * HOUR)
def train_baseline(store: str, data_uri: str, cache_dir: str, dataset: str = "digits") -> str:
    """Train the dataset's float MobileNetV2 once (its demo recipe); returns the checkpoint URI."""
    logger = get_run_logger()
    uri, trained = demo.train_baseline(
        Store(store), data_uri, cache_dir, recipe=demo.recipe(dataset),
        on_epoch=lambda e, stats, top1: logger.info(
            "baseline epoch %d: loss %.3f, val top-1 %.2f", e, stats.loss, top1))
    logger.info("%s float baseline %s", "trained" if trained else "reusing", uri)
    return uri
