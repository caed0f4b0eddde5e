"""The ratio signal (needs the training loss): the empirical one-step generalization ratio.

Over a sliding window of points the monitored loss is regressed on the training loss; the slope
r = dL_val / dL_train says how much of each training improvement still reaches held-out data (near 1 while the
model generalises, falling toward 0 as it starts to memorise, negative once the monitored loss rises while the
training loss still falls). A straight line through the recent values of r against log x, extrapolated to
r = RATIO_FLOOR, places the basin: its edge, where held-out gains fall below a tenth of the training gains
(the minimum, r = 0, lies at or just beyond it). Drawing the line's two coefficients from their least-squares
covariance gives the band and the probability that the basin lies within the horizon.
"""

from __future__ import annotations

import math

import numpy as np

from snrmon.forecast.curve import slope
from snrmon.forecast.decision import SAMPLES, Draws

# The basin's edge: where held-out gains fall below a tenth of the training gains. The minimum itself (r = 0)
# lies at or just beyond it; on the tuning runs a ratio hovering near 0.1 for many checks before its minimum
# (label noise) otherwise kept every zero-crossing forecast at infinity (docs/forecast.md).
RATIO_FLOOR = 0.1
# A line that barely falls crosses the floor absurdly far ahead (e^700 times the training done, before this
# bound): beyond a thousand times the training done, a crossing is no basin in sight.
FAR_AHEAD = 1e3


class RatioSignal:
    """D* draws from the trend of the generalization ratio over sliding windows of ``window`` points."""

    name = "ratio"

    def __init__(self, window: int) -> None:
        self.window = window
        # The ratio of each window seen so far (log x at its end, r), and where they end: a curve only grows,
        # so each window is regressed once, not again at every later point.
        self._u: list[float] = []
        self._ratios: list[float] = []
        self._ends = 0  # windows looked at (valid or not) ...
        self._last_x = math.nan  # ... of the curve whose point _ends - 1 + window lies at this x

    def draws(self, x: np.ndarray, loss: np.ndarray, train: np.ndarray, rng) -> Draws | None:
        w = self.window
        start = w + self._ends
        if self._ends and not (len(x) >= start - 1 and x[start - 2] == self._last_x):  # another curve
            self._u, self._ratios, self._ends = [], [], 0
            start = w
        for end in range(start, len(x) + 1):
            t, v = train[end - w : end], loss[end - w : end]
            # (relative, whatever the losses' scale: a curve of losses near 1e-30 is as good as one near 1)
            if not np.all(np.isfinite(t)) or np.ptp(t) <= 1e-12 * abs(t).max():
                continue
            # Only a falling training loss makes the ratio meaningful.
            if slope(np.log(x[end - w : end]), t)[0] >= 0:
                continue
            self._ratios.append(slope(t, v)[0])  # the least-squares slope: np.polyfit(t, v, 1)[0]
            self._u.append(math.log(x[end - 1]))
        self._ends = max(len(x) + 1 - w, 0)
        self._last_x = x[len(x) - 1] if self._ends else math.nan
        if len(self._ratios) < 3:
            return None
        u, ratios = np.asarray(self._u[-w:]), np.asarray(self._ratios[-w:])
        # The same drawn lines place the basin's edge (r crosses the floor: a warning) and its minimum
        # (r crosses zero: held-out gains have stopped, the point to stop at).
        edge, minimum = crossing_draws(u, ratios, (RATIO_FLOOR, 0.0), rng)
        return Draws(edge, minimum=minimum)


def crossing_draws(u: np.ndarray, r: np.ndarray, levels: tuple[float, ...], rng) -> list[np.ndarray]:
    """Draws of exp(u*) where the line r = a + b·(u − u_now) crosses each of ``levels`` going down, its two
    coefficients drawn (once, for every level) from their least-squares covariance. A falling line crosses at
    u_now + (level − a)/b: ahead while r is still above the level, behind (entered) once it is below, then
    kept within the window. A line already below the level and rising has crossed at an unknown point: taken
    as now. One that stays above, or crosses beyond FAR_AHEAD times the training done, gives inf: no crossing
    in sight."""
    # The least-squares line and its coefficients' covariance, sigma² (XᵀX)⁻¹, in closed form for two
    # coefficients (numpy's lstsq and pinv cost a third of a forecast on windows of a few points).
    n = len(r)
    centred = u - u[-1]
    mean_u, mean_r = float(np.add.reduce(centred)) / n, float(np.add.reduce(r)) / n
    spread = centred - mean_u
    s_uu = float(np.add.reduce(spread * spread))
    # Distinct x can share one log x (x ~ 1e16 in steps of 2): no trend to fit, a level with no slope (what
    # lstsq and pinv give for that rank-deficient design).
    b_hat = float(np.add.reduce(spread * (r - mean_r))) / s_uu if s_uu > 0 else 0.0
    a_hat = mean_r - b_hat * mean_u  # the line's value now (at u − u_now = 0)
    residuals = r - a_hat - b_hat * centred
    sigma2 = float(np.add.reduce(residuals * residuals)) / max(n - 2, 1)
    coefficients = np.array([a_hat, b_hat])
    if s_uu > 0:
        covariance = sigma2 / s_uu * np.array([[s_uu / n + mean_u**2, -mean_u], [-mean_u, 1.0]])
    else:
        covariance = np.array([[sigma2 / n, 0.0], [0.0, 0.0]])
    # rng.multivariate_normal(coefficients, covariance, size=SAMPLES, method="eigh") draws exactly these,
    # after input checks that cost as much as the rest of a forecast.
    scales, axes = np.linalg.eigh(covariance)
    normal = rng.standard_normal((SAMPLES, 2))
    a, b = (coefficients + normal @ (axes * np.sqrt(np.abs(scales))).T).T
    draws = []
    for level in levels:
        above = a - level
        with np.errstate(divide="ignore", invalid="ignore"):
            ahead = np.where(b < 0, -above / b, np.where(above <= 0, 0.0, np.inf))
        no_crossing = ahead > math.log(FAR_AHEAD)  # inf included: tested before clipping keeps it finite
        ahead = np.clip(ahead, centred[0], math.log(FAR_AHEAD))
        draws.append(np.where(no_crossing, np.inf, np.exp(u[-1] + ahead)))
    return draws


def zero_crossing_draws(u: np.ndarray, r: np.ndarray, rng) -> np.ndarray:
    """Draws of exp(u*) where the line through r against u crosses zero going down (see crossing_draws)."""
    return crossing_draws(u, r, (0.0,), rng)[0]
