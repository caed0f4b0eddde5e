"""snrmon: live gradient signal-to-noise monitoring and the Shannon scaling law.

The core (this package, without ``snrmon.callbacks``) is framework-free, one subpackage per concern:
``measure`` (gradient taps, the signal/noise estimator, probes: torch), ``laws`` (the scaling laws, fitting,
basins: numpy/scipy), ``forecast`` (the online basin forecaster), ``logs`` (reading CSV and TensorBoard runs)
and ``cli`` (the ``snrmon`` command). Torch is imported only when ``measure`` is used, so ``snrmon fit``
starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GradientMeter": "snrmon.measure",
    "GradientNoiseEstimator": "snrmon.measure",
    "GradientTaps": "snrmon.measure",
    "group_parameters": "snrmon.measure",
    "LAWS": "snrmon.laws",
    "get_law": "snrmon.laws",
    "fit_law": "snrmon.laws",
    "FitError": "snrmon.laws",
    "basin_tokens": "snrmon.laws",
    "BasinForecaster": "snrmon.forecast",
}
__all__ = list(_LAZY)


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'snrmon' has no attribute {name!r}")
