"""The law signal (the loss alone): the single-run Shannon law (T9) fitted to the whole curve as it grows
(warm started from the previous fit, a fresh multi-start search when the curve has grown by half), with the
basin from T10 and its band from the fit's Laplace approximation."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from snrmon.forecast.decision import SAMPLES, Draws
from snrmon.laws.basin import basin_tokens
from snrmon.laws.equations import ShannonRunLaw
from snrmon.laws.fitting import FitError, fit_law

REFIT_GROWTH = 0.01  # refit the law once the curve has grown by this share since the last fit
SEARCH_GROWTH = 1.5  # a fresh multi-start search once the curve has grown by half since the last one
# Beyond this many points warm refits carry on without fresh searches. A search costs about a second up to
# here whatever the length (its 64 starts, not the points, dominate: 1.0–1.4 s from 10 to 10,000 points on
# the 2-core CPU), and the searches come at x1.5 growth, so a replay or a live run never waits long; the rule
# depends on the points alone, so a replay makes the same searches as the live run on any machine.
SEARCH_MAX_POINTS = 10_000


class LawSignal:
    """D* draws from a fit of the single-run law and its Laplace approximation.

    Keeps the last fit (its warm start). A fresh multi-start search runs when the curve has grown by half
    since the last one, up to SEARCH_MAX_POINTS points. With ``max_seconds``, also the time per point of the
    last search, which predicts the next one's: a search predicted to take longer is skipped (the fits then
    depend on the machine's speed and load).
    """

    name = "law"

    def __init__(self, prior: dict | None, tokens_per_x: float, max_seconds: float | None, seed: int) -> None:
        self.prior, self.tokens_per_x = prior, tokens_per_x
        self.max_seconds, self.seed = max_seconds, seed
        self.theta: np.ndarray | None = None  # the last law fit, in natural units of x / x_scale
        self.searched_at = 0  # points at the last multi-start search
        self.search_seconds_per_point = 0.0  # its time over its points: predicts the next one's
        self._last: tuple[int, float, Draws] | None = None  # points, first x, draws of the last fit

    def draws(self, x: np.ndarray, loss: np.ndarray, rng) -> Draws | None:
        # A long curve changes little from one point to the next: the last fit's draws stand until it has
        # grown by REFIT_GROWTH (every point up to 100 points), so a point costs the same whatever the length.
        last = self._last
        if last is not None and len(loss) < last[0] * (1 + REFIT_GROWTH) and x[0] == last[1]:
            return last[2]
        draws = self._draws(x, loss, rng)
        self._last = None if draws is None else (len(loss), x[0], draws)
        return draws

    def cached_state(self) -> dict | None:
        """The last fit's draws, which stand until the curve has grown by REFIT_GROWTH: saved with the
        forecaster, so a resumed replay goes on exactly as an uninterrupted one (a few hundred numbers)."""
        if self._last is None:
            return None
        points, first_x, draws = self._last
        curve = None
        if draws.curve is not None:
            theta, samples, scale = draws.curve
            curve = [theta.tolist(), samples.tolist(), float(scale)]
        # Plain Python numbers only: a checkpoint holding them loads with torch.load(weights_only=True).
        d_star = draws.d_star.tolist()
        return {"points": int(points), "first_x": float(first_x), "d_star": d_star, "curve": curve}

    def load_cached_state(self, state: dict | None) -> None:
        self._last = None
        if state is not None:
            curve = state["curve"]
            if curve is not None:
                curve = (np.asarray(curve[0], dtype=float), np.asarray(curve[1], dtype=float), curve[2])
            draws = Draws(np.asarray(state["d_star"], dtype=float), curve)
            self._last = (state["points"], state["first_x"], draws)

    def _draws(self, x: np.ndarray, loss: np.ndarray, rng) -> Draws | None:
        law = ShannonRunLaw()
        scale = x[0]  # fit in units of the first point: the constants stay in their usual ranges
        columns = {"D": x / scale}
        fit = self._fit(law, columns, loss, scale)
        if fit is None:
            return None
        theta = fit.theta
        jacobian = law.log_loss_jacobian(theta, columns)
        residuals = law.log_loss(theta, columns) - np.log(loss)
        dof = max(len(loss) - len(theta), 1)
        sigma2 = float(np.sum(residuals**2) / dof)
        try:
            covariance = sigma2 * np.linalg.pinv(jacobian.T @ jacobian)
            covariance = (covariance + covariance.T) / 2  # symmetric to rounding, as the sampler checks
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                samples = rng.multivariate_normal(np.log(theta), covariance, size=SAMPLES // 4, method="eigh")
        except (np.linalg.LinAlgError, ValueError):
            return None
        lower, upper = law.bounds
        samples = np.clip(samples, np.log(lower), np.log(upper))
        d_star = np.array([run_basin(np.exp(s)) for s in samples])
        return Draws(np.where(np.isnan(d_star), np.inf, d_star) * scale, (theta, np.exp(samples), scale))

    def _fit(self, law: ShannonRunLaw, columns, loss, scale: float):
        start = self.theta
        if start is None and self.prior is not None:
            start = prior_theta(self.prior, law, scale * self.tokens_per_x)
        fit = None
        if start is not None:
            try:
                fit = fit_law(law, columns, loss, starts=0, theta0=start)
            except FitError:
                fit = None
        # A fresh search when the curve has grown by half since the last one (or nothing to warm start from),
        # up to SEARCH_MAX_POINTS; with max_seconds, unless the last search's time per point says this one
        # would take longer.
        grown = fit is None or len(loss) >= SEARCH_GROWTH * self.searched_at
        if self.max_seconds is None:
            allowed = len(loss) <= SEARCH_MAX_POINTS
        else:
            allowed = self.search_seconds_per_point * len(loss) <= self.max_seconds
        if grown and allowed:
            began = time.perf_counter()
            try:
                searched = fit_law(law, columns, loss, starts=64, refine=4, theta0=start, seed=self.seed)
                if fit is None or searched.cost < fit.cost:
                    fit = searched
            except FitError:
                pass
            self.searched_at = len(loss)
            self.search_seconds_per_point = (time.perf_counter() - began) / len(loss)
        if fit is not None:
            self.theta = fit.theta
        return fit


def prior_theta(prior: dict, law: ShannonRunLaw, tokens_scale: float) -> np.ndarray:
    """A prior's constants in the units of a fit whose x is D / ``tokens_scale`` (tokens per unit of the
    fit's x); missing ones from the law's starts."""
    values = dict(zip(law.param_names, law.starts(1)[0], strict=True))
    values.update({k: v for k, v in prior.items() if k in values})
    # D = s·D' turns D^β / (c D^γ + d D^δ + e) into the same form in D' with c·s^(γ−β), d·s^(δ−β), e·s^−β.
    s = tokens_scale
    beta, gamma, delta = values["beta"], values["gamma"], values["delta"]
    for name, exponent in (("c", gamma - beta), ("d", delta - beta), ("e", -beta)):
        if name in prior:
            values[name] *= s**exponent
    return np.array([values[name] for name in law.param_names])


def run_basin(theta: np.ndarray) -> float:
    """T10's basin of the single-run law's constants (A, c, d, e, β, γ, δ); inf where it has none."""
    _, c, d, e, beta, gamma, delta = theta
    try:
        return basin_tokens(c, d, e, beta, gamma, delta)
    except (ValueError, OverflowError, ZeroDivisionError):  # a sampled law too extreme to solve: no basin
        return math.inf
