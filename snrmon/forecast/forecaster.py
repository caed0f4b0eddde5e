"""The basin forecaster: where will a monitored loss curve turn up, and is it time to warn or to stop?

Framework-free (numpy and scipy). Feed it the points of one curve in order (x = tokens D or optimizer
steps, the monitored loss, optionally the mean training loss since the previous point); after every point
it answers with a :class:`Forecast`: the basin D* with an uncertainty band, the loss there, how far away it
is, and two decisions: *warning* (the basin is probably within the horizon, or entered) and *stop* (it is,
with the stated confidence). ``BasinEarlyStopping`` and ``snrmon forecast`` both drive this class.

The forecaster picks a signal by what the curve carries (``method="auto"``); each signal gives Monte Carlo
draws of D* for the curve (or nothing), and :class:`~snrmon.forecast.decision.Decider` weighs them and
decides. docs/forecast.md has the measurements that chose the signals and the defaults.

* ``"ratio"`` (needs the training loss): the trend of the generalization ratio dL_val / dL_train
  (:mod:`snrmon.forecast.ratio`);
* ``"law"`` (the loss alone): the single-run Shannon law (T9) fitted to the curve
  (:mod:`snrmon.forecast.law`);
* ``"prior"`` (the loss alone, and a prior that gives every constant of this run): the family's law with this
  run's A and c refitted, from its first few points (:mod:`snrmon.forecast.prior`).

With the training loss, a warning needs evidence of memorisation: the generalization gap widening
significantly, or, from outside the curve, the training set's gradient no larger than its own sampling noise
(``dataset_snr`` = N|G|²/tr Σ ≤ 1 at two consecutive points: an ``SNRMonitor`` measures it, and
``BasinEarlyStopping`` passes it on). A stop also needs the monitored curve itself to agree (its slope
against log x over the window is no longer significantly negative), and every decision must hold at
``persist`` consecutive points.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from snrmon.forecast.curve import LARGEST, Points
from snrmon.forecast.decision import Decider
from snrmon.forecast.law import LawSignal
from snrmon.forecast.prior import (
    PRIOR_MIN_POINTS,
    RUN_CONSTANTS,
    PriorError,
    PriorSignal,
    load_prior,
)
from snrmon.forecast.projection import project
from snrmon.forecast.ratio import RatioSignal
from snrmon.forecast.result import STATES, Forecast, Projection

__all__ = [
    "BasinForecaster",
    "Forecast",
    "Projection",
    "PriorError",
    "load_prior",
    "STATES",
    "CONFIDENCE",
    "HORIZON",
    "MIN_POINTS",
    "PRIOR_MIN_POINTS",
]

# Defaults chosen by benchmarks/forecast_eval.py (docs/forecast.md): they are the product.
HORIZON = 0.25  # warn when the basin is forecast within 25% more training than done so far
CONFIDENCE = 0.9  # stop when the basin is within the horizon (or entered) with this probability
MIN_POINTS = 10  # no forecast before this many finite points (the law has 7 constants)
WINDOW = 8  # points in the sliding window of the local slopes and of the ratio
PERSIST = 1  # consecutive points a warning or stop condition must hold
# Consecutive points with dataset_snr <= 1 that make it evidence of memorisation (Mahsereci et al.'s
# criterion, arXiv 1703.09580, in its trace form; docs/forecast.md, "The training set's gradient")
MEMORISATION_POINTS = 2


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
        max_seconds: ``None`` (the default): the law's fresh multi-start searches (about 1 s each on a 2-core
            CPU, at x1.5 growth of the curve) run up to 10,000 points, by the point count alone, so a replay
            makes the same fits as the live run on any machine. A number: also skip a search that the last
            one's time per point says would take longer (the warm refit is kept); the fits then depend on the
            machine's speed and load.
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
        max_seconds: float | None = None,
        seed: int = 0,
    ) -> None:
        for name, value in (("horizon", horizon), ("confidence", confidence), ("tokens_per_x", tokens_per_x)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0 <= horizon < math.inf:
            raise ValueError(f"horizon must be a finite number >= 0, got {horizon}")
        if not 0.5 <= confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be a whole number, got {seed!r}")
        for name, count in (("window", window), ("min_points", min_points), ("persist", persist)):
            if isinstance(count, bool) or not isinstance(count, numbers.Integral):
                raise ValueError(f"{name} must be a whole number of points, got {count!r}")
        if window < 3:
            raise ValueError(f"window must be at least 3 points, got {window}")
        if min_points < window + 2:
            raise ValueError(
                f"min_points must be at least window + 2 = {window + 2} (window: the {window} latest points "
                f"each forecast fits), got {min_points}"
            )
        if method not in ("auto", "ratio", "law", "prior"):
            raise ValueError(f"method must be 'auto', 'ratio', 'law' or 'prior', got {method!r}")
        if persist < 1:
            raise ValueError(f"persist must be at least 1, got {persist}")
        if max_seconds is not None and not max_seconds >= 0:
            raise ValueError(f"max_seconds must be None or a number >= 0, got {max_seconds}")
        if not (math.isfinite(tokens_per_x) and tokens_per_x > 0):
            raise ValueError(f"tokens_per_x must be a positive number, got {tokens_per_x}")
        real = isinstance(n_params, numbers.Real) and not isinstance(n_params, bool)
        if n_params is not None and not (real and math.isfinite(n_params) and n_params > 0):
            # (with or without a prior: a wrong value is a mistake either way)
            count = "n_params (this run's parameter count)"
            raise PriorError(f"{count} must be a positive number, got {n_params!r}")
        self.horizon, self.confidence = float(horizon), float(confidence)
        self.min_points, self.window, self.persist = int(min_points), int(window), int(persist)
        self.method, self.tokens_per_x, self.seed = method, float(tokens_per_x), int(seed)
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
        self.ratio = RatioSignal(self.window)
        self.law = LawSignal(self.prior, self.tokens_per_x, max_seconds, self.seed)
        self.prior_signal = PriorSignal(self.prior, self.tokens_per_x) if self.full_prior else None
        self.decider = Decider(self.horizon, self.confidence, self.window, self.persist)
        self.points = Points()
        self.history: list[Forecast] = []
        self.snr_streak = 0  # consecutive points with dataset_snr <= 1
        # What the latest forecast needs to draw the curve ahead, and that curve once asked for (`projection`;
        # not saved: rebuilt at the next forecast).
        self._latest: tuple | None = None
        self._projection: Projection | None = None

    # -- feeding points --------------------------------------------------------------------------------

    def update(
        self, x: float, loss: float, train_loss: float | None = None, dataset_snr: float | None = None
    ) -> Forecast:
        """Add the point (x, loss[, mean training loss since the previous point]) and forecast.

        A training loss that is None, NaN or infinite counts as not given at this point (a finite one beyond
        1e150 is kept, and said: no forecast while it is in the curve).

        ``dataset_snr``: the training set's N|G|²/tr Σ at this point (``SNRMonitor``'s ``dataset_snr``), if
        measured (read as float32, the precision TensorBoard stores, so that a replay of its logs counts the
        same points). Once it has been at most 1 at ``MEMORISATION_POINTS`` consecutive points, the training
        set's gradient is no larger than its own sampling noise: from then on it stands in for the widening
        generalization gap as the warning's evidence of memorisation. None or NaN: not measured here; a
        negative or infinite value (an estimate of signal or noise below zero, of noise exactly zero) counts
        as no measurement either (and is not logged by the callbacks, so that a replay reads the same).

        Raises:
            ValueError: ``x`` is not finite or not above the last point's.
            TypeError: ``dataset_snr`` is not a number (a string or a bool)."""
        x, loss = float(x), float(loss)
        train = float(train_loss) if train_loss is not None else math.nan
        if not math.isfinite(train):  # an overflowed training loss is no measurement (as NaN): not kept
            train = math.nan
        if isinstance(dataset_snr, str | bytes | bool):
            raise TypeError(f"dataset_snr must be a number or None, got {dataset_snr!r}")
        snr = float(dataset_snr) if dataset_snr is not None else math.nan
        # Read at the precision TensorBoard stores (float32): a replay of its logs then counts the same points
        # as the live run did (a float64 estimate of 1 + 1e-9 is 1.0 there, one of 1e39 inf).
        with np.errstate(over="ignore"):
            snr = float(np.float32(snr))
        if not math.isfinite(x):
            raise ValueError(f"x must be a finite number, got {x}")
        if self.points.x and x <= self.points.x[-1]:
            raise ValueError(f"points must come in increasing x: {x} after {self.points.x[-1]}")
        self.points.x.append(x)
        self.points.loss.append(loss)
        self.points.train.append(train)
        if 0 <= snr < math.inf:  # (NaN: not measured; below 0 or inf: a signal or noise estimate <= 0)
            self.snr_streak = self.snr_streak + 1 if snr <= 1 else 0
            if self.snr_streak >= MEMORISATION_POINTS:
                self.decider.memorising = True
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
        dataset_snr: Sequence[float | None] | None = None,
    ) -> list[Forecast]:
        """Feed a whole curve point by point; the forecast after each point."""
        train_loss = [None] * len(x) if train_loss is None else train_loss
        dataset_snr = [None] * len(x) if dataset_snr is None else dataset_snr
        return [self.update(*point) for point in zip(x, loss, train_loss, dataset_snr, strict=True)]

    # -- state (BasinEarlyStopping saves it in checkpoints) ---------------------------------------------

    def state_dict(self) -> dict:
        return {
            "points": asdict(self.points),
            "history": [f.as_dict() for f in self.history],
            "theta": None if self.law.theta is None else self.law.theta.tolist(),
            "searched_at": self.law.searched_at,
            "search_seconds_per_point": self.law.search_seconds_per_point,
            "streaks": list(self.decider.streaks),
            "fallen": self.decider.fallen,
            "law_draws": self.law.cached_state(),
            "memorising": self.decider.memorising,
            "snr_streak": self.snr_streak,
        }

    def load_state_dict(self, state: dict) -> None:
        # Copies, not the caller's lists (the next point would be written into the saved state), and the
        # ratio's cache of window slopes rebuilt from the loaded points, not kept from another curve.
        self.points = Points(**{name: list(values) for name, values in state["points"].items()})
        # (checkpoints of earlier versions kept an infinite training loss, which ended every later forecast)
        self.points.train = [t if math.isfinite(t) else math.nan for t in self.points.train]
        self.ratio = RatioSignal(self.window)
        self.history = [Forecast(**f) for f in state["history"]]
        self.law.theta = None if state["theta"] is None else np.asarray(state["theta"], dtype=float)
        self.law.searched_at = state["searched_at"]
        self.law.search_seconds_per_point = state.get("search_seconds_per_point", 0.0)
        self.decider.streaks = list(state["streaks"])
        self.decider.fallen = state.get("fallen", False)  # (absent from checkpoints of snrmon <= 0.1)
        self.law.load_cached_state(state.get("law_draws"))
        self.decider.memorising = state.get("memorising", False)  # (absent before the dataset SNR was used)
        self.snr_streak = state.get("snr_streak", 0)

    # -- forecasting ------------------------------------------------------------------------------------

    def _forecast(self, x_now: float, loss_now: float) -> Forecast:
        forecast = Forecast(x_now, loss_now)
        self._latest = self._projection = None
        if not math.isfinite(loss_now):
            forecast.note = "non-finite loss: skipped"
            return forecast
        x, loss, train = self.points.finite()
        largest = max(np.fmax.reduce(np.abs(loss), initial=0.0), np.fmax.reduce(np.abs(train), initial=0.0))
        if largest > LARGEST:  # (fmax: the training loss is NaN where not given)
            forecast.note = f"values beyond {LARGEST:.0e} in the curve: no forecast (their squares overflow)"
            return forecast
        method = self._method(train[-self.window :], len(x))
        if method in ("law", "prior"):  # laws of log-losses: a loss of 0 or below is no point of theirs
            positive = loss > 0
            x, loss, train = x[positive], loss[positive], train[positive]
        needed = PRIOR_MIN_POINTS if method == "prior" else self.min_points
        if len(x) < needed:
            forecast.note = f"{len(x)} finite point{'' if len(x) == 1 else 's'} of {needed} needed"
            if self.prior_signal is not None:
                self.prior_signal.forecast_alone(forecast)
            return forecast
        if method == "ratio" and not np.all(np.isfinite(train[-self.window :])):
            forecast.note = "no training loss in the window: no ratio forecast"
            return forecast
        rng = np.random.default_rng(self.seed + len(x))
        if method == "ratio":
            draws = self.ratio.draws(x, loss, train, rng)
        elif method == "prior":
            draws = self.prior_signal.draws(x, loss, rng)
        else:
            draws = self.law.draws(x, loss, rng)
        if draws is None:
            forecast.note = f"{method}: no forecast at this point"
            return forecast
        self.decider.decide(forecast, x, loss, train, draws, method)
        self._latest = (forecast, x, loss, method, draws.curve)
        if method == "prior" and self.prior_departs:
            forecast.note = (
                f"this run departs from the prior: its model-data noise c refits to "
                f"{self.prior_departure:.3g}x the family's (a prior of another setup or unit?)"
            )
        if len(x) < self.min_points:  # the prior's early forecast warns; a stop waits for the curve's own say
            self.decider.hold_stop(forecast)
        return forecast

    @property
    def projection(self) -> Projection | None:
        """The curve ahead as the latest forecast sees it (None after a point without one): for figures, so
        computed only when asked for."""
        if self._projection is None and self._latest is not None:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                warnings.simplefilter("ignore", np.exceptions.RankWarning)
                self._projection = project(*self._latest, self.horizon, self.confidence, self.window)
        return self._projection

    @property
    def prior_departure(self) -> float:
        """This run's refitted c over the prior's (the "prior" method; 1 before any refit)."""
        return self.prior_signal.departure if self.prior_signal is not None else 1.0

    @property
    def prior_departs(self) -> bool:
        """This run's refitted c lies more than PRIOR_DEPARTURE times from the prior's: it may not fit."""
        return self.prior_signal is not None and self.prior_signal.departs

    def _method(self, recent_train: np.ndarray, points: int) -> str:
        if self.method != "auto":
            return self.method
        with_train = len(recent_train) > 0 and bool(np.all(np.isfinite(recent_train)))
        if self.full_prior and (points < self.min_points or not with_train):
            return "prior"  # the family's law refitted: from a few points, and whenever the loss is alone
        return "ratio" if with_train else "law"
