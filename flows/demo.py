"""The `demo` flow: seed the digits, train a float baseline once, then run `quantize` on it.

    python flows/demo.py                      # or: quantlab demo [--store URI]
"""

from __future__ import annotations

import sys

from prefect import flow

from flows.quantize import quantize
from quantlab import demo as demo_lib
from tasks.demo import seed_demo_data, train_baseline


@flow(name="quantlab-demo")
def demo(store: str = "./quantlab-store", qat_epochs: int = 3, world_size: int = 2,
         cache_dir: str = "~/.cache/quantlab") -> dict:
    """The embedded default: the tutorial's recipe on real handwritten digits."""
    data_uri = seed_demo_data(store)
    checkpoint = train_baseline(store, data_uri, cache_dir)
    config = demo_lib.demo_config(store, data_uri, checkpoint, qat_epochs=qat_epochs,
                                  world_size=world_size).model_copy(update={"cache_dir": cache_dir})
    return quantize(config)


if __name__ == "__main__":
    demo(*sys.argv[1:2])
