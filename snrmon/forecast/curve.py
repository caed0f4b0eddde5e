"""The points of one monitored curve, as fed to the forecaster, and the finite part every signal reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

# The evidence tests run at every point of a long run: at 3 standard errors a chance pass is rare (0.1% a
# test) where 2 would pass every few dozen points on a noisy plateau.
Z_EVIDENCE = 3.0


@dataclass
class Points:
    x: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train: list[float] = field(default_factory=list)  # NaN where not given

    def finite(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, the monitored loss and the training loss (moved to each point) where the loss is finite and
        x positive."""
        x, loss, train = (np.asarray(v, dtype=float) for v in (self.x, self.loss, self.train))
        keep = np.isfinite(loss) & (x > 0)
        return x[keep], loss[keep], train_at_points(x, train)[keep]


def train_at_points(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """The training loss at each point from its mean over the interval before it.

    A mean over (x[i-1], x[i]] describes the model at the interval's middle, not at x[i]: while the loss
    falls it lags behind, and the lag shrinks as the curve flattens, which alone would look like a widening
    generalization gap. Move each mean to its point along the line through it and the previous mean.
    """
    edges = np.concatenate([[0.0], x])
    middle = (edges[:-1] + edges[1:]) / 2
    corrected = train.copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.diff(train) / np.diff(middle)
    step = slope * (x[1:] - middle[1:])
    corrected[1:] = np.where(np.isfinite(step), train[1:] + step, train[1:])
    return corrected


def slope(u: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y against u and its standard error."""
    u = u - u.mean()
    denominator = float(np.sum(u**2))
    if denominator <= 0 or len(u) < 3:
        return 0.0, math.inf
    value = float(np.sum(u * (y - y.mean())) / denominator)
    residuals = y - y.mean() - value * u
    return value, math.sqrt(float(np.sum(residuals**2)) / (len(u) - 2) / denominator)


def evidence_quantile(dof: int) -> float:
    """Standard errors from a dozen points are themselves uncertain: the t quantile (``dof`` degrees of
    freedom, at least 1) with the same tail probability as Z_EVIDENCE normal standard deviations."""
    return float(student_t.ppf(norm.cdf(Z_EVIDENCE), df=max(dof, 1)))


def has_fallen(loss: np.ndarray, window: int) -> bool:
    """Whether the curve has come down from where it started: its first point above the mean of its last
    ``window`` points by more than Z_EVIDENCE standard errors (one comparison, fixed before looking: the
    lowest stretch instead would pass on pure noise), with the point-to-point noise estimated robustly from
    consecutive differences, which a trend barely moves."""
    w = min(window, len(loss) // 2)
    if w < 2:
        return False
    noise = 1.4826 * float(np.median(np.abs(np.diff(loss)))) / math.sqrt(2)
    # The noise is itself estimated from few points: the t quantile of Z_EVIDENCE's tail, as elsewhere.
    z = evidence_quantile(len(loss) - 2)
    return float(loss[0] - loss[-w:].mean()) > z * noise * math.sqrt(1 + 1 / w)
