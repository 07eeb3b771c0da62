"""quantlab: float PyTorch image classifiers to fast int8 models, with the evidence.

The library half of quantlab. It knows nothing about orchestration: the same functions run
from a notebook, a torchrun worker or a Prefect task (tasks/ and flows/ wrap them). Importing
it changes nothing global: entry points (the CLI, the flows, the QAT worker) call
`quantlab._deprecations.silence_deprecations()` themselves.
"""

from importlib import metadata

__version__ = "0.1.0"


def installed_versions(*dists: str) -> dict[str, str]:
    """The installed versions of these distributions (those not installed are left out)."""
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
