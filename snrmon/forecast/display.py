"""A forecast as a person reads it, shared by ``BasinEarlyStopping`` and ``snrmon forecast``: in the monitored
metric's own values (``mode="max"`` feeds the forecaster the mirrored curve) and with whole steps.

The forecaster finds the basin of a curve that falls, then turns up. A higher-is-better metric (an accuracy)
rises, then turns down: its negation is such a curve, so ``mode="max"`` feeds ``-value``, and everything shown
to the user (values, the loss at the basin, the figure) is mirrored back here.
"""

from __future__ import annotations

import dataclasses
import math

from snrmon.forecast.forecaster import Forecast, Projection

MODES = {"min": 1.0, "max": -1.0}  # the sign that turns the metric into a lower-is-better curve
LAW_NEEDS_POSITIVE = (
    "the loss-only forecast fits the Shannon law to log-losses, so it skips values <= 0 and forecasts "
    "nothing from them"
)


def mode_sign(mode: str) -> float:
    """The sign for ``mode`` ("min": lower is better, "max": higher is better); ValueError otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return MODES[mode]


def as_metric(forecast: Forecast, sign: float) -> Forecast:
    """``forecast`` with its values in the metric's own sign (x, D* and decisions do not depend on it)."""
    if sign > 0:
        return forecast
    at = forecast.loss_at_d_star
    return dataclasses.replace(forecast, loss=-forecast.loss, loss_at_d_star=None if at is None else -at)


def projection_as_metric(projection: Projection | None, sign: float) -> Projection | None:
    """The curve ahead in the metric's own sign (mirrored, the band's edges swap)."""
    if projection is None or sign > 0:
        return projection
    return dataclasses.replace(
        projection,
        loss=[-v for v in projection.loss],
        low=[-v for v in projection.high],
        high=[-v for v in projection.low],
    )


def format_step(value: float | None) -> str:
    """A step count as a whole number: a forecast D* of 771.7 steps reads "772". "-" for none; "inf" for
    none in sight, or a band's end far beyond any run (a line that barely falls, extrapolated); beyond a
    billion steps, four digits and an exponent (a whole number all the same)."""
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1e100:
        return "inf" if value > 0 else "-inf"
    return str(round(value)) if abs(value) < 1e9 else f"{value:.4g}"
