"""The `demo` flow: seed the digits, train a float baseline once, then run `quantize` on it.

    python flows/demo.py                      # or: quantlab demo [--store URI]
"""

from __future__ import annotations

import sys

from prefect import flow

from quantlab import demo as demo_lib
from quantlab.pipeline import Outcome
from quantlab_flows.quantize import quantize
from quantlab_tasks import setup_logging
from quantlab_tasks.demo import seed_demo_data, train_baseline
from quantlab_tasks.steps import publish


@flow(name="quantlab-demo")
def demo(store: str = "./quantlab-store", qat_epochs: int = 3, nproc_per_node: int = 2,
         cache_dir: str = "~/.cache/quantlab", dataset: str = "digits",
         source: str | None = None) -> Outcome:
    """The embedded default: the tutorial's recipe on real handwritten digits (or on
    Fashion-MNIST, whose idx files are read from `source`)."""
    setup_logging()
    recipe = demo_lib.recipe(dataset)
    data_uri = seed_demo_data(store, dataset, source)
    checkpoint = train_baseline(store, data_uri, cache_dir, dataset)
    config = demo_lib.demo_config(store, data_uri, checkpoint, qat_epochs=qat_epochs,
                                  nproc_per_node=nproc_per_node, recipe=recipe).model_copy(
                                      update={"cache_dir": cache_dir})
    outcome = quantize(config)
    publish(outcome)  # the table and report on the demo run's own page too, not only the subflow's
    return outcome


if __name__ == "__main__":
    from quantlab_flows import set_prefect_defaults

    set_prefect_defaults()
    demo(*sys.argv[1:2])
