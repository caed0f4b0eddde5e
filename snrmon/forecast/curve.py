"""The points of one monitored curve, as fed to the forecaster, and the finite part every signal reads."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

# The evidence tests run at every point of a long run: at 3 standard errors a chance pass is rare (0.1% a
# test) where 2 would pass every few dozen points on a noisy plateau.
Z_EVIDENCE = 3.0
# The fits square values: beyond this they overflow double precision (1.8e308) with room for sums over many
# points. A curve beyond it is refused (the commands) or not forecast (a note), never silently misread.
LARGEST = 1e150


@dataclass
class Points:
    x: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train: list[float] = field(default_factory=list)  # NaN where not given

    def __post_init__(self) -> None:
        self._finite = _FiniteArrays()

    def finite(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, the monitored loss and the training loss (moved to each point, see :func:`train_at_points`)
        where the loss is finite and x positive. Kept up to date point by point, so a replay of n points
        converts each once (O(n) in all, not O(n²)); the arrays are views, to be read, not written."""
        arrays = self._finite
        for i in range(arrays.seen, len(self.x)):
            x, loss, train = self.x[i], self.loss[i], self.train[i]
            if i > 0:  # the vectorised train_at_points, one point at a time (the same operations)
                x_before = self.x[i - 1]
                middle_before = ((self.x[i - 2] if i > 1 else 0.0) + x_before) / 2
                middle = (x_before + x) / 2
                span = middle - middle_before  # 0 only for points at x <= 0, which are skipped below
                step = (train - self.train[i - 1]) / span * (x - middle) if span > 0 else math.nan
                train = train + step if math.isfinite(step) else train
            if math.isfinite(loss) and x > 0:
                arrays.append(x, loss, train)
        arrays.seen = len(self.x)
        return arrays.view()


class _FiniteArrays:
    """Three float arrays grown by doubling: appending is amortised O(1) and a read costs no copy."""

    def __init__(self) -> None:
        self.data = np.empty((3, 64))
        self.size = 0
        self.seen = 0  # points of the curve already looked at

    def append(self, x: float, loss: float, train: float) -> None:
        if self.size == self.data.shape[1]:
            self.data = np.concatenate([self.data, np.empty_like(self.data)], axis=1)
        self.data[:, self.size] = (x, loss, train)
        self.size += 1

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, loss, train = self.data[:, : self.size]
        return x, loss, train


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


# What ``np.sum`` and ``.mean()`` run, without their wrappers: the forecaster calls ``slope`` five times a
# point on arrays of 8 to 16 values, where the wrappers cost more than the sums (the same numbers).
_sum = np.add.reduce


def slope(u: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y against u and its standard error."""
    n = len(u)
    u = u - _sum(u) / n
    denominator = float(_sum(u * u))
    if denominator <= 0 or n < 3:
        return 0.0, math.inf
    centred = y - _sum(y) / n
    value = float(_sum(u * centred) / denominator)
    residuals = centred - value * u
    return value, math.sqrt(float(_sum(residuals * residuals)) / (n - 2) / denominator)


@functools.cache  # a few dozen distinct dof; scipy's ppf costs more than a forecast's maths
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
