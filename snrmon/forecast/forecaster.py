"""The basin forecaster: where will a monitored loss curve turn up, and is it time to warn or to stop?

Framework-free (numpy and scipy). Feed it the points of one curve in order (x = tokens D or optimizer
steps, the monitored loss, optionally the mean training loss since the previous point); after every point
it answers with a :class:`Forecast`: the basin D* with an uncertainty band, the loss there, how far away it
is, and two decisions: *warning* (the basin is probably within the horizon, or entered) and *stop* (it is,
with the stated confidence). ``BasinEarlyStopping`` and ``snrmon forecast`` both drive exactly this class.

Two signals, chosen by what the curve carries (``method="auto"``); docs/forecast.md has the measurements
that chose them and the defaults:

* ``"ratio"`` (needs the training loss): the empirical one-step generalization ratio. Over a sliding window
  of points the monitored loss is regressed on the training loss; the slope r = dL_val / dL_train says how
  much of each training improvement still reaches held-out data (near 1 while the model generalises,
  falling toward 0 as it starts to memorise, negative once the monitored loss rises while the training
  loss still falls). A straight line through the recent values of r against log x, extrapolated to
  r = 0.1, places the basin: its edge, where held-out gains fall below a tenth of the training gains (the
  minimum, r = 0, lies at or just beyond it). Drawing the line's two coefficients from their least-squares
  covariance gives the band and the probability that the basin lies within the horizon. A ratio near zero
  also comes from a plateau, so a decision needs evidence of memorisation too: over twice the window, the
  training loss still falls and the generalization gap widens, both significantly.
* ``"law"`` (the loss alone): the single-run Shannon law (T9) fitted to the whole curve as it grows (warm
  started from the previous fit, a fresh multi-start search when the curve has grown by half), with the
  basin from T10 and its band from the fit's Laplace approximation.
* ``"prior"`` (the loss alone, and a prior that gives every constant of this run): the family's law carried
  over to this run (T6–T8 at its N: the exponents and the data and irreducible noise are the family's), with
  only this run's scale A and model-data noise c refitted to its points; from its first few points, since two
  constants need few. Measured on Pythia (a prior fitted to the other sizes): docs/forecast.md.

A stop also needs the monitored curve itself to agree (its slope against log x over the window is no
longer significantly negative), and every decision must hold at ``persist`` consecutive points.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import norm
from scipy.stats import t as student_t

from snrmon.laws.basin import basin_tokens
from snrmon.laws.equations import ShannonRunLaw
from snrmon.laws.fitting import FitError, fit_law

# Defaults chosen by benchmarks/forecast_eval.py (docs/forecast.md): they are the product.
HORIZON = 0.25  # warn when the basin is forecast within 25% more training than done so far
CONFIDENCE = 0.9  # stop when the basin is within the horizon (or entered) with this probability
MIN_POINTS = 10  # no forecast before this many finite points (the law has 7 constants)
WINDOW = 8  # points in the sliding window of the local slopes and of the ratio
PERSIST = 1  # consecutive points a warning or stop condition must hold
# The evidence tests run at every point of a long run: at 3 standard errors a chance pass is rare (0.1% a
# test) where 2 would pass every few dozen points on a noisy plateau.
Z_EVIDENCE = 3.0
# The basin's edge: where held-out gains fall below a tenth of the training gains. The minimum itself (r = 0)
# lies at or just beyond it; on the tuning runs a ratio hovering near 0.1 for many checks before its minimum
# (label noise) otherwise kept every zero-crossing forecast at infinity (docs/forecast.md).
RATIO_FLOOR = 0.1
# With a prior that gives every constant, two are refitted (A, c): a forecast from this many points on. A stop
# still waits for min_points (the curve's own slope must be measurable to agree).
PRIOR_MIN_POINTS = 4
PRIOR_DEPARTURE = 100.0  # a refitted c this factor from the family's is noted as a prior that may not fit
EVIDENCE_WINDOWS = 2  # the evidence tests look back this many windows
SAMPLES = 400  # Monte Carlo draws for the band and the probabilities
STATES = ("no forecast", "improving", "basin ahead", "basin entered")


class PriorError(ValueError):
    """A prior that cannot be used (another law, unreadable, or no constants)."""


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


@dataclass
class _Points:
    x: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train: list[float] = field(default_factory=list)  # NaN where not given


class BasinForecaster:
    """Forecasts the basin of one monitored curve, point by point.

    Args:
        horizon: warn (and, with ``confidence``, stop) when the basin is forecast within ``horizon`` times the
            training done so far (x·(1 + horizon)), or has been entered.
        confidence: the probability the basin must have (within the horizon or entered) to stop.
        min_points: finite points needed before any forecast; before that, no warning and no stop (with a
            prior that gives every constant: forecasts and warnings from ``PRIOR_MIN_POINTS`` points on,
            stops from ``min_points``).
        window: points in the sliding window of the local slopes and the ratio.
        persist: consecutive points at which a warning (or stop) condition must hold before it is given.
        method: ``"auto"``: ``"prior"`` when the prior gives every constant of this run, until ``min_points``
            and from then on when there is no training loss; else ``"ratio"`` when training losses are
            given, ``"law"`` when not. Or one of ``"ratio"``, ``"law"``, ``"prior"``.
        prior: a fit of earlier runs: the path or dict of ``snrmon fit --json`` with ``--law shannon`` (runs
            of other sizes) or ``shannon-run``, or a dict of constants; see :func:`load_prior`. It starts the
            law fit; when it gives every constant of this run (``shannon-run``, or ``shannon`` with
            ``n_params``) it forecasts D* from the first point, and the ``"prior"`` method refits this run's
            A and c from ``PRIOR_MIN_POINTS`` points on.
        n_params: this run's parameter count N, to carry a ``shannon`` prior over to it (T10: D* ∝ 1/N when
            the cross-term dominates).
        tokens_per_x: tokens D per unit of x (e.g. tokens per optimizer step), the unit of a prior's D.
        max_seconds: time allowed for one law fit: a multi-start search that the last one's time per point
            says would take longer is skipped (the warm refit is kept), so a forecast never holds up training
            for long (the first search, at ``min_points``, is not predicted: about 1 s on a 2-core CPU).
        seed: seeds the Monte Carlo draws, so replays are reproducible.
    """

    def __init__(
        self,
        horizon: float = HORIZON,
        confidence: float = CONFIDENCE,
        min_points: int = MIN_POINTS,
        window: int = WINDOW,
        method: str = "auto",
        persist: int = PERSIST,
        prior: dict | str | Path | None = None,
        n_params: float | None = None,
        tokens_per_x: float = 1.0,
        max_seconds: float = 2.0,
        seed: int = 0,
    ) -> None:
        if not horizon >= 0:
            raise ValueError(f"horizon must be >= 0, got {horizon}")
        if not 0.5 <= confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
        if window < 3:
            raise ValueError(f"window must be at least 3 points, got {window}")
        if min_points < window + 2:
            raise ValueError(f"min_points must be at least window + 2 = {window + 2}, got {min_points}")
        if method not in ("auto", "ratio", "law", "prior"):
            raise ValueError(f"method must be 'auto', 'ratio', 'law' or 'prior', got {method!r}")
        self.horizon, self.confidence, self.min_points, self.window = horizon, confidence, min_points, window
        self.method, self.max_seconds, self.seed = method, max_seconds, seed
        if persist < 1:
            raise ValueError(f"persist must be at least 1, got {persist}")
        self.persist = persist
        if not (math.isfinite(tokens_per_x) and tokens_per_x > 0):
            raise ValueError(f"tokens_per_x must be a positive number, got {tokens_per_x}")
        self.tokens_per_x = tokens_per_x
        self.prior = load_prior(prior, n_params) if prior is not None else None
        self.full_prior = self.prior is not None and all(name in self.prior for name in RUN_CONSTANTS)
        # A prior that cannot forecast: said once by whoever drives the forecaster (command, callback).
        self.prior_note: str | None = None
        if self.prior is not None and not self.full_prior:
            missing = ", ".join(name for name in RUN_CONSTANTS if name not in self.prior)
            needs_n = " (a shannon fit needs this run's parameter count: n_params, --N)" * ("A" in missing)
            self.prior_note = (
                f"the prior does not give this run's {missing}{needs_n}: it only starts the law fit, and "
                "forecasts nothing from the family"
            )
        if method == "prior" and not self.full_prior:
            raise ValueError(
                "method='prior' needs a prior that gives every constant of this run: a shannon-run fit, or a "
                "shannon fit with n_params"
            )
        self.points = _Points()
        self.history: list[Forecast] = []
        # What the latest forecast needs to draw the curve ahead, and that curve once asked for (`projection`;
        # not saved: rebuilt at the next forecast).
        self._latest: tuple | None = None
        self._projection: Projection | None = None
        # The law's fitted constants, draws of them, and their x scale: the projection's curve and band.
        self._curve_draws: tuple[np.ndarray, np.ndarray, float] | None = None
        self.prior_departure = 1.0  # this run's refitted c over the prior's (the "prior" method)
        self._theta: np.ndarray | None = None  # the last law fit, in natural units of x / x_scale
        self._searched_at = 0  # points at the last multi-start search
        self._search_seconds_per_point = 0.0  # its time over its points: predicts the next one's
        self._streaks = [0, 0]  # consecutive points meeting the warning and the stop condition

    # -- feeding points --------------------------------------------------------------------------------

    def update(self, x: float, loss: float, train_loss: float | None = None) -> Forecast:
        """Add the point (x, loss[, mean training loss since the previous point]) and forecast."""
        x, loss = float(x), float(loss)
        train = float(train_loss) if train_loss is not None else math.nan
        if not math.isfinite(x):
            raise ValueError(f"x must be a finite number, got {x}")
        if self.points.x and x <= self.points.x[-1]:
            raise ValueError(f"points must come in increasing x: {x} after {self.points.x[-1]}")
        self.points.x.append(x)
        self.points.loss.append(loss)
        self.points.train.append(train)
        # A forecast informs training and must never end it: numerical trouble in the fits (overflow in an
        # extreme draw, a degenerate window) is handled where it can be, and anything left is a note.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", np.exceptions.RankWarning)
            try:
                forecast = self._forecast(x, loss)
            except (ArithmeticError, ValueError, np.linalg.LinAlgError) as error:
                self._latest = self._projection = None
                forecast = Forecast(x, loss, note=f"no forecast: {type(error).__name__}: {error}")
        self.history.append(forecast)
        return forecast

    def replay(
        self,
        x: Sequence[float],
        loss: Sequence[float],
        train_loss: Sequence[float | None] | None = None,
    ) -> list[Forecast]:
        """Feed a whole curve point by point; the forecast after each point."""
        train_loss = [None] * len(x) if train_loss is None else train_loss
        return [self.update(*point) for point in zip(x, loss, train_loss, strict=True)]

    # -- state (BasinEarlyStopping saves it in checkpoints) ---------------------------------------------

    def state_dict(self) -> dict:
        return {
            "points": asdict(self.points),
            "history": [f.as_dict() for f in self.history],
            "theta": None if self._theta is None else self._theta.tolist(),
            "searched_at": self._searched_at,
            "search_seconds_per_point": self._search_seconds_per_point,
            "streaks": list(self._streaks),
        }

    def load_state_dict(self, state: dict) -> None:
        self.points = _Points(**state["points"])
        self.history = [Forecast(**f) for f in state["history"]]
        self._theta = None if state["theta"] is None else np.asarray(state["theta"], dtype=float)
        self._searched_at = state["searched_at"]
        self._search_seconds_per_point = state.get("search_seconds_per_point", 0.0)
        self._streaks = list(state["streaks"])

    # -- forecasting ------------------------------------------------------------------------------------

    def _finite(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, loss, train = (
            np.asarray(v, dtype=float) for v in (self.points.x, self.points.loss, self.points.train)
        )
        keep = np.isfinite(loss) & (x > 0)
        return x[keep], loss[keep], _train_at_points(x, train)[keep]

    def _forecast(self, x_now: float, loss_now: float) -> Forecast:
        forecast = Forecast(x_now, loss_now)
        self._latest = self._projection = None
        if not math.isfinite(loss_now):
            forecast.note = "non-finite loss: skipped"
            return forecast
        x, loss, train = self._finite()
        method = self._method(train[-self.window :], len(x))
        if method in ("law", "prior"):  # laws of log-losses: a loss of 0 or below is no point of theirs
            positive = loss > 0
            x, loss, train = x[positive], loss[positive], train[positive]
        needed = PRIOR_MIN_POINTS if method == "prior" else self.min_points
        if len(x) < needed:
            forecast.note = f"{len(x)} finite points of {needed} needed"
            self._prior_forecast(forecast)
            return forecast
        if method == "ratio" and not np.all(np.isfinite(train[-self.window :])):
            forecast.note = "no training loss in the window: no ratio forecast"
            return forecast
        rng = np.random.default_rng(self.seed + len(x))
        self._curve_draws = None
        if method == "ratio":
            draws = self._ratio_draws(x, loss, train, rng)
        elif method == "prior":
            draws = self._prior_draws(x, loss, rng)
        else:
            draws = self._law_draws(x, loss, rng)
        if draws is None:
            forecast.note = f"{method}: no forecast at this point"
            return forecast
        self._decide(forecast, x, loss, train, draws, method)
        self._latest = (forecast, x, loss, method, self._curve_draws)
        if method == "prior" and self.prior_departs:
            forecast.note = (
                f"this run departs from the prior: its model-data noise c refits to "
                f"{self.prior_departure:.3g}x the family's (a prior of another setup or unit?)"
            )
        if len(x) < self.min_points:  # the prior's early forecast warns; a stop waits for the curve's own say
            forecast.stop = False
            self._streaks[1] = 0
        return forecast

    @property
    def projection(self) -> Projection | None:
        """The curve ahead as the latest forecast sees it (None after a point without one): for figures, so
        computed only when asked for."""
        if self._projection is None and self._latest is not None:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                warnings.simplefilter("ignore", np.exceptions.RankWarning)
                self._projection = self._project(*self._latest)
        return self._projection

    @property
    def prior_departs(self) -> bool:
        """This run's refitted c lies more than PRIOR_DEPARTURE times from the prior's: it may not fit."""
        return not 1 / PRIOR_DEPARTURE <= self.prior_departure <= PRIOR_DEPARTURE

    def _method(self, recent_train: np.ndarray, points: int) -> str:
        if self.method != "auto":
            return self.method
        with_train = len(recent_train) > 0 and bool(np.all(np.isfinite(recent_train)))
        if self.full_prior and (points < self.min_points or not with_train):
            return "prior"  # the family's law refitted: from a few points, and whenever the loss is alone
        return "ratio" if with_train else "law"

    def _decide(self, forecast: Forecast, x, loss, train, draws: np.ndarray, method: str) -> None:
        """Band, probability and decisions from Monte Carlo draws of D* (inf: no basin in that draw)."""
        x_now = float(x[-1])
        draws = np.where(draws <= x_now * (1 + 1e-9), np.minimum(draws, x_now), draws)  # crossed: no rounding
        draws = np.maximum(draws, x[0])  # a basin before the first point is one at the first point
        tail = (1 - self.confidence) / 2
        forecast.method = method
        # Quantiles without interpolation: draws may be inf (no basin in that draw).
        low, median, high = np.quantile(draws, [tail, 0.5, 1 - tail], method="inverted_cdf")
        forecast.d_star, forecast.d_star_low, forecast.d_star_high = float(median), float(low), float(high)
        forecast.steps_to_basin = max(forecast.d_star - x_now, 0.0)
        forecast.p_basin = float(np.mean(draws <= x_now * (1 + self.horizon)))
        # Before stopping, the monitored curve must agree: it no longer falls significantly.
        short = np.log(x[-self.window :])
        slope, slope_se = _slope(short, loss[-self.window :])
        flat_or_rising = slope + 2 * slope_se >= 0
        # The loss alone (law, prior): a warning, too, waits for a flat curve, and a basin needs a fall
        # before it (a curve flat or noisy from the start has no basin, whatever a fit makes of it).
        fallen = _has_fallen(loss, self.window)
        evidence = flat_or_rising and fallen
        if method == "ratio":
            # A ratio near zero also comes from a plateau where the training loss is as flat as the monitored
            # one (noise in the training loss pulls the regression slope toward zero). A basin shows more:
            # over a longer window the training loss still falls and the generalization gap widens, both
            # significantly.
            long = slice(-EVIDENCE_WINDOWS * self.window, None)
            u = np.log(x[long])
            train_slope, train_se = _slope(u, train[long])
            gap, gap_se = _slope(u, loss[long] - train[long])
            # Standard errors from a dozen points are themselves uncertain: the t quantile with the same tail
            # probability as Z_EVIDENCE normal standard deviations.
            z = float(student_t.ppf(norm.cdf(Z_EVIDENCE), df=max(len(u) - 2, 1)))
            evidence = train_slope + z * train_se < 0 and gap - z * gap_se > 0
        # Whatever the signal says: a monitored loss that has risen significantly over the long window has
        # passed its basin (a noisy training loss, e.g. a small shard per rank, can hide the evidence above).
        long = slice(-EVIDENCE_WINDOWS * self.window, None)
        rise, rise_se = _slope(np.log(x[long]), loss[long])
        z = float(student_t.ppf(norm.cdf(Z_EVIDENCE), df=max(len(x[long]) - 2, 1)))
        if rise - z * rise_se > 0 and fallen:  # a rise after a fall, not noise
            lowest = float(x[long][np.argmin(loss[long])])
            if forecast.d_star > x_now or forecast.p_basin < self.confidence:
                forecast.d_star = forecast.d_star_low = forecast.d_star_high = lowest
                forecast.steps_to_basin, forecast.p_basin = 0.0, 1.0
                forecast.note = "the monitored loss has risen significantly: basin entered"
            evidence = flat_or_rising = True
        at = self._loss_at(forecast.d_star, x, loss)
        forecast.loss_at_d_star = at if at is not None and math.isfinite(at) else None
        entered = forecast.p_basin >= self.confidence and forecast.d_star <= x_now
        # A decision must hold at `persist` consecutive points: one lucky window is not a basin.
        stop = forecast.p_basin >= self.confidence and evidence and flat_or_rising
        self._streaks[0] = self._streaks[0] + 1 if forecast.p_basin >= 0.5 and evidence else 0
        self._streaks[1] = self._streaks[1] + 1 if stop else 0
        forecast.warning = self._streaks[0] >= self.persist
        forecast.stop = self._streaks[1] >= self.persist
        if forecast.d_star == math.inf:
            forecast.state = "improving"
        else:
            behind = forecast.warning and forecast.d_star <= x_now  # warned, and the forecast is behind us
            forecast.state = (
                "basin entered" if entered or behind else "basin ahead" if forecast.warning else "improving"
            )

    def _loss_at(self, d_star: float, x: np.ndarray, loss: np.ndarray) -> float | None:
        """The monitored loss at D*: the lowest value of a quadratic in log x through the window between now
        and D* (the curve's minimum is its basin, and a parabola through a flattening window turns up too
        soon to be read at D* itself); once D* is behind us, the lowest loss seen in the last two windows."""
        if not math.isfinite(d_star):
            return None
        if d_star <= x[-1]:
            return float(np.min(loss[-2 * self.window :]))
        u = np.log(x[-self.window :])
        coefficients = np.polyfit(u - u[-1], loss[-self.window :], 2)
        value = float(np.min(np.polyval(coefficients, np.linspace(0.0, math.log(d_star) - u[-1], 32))))
        return value if math.isfinite(value) else None

    def _project(self, forecast: Forecast, x, loss, method: str, curve_draws) -> Projection | None:
        """The curve ahead for the figure: to 1.5 horizons past now, and on to just past a basin ahead
        (at most 4x the training done)."""
        x_now = x[-1]
        end = x_now * (1 + self.horizon) * 1.5
        if math.isfinite(forecast.d_star) and forecast.d_star > x_now:
            end = max(end, min(forecast.d_star * 1.2, 4 * x_now))
        tail = (1 - self.confidence) / 2
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
            u = np.log(x[-self.window :]) - math.log(x_now)
            try:
                coefficients, covariance = np.polyfit(u, loss[-self.window :], 2, cov=True)
            except (ValueError, np.linalg.LinAlgError):
                return None
            grid = np.geomspace(x[-self.window], end, 32)
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

    # -- the ratio signal -------------------------------------------------------------------------------

    def _ratio_draws(self, x, loss, train, rng) -> np.ndarray | None:
        """Draws of D* from the trend of the generalization ratio r = dL_val/dL_train over sliding windows."""
        w = self.window
        u, ratios = [], []
        for end in range(w, len(x) + 1):
            t, v = train[end - w : end], loss[end - w : end]
            if not np.all(np.isfinite(t)) or np.ptp(t) <= 1e-12 * max(abs(t).max(), 1e-12):
                continue
            # Only a falling training loss makes the ratio meaningful.
            if _slope(np.log(x[end - w : end]), t)[0] >= 0:
                continue
            ratios.append(np.polyfit(t, v, 1)[0])
            u.append(math.log(x[end - 1]))
        if len(ratios) < 3:
            return None
        u, ratios = np.asarray(u[-w:]), np.asarray(ratios[-w:])
        return _zero_crossing_draws(u, ratios - RATIO_FLOOR, rng)  # where r crosses the floor

    # -- the law signal ---------------------------------------------------------------------------------

    def _law_draws(self, x, loss, rng) -> np.ndarray | None:
        """Draws of D* from a fit of the single-run law (T9) and its Laplace approximation."""
        law = ShannonRunLaw()
        scale = x[0]  # fit in units of the first point: the constants stay in their usual ranges
        columns = {"D": x / scale}
        fit = self._fit_law(law, columns, loss, scale)
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
        self._curve_draws = (theta, np.exp(samples), scale)
        draws = np.array([_run_basin(np.exp(s)) for s in samples])
        return np.where(np.isnan(draws), np.inf, draws) * scale

    def _fit_law(self, law: ShannonRunLaw, columns, loss, scale: float):
        start = self._theta if self._theta is not None else self._prior_theta(law, scale)
        fit = None
        if start is not None:
            try:
                fit = fit_law(law, columns, loss, starts=0, theta0=start)
            except FitError:
                fit = None
        # A fresh search when the curve has grown by half since the last one (or nothing to warm start from),
        # unless the last search's time per point says this one would take longer than max_seconds.
        grown = fit is None or len(loss) >= 1.5 * self._searched_at
        if grown and self._search_seconds_per_point * len(loss) <= self.max_seconds:
            began = time.perf_counter()
            try:
                searched = fit_law(law, columns, loss, starts=64, refine=4, theta0=start, seed=self.seed)
                if fit is None or searched.cost < fit.cost:
                    fit = searched
            except FitError:
                pass
            self._searched_at = len(loss)
            self._search_seconds_per_point = (time.perf_counter() - began) / len(loss)
        if fit is not None:
            self._theta = fit.theta
        return fit

    def _prior_theta(self, law: ShannonRunLaw, scale: float) -> np.ndarray | None:
        """The prior's constants in the units of the fit (x / scale, with the prior's D = x·tokens_per_x);
        missing ones from the law's starts."""
        if self.prior is None:
            return None
        values = dict(zip(law.param_names, law.starts(1)[0], strict=True))
        values.update({k: v for k, v in self.prior.items() if k in values})
        # D = s·D' turns D^β / (c D^γ + d D^δ + e) into the same form in D' with c·s^(γ−β), d·s^(δ−β), e·s^−β.
        s = scale * self.tokens_per_x
        beta, gamma, delta = values["beta"], values["gamma"], values["delta"]
        for name, exponent in (("c", gamma - beta), ("d", delta - beta), ("e", -beta)):
            if name in self.prior:
                values[name] *= s**exponent
        return np.array([values[name] for name in law.param_names])

    def _prior_draws(self, x, loss, rng) -> np.ndarray | None:
        """Draws of D* from the prior's law with this run's A and c refitted to its points (least squares on
        log losses), c drawn from the fit's Student-t Laplace approximation (few points: t, not normal)."""
        law = ShannonRunLaw()
        scale = x[0]
        columns = {"D": x / scale}
        theta = self._prior_theta(law, scale)
        free = [law.param_names.index("A"), law.param_names.index("c")]

        def constants(log_free: np.ndarray) -> np.ndarray:
            values = theta.copy()
            values[free] = np.exp(log_free)
            return values

        def residuals(log_free: np.ndarray) -> np.ndarray:
            return law.log_loss(constants(log_free), columns) - np.log(loss)

        def jacobian(log_free: np.ndarray) -> np.ndarray:
            return law.log_loss_jacobian(constants(log_free), columns)[:, free]

        try:
            solution = least_squares(residuals, np.log(theta[free]), jac=jacobian, method="trf")
        except ValueError:  # residuals not finite at the prior's constants: a prior this run cannot use
            return None
        if not (solution.success and np.all(np.isfinite(solution.x))):
            return None
        # The family's c is this run's model-data noise: a refit far from it says the prior may not fit.
        self.prior_departure = float(np.exp(solution.x[1]) / theta[free[1]])
        dof = max(len(loss) - len(free), 1)
        sigma2 = float(np.sum(solution.fun**2) / dof)
        covariance = sigma2 * np.linalg.pinv(solution.jac.T @ solution.jac)
        covariance = (covariance + covariance.T) / 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            normal = rng.multivariate_normal(np.zeros(len(free)), covariance, size=SAMPLES, method="eigh")
        samples = solution.x + normal / np.sqrt(rng.chisquare(dof, size=(SAMPLES, 1)) / dof)
        self._curve_draws = (
            constants(solution.x),
            np.array([constants(s) for s in samples[: SAMPLES // 4]]),
            scale,
        )
        draws = np.array([_run_basin(constants(s)) for s in samples])
        return np.where(np.isnan(draws), np.inf, draws) * scale

    def _prior_forecast(self, forecast: Forecast) -> None:
        """Before the data can speak: D* and the loss there from a prior that gives every constant."""
        law = ShannonRunLaw()
        if not self.full_prior:
            return
        theta = np.array([self.prior[name] for name in law.param_names])
        d_star = _run_basin(theta)  # in the prior's tokens
        forecast.method = "prior"
        forecast.d_star = d_star / self.tokens_per_x
        if math.isfinite(d_star):
            at = float(law.loss(theta, {"D": np.array([d_star])})[0])
            forecast.loss_at_d_star = at if math.isfinite(at) else None
            forecast.steps_to_basin = max(forecast.d_star - forecast.x, 0.0)
        forecast.note += "; D* from the prior"


def _train_at_points(x: np.ndarray, train: np.ndarray) -> np.ndarray:
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


def _has_fallen(loss: np.ndarray, window: int) -> bool:
    """Whether the curve has come down from where it started: its first point above the mean of its last
    ``window`` points by more than Z_EVIDENCE standard errors (one comparison, fixed before looking: the
    lowest stretch instead would pass on pure noise), with the point-to-point noise estimated robustly from
    consecutive differences, which a trend barely moves."""
    w = min(window, len(loss) // 2)
    if w < 2:
        return False
    noise = 1.4826 * float(np.median(np.abs(np.diff(loss)))) / math.sqrt(2)
    # The noise is itself estimated from few points: the t quantile of Z_EVIDENCE's tail, as elsewhere.
    z = float(student_t.ppf(norm.cdf(Z_EVIDENCE), df=max(len(loss) - 2, 1)))
    return float(loss[0] - loss[-w:].mean()) > z * noise * math.sqrt(1 + 1 / w)


def _run_basin(theta: np.ndarray) -> float:
    _, c, d, e, beta, gamma, delta = theta
    try:
        return basin_tokens(c, d, e, beta, gamma, delta)
    except (ValueError, OverflowError, ZeroDivisionError):  # a sampled law too extreme to solve: no basin
        return math.inf


def _slope(u: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y against u and its standard error."""
    u = u - u.mean()
    denominator = float(np.sum(u**2))
    if denominator <= 0 or len(u) < 3:
        return 0.0, math.inf
    slope = float(np.sum(u * (y - y.mean())) / denominator)
    residuals = y - y.mean() - slope * u
    return slope, math.sqrt(float(np.sum(residuals**2)) / (len(u) - 2) / denominator)


def _zero_crossing_draws(u: np.ndarray, r: np.ndarray, rng) -> np.ndarray:
    """Draws of exp(u*) where the line r = a + b·(u − u_now) crosses zero going down, its two coefficients
    drawn from their least-squares covariance. A falling line crosses at u_now − a/b: ahead while r is still
    positive, behind (the basin entered) once it is negative, then kept within the window. A line already
    below zero and rising has entered the basin at an unknown point: taken as now. One that stays positive
    gives inf."""
    centred = u - u[-1]
    design = np.stack([np.ones_like(centred), centred], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, r, rcond=None)
    residuals = r - design @ coefficients
    sigma2 = float(np.sum(residuals**2) / max(len(r) - 2, 1))
    covariance = sigma2 * np.linalg.pinv(design.T @ design)
    a, b = rng.multivariate_normal(coefficients, covariance, size=SAMPLES, method="eigh").T
    with np.errstate(divide="ignore", invalid="ignore"):
        ahead = np.where(b < 0, -a / b, np.where(a <= 0, 0.0, np.inf))
    ahead = np.clip(ahead, centred[0], 700.0)
    return np.where(np.isinf(ahead), np.inf, np.exp(u[-1] + np.minimum(ahead, 700.0)))


def load_prior(prior: dict | str | Path, n_params: float | None = None) -> dict[str, float]:
    """Constants of the single-run law (T9: A, c, d, e, β, γ, δ, in tokens D) that a prior carries over.

    ``prior`` is the JSON (path or parsed) of ``snrmon fit --json`` with ``--law shannon-run`` (every
    constant; with several runs, the first run's) or ``--law shannon``, or a dict of either law's constants. A
    ``shannon`` fit of runs of other sizes carries over d, e, β, γ, δ, which do not depend on N; with this
    run's ``n_params`` also A = a·N^α and c = c·N^γ (T9 folds N into them), so T10 gives this run's basin.

    Raises:
        PriorError: unreadable, a fit of another law, or no positive constants.
    """
    if isinstance(prior, (str, Path)):
        try:
            prior = json.loads(Path(prior).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PriorError(f"cannot read the prior {prior}: {error}") from None
    if not isinstance(prior, dict):
        raise PriorError("a prior is a JSON object of constants or the output of snrmon fit --json")
    params = prior.get("params", prior)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = next(iter(params.values()))  # per-run constants (single-run law): take the first run's
    if not isinstance(params, dict):
        raise PriorError("the prior's params are not an object of constants")
    law = prior.get("law") or ("shannon" if "alpha" in params else "shannon-run")
    if law not in ("shannon", "shannon-run"):
        raise PriorError(f"the prior is a fit of the {law} law; the forecaster needs shannon or shannon-run")
    try:
        values = {k: float(v) for k, v in params.items() if k in SHANNON_CONSTANTS}
    except (TypeError, ValueError):
        raise PriorError("the prior's constants are not numbers") from None
    if n_params is not None and not (math.isfinite(n_params) and n_params > 0):
        raise PriorError(f"n_params (this run's parameter count) must be a positive number, got {n_params}")
    if law == "shannon":
        n = n_params
        carried = {k: values[k] for k in ("d", "e", "beta", "gamma", "delta") if k in values}
        if n is not None and {"a", "alpha", "c", "gamma"} <= set(values):
            try:
                carried["A"] = values["a"] * n ** values["alpha"]
                carried["c"] = values["c"] * n ** values["gamma"]
            except (OverflowError, TypeError):
                raise PriorError(f"the prior's a·N^alpha or c·N^gamma is out of range at N = {n:g}") from None
        values = carried
    values = {k: v for k, v in values.items() if k in RUN_CONSTANTS}
    if not values or not all(math.isfinite(v) and v > 0 for v in values.values()):
        raise PriorError("the prior holds no positive constants of the Shannon law (beta, gamma, delta, ...)")
    # The fits keep every constant within the law's bounds; a prior outside them is of another law or unit.
    for param in ShannonRunLaw.params:
        value = values.get(param.name)
        if value is not None and not param.lower <= value <= param.upper:
            raise PriorError(
                f"the prior's {param.name} = {value:g} is outside the law's range ({param.lower:g} to "
                f"{param.upper:g})"
            )
    return values


RUN_CONSTANTS = ("A", "c", "d", "e", "beta", "gamma", "delta")
SHANNON_CONSTANTS = RUN_CONSTANTS + ("a", "alpha")
