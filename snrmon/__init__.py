"""snrmon: live gradient signal-to-noise monitoring and the Shannon scaling law.

The core (this package, without ``snrmon.callbacks``) is framework-free: plain torch for the estimator and
numpy/scipy for the laws. Torch is imported only when the estimator is used, so ``snrmon fit`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GradientNoiseEstimator": "snrmon.estimator",
    "GradientTaps": "snrmon.taps",
    "group_parameters": "snrmon.groups",
    "LAWS": "snrmon.laws",
    "get_law": "snrmon.laws",
    "fit_law": "snrmon.fitting",
    "FitError": "snrmon.fitting",
    "basin_tokens": "snrmon.basin",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'snrmon' has no attribute {name!r}")
