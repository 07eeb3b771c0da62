"""quantlab: float PyTorch image classifiers to fast int8 models, with the evidence.

The library half of quantlab. It knows nothing about orchestration: the same functions run
from a notebook, a torchrun worker or a Prefect task (tasks/ and flows/ wrap them).
"""

from quantlab._deprecations import silence_deprecations

__version__ = "0.1.0"

silence_deprecations()
