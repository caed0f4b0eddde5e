"""The curve ahead for a figure: the law's fit and its band (signals that fit a law), or the window's
quadratic in log x and the band of its mean (the ratio, which forecasts from no law of the loss)."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import t as student_t

from snrmon.forecast.result import Forecast, Projection
from snrmon.laws.equations import ShannonRunLaw


def project(
    forecast: Forecast, x, loss, method: str, curve_draws, horizon: float, confidence: float, window: int
) -> Projection | None:
    """The curve ahead: to 1.5 horizons past now, and on to just past a basin ahead (at most 4x the training
    done)."""
    x_now = x[-1]
    end = x_now * (1 + horizon) * 1.5
    if math.isfinite(forecast.d_star) and forecast.d_star > x_now:
        end = max(end, min(forecast.d_star * 1.2, 4 * x_now))
    tail = (1 - confidence) / 2
    if curve_draws is not None:
        fitted, drawn, scale = curve_draws
        grid = np.geomspace(x[0], end, 64)
        law = ShannonRunLaw()
        with np.errstate(all="ignore"):
            middle = law.loss(fitted, {"D": grid / scale})
            curves = np.array([law.loss(theta, {"D": grid / scale}) for theta in drawn])
            low, high = np.nanquantile(curves, [tail, 1 - tail], axis=0)
        low, high = np.fmin(low, middle), np.fmax(high, middle)  # the fit itself is in its band
    else:  # the ratio: a quadratic in log x through the window, the band of its mean
        u = np.log(x[-window:]) - math.log(x_now)
        try:
            coefficients, covariance = np.polyfit(u, loss[-window:], 2, cov=True)
        except (ValueError, np.linalg.LinAlgError):
            return None
        # No further ahead (in log x) than the window reaches back: a parabola says nothing beyond (it
        # dived below zero on a cross-entropy run).
        grid = np.geomspace(x[-window], min(end, x_now * x_now / x[-window]), 32)
        v = np.log(grid) - math.log(x_now)
        basis = np.stack([v**2, v, np.ones_like(v)], axis=1)
        middle = basis @ coefficients
        spread = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", basis, covariance, basis), 0.0))
        quantile = float(student_t.ppf(1 - tail, df=max(len(u) - 3, 1)))
        low, high = middle - quantile * spread, middle + quantile * spread
    if not np.all(np.isfinite(middle)):
        return None
    curve = (grid.tolist(), middle.tolist(), low.tolist(), high.tolist())
    return Projection(*curve, method=method, d_star=forecast.d_star)
