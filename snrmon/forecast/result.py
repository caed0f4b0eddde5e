"""What the forecaster answers: a :class:`Forecast` after each point, and the :class:`Projection` of the
curve ahead that a figure draws."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

STATES = ("no forecast", "improving", "basin ahead", "basin entered")


@dataclass
class Forecast:
    """The forecaster's answer after one point. ``None`` fields: no forecast yet (too few points)."""

    x: float
    loss: float
    d_star: float | None = None  # forecast basin (inf: none in sight)
    d_star_low: float | None = None  # band at the stated confidence
    d_star_high: float | None = None
    loss_at_d_star: float | None = None
    steps_to_basin: float | None = None  # d_star − x, 0 once entered
    p_basin: float | None = None  # probability that the basin lies within the horizon (or is entered)
    warning: bool = False
    stop: bool = False
    state: str = "no forecast"  # one of STATES
    method: str | None = None
    note: str = ""

    def as_dict(self) -> dict:
        """Plain Python values only (no numpy scalars), so a checkpoint holding it loads with
        ``torch.load(weights_only=True)``, torch's default."""
        return {k: float(v) if isinstance(v, np.floating) else v for k, v in asdict(self).items()}


@dataclass
class Projection:
    """The monitored curve ahead, as the latest forecast sees it: a central line and a band (the central
    ``confidence`` interval of the curve's mean) on a grid of x reaching past the forecast basin. From the
    fitted law's draws (methods ``law`` and ``prior``) or from the window's quadratic in log x (``ratio``,
    which forecasts from the generalization ratio, not from a law of the loss)."""

    x: list[float]
    loss: list[float]
    low: list[float]
    high: list[float]
    method: str
    d_star: float  # the forecast basin it goes with (inf: none)
