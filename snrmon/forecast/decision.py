"""The one place that weighs a signal's D* draws against the curve and decides: the band, the probability
that the basin lies within the horizon, the evidence a decision needs, and the warning and the stop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from snrmon.forecast.curve import evidence_quantile, has_fallen, slope
from snrmon.forecast.result import Forecast

SAMPLES = 400  # Monte Carlo draws for the band and the probabilities
EVIDENCE_WINDOWS = 2  # the evidence tests look back this many windows


@dataclass
class Draws:
    """What a signal gives for a curve: Monte Carlo draws of D* (inf: no basin in that draw) and, for a
    signal that fits a law, the fitted constants, draws of them and their x scale (the curve ahead)."""

    d_star: np.ndarray
    curve: tuple[np.ndarray, np.ndarray, float] | None = None
    # Draws of the curve's minimum, for a signal whose D* is the basin's edge (before it): a stop needs the
    # minimum itself behind us (the edge only warns). None: D* is the minimum.
    minimum: np.ndarray | None = None


class Decider:
    """Turns draws of D* into a forecast's band, probability, state, warning and stop.

    A decision must hold at ``persist`` consecutive points (one lucky window is not a basin): the decider
    keeps the streaks of the warning and the stop condition.
    """

    def __init__(self, horizon: float, confidence: float, window: int, persist: int) -> None:
        self.horizon, self.confidence, self.window, self.persist = horizon, confidence, window, persist
        self.streaks = [0, 0]  # consecutive points meeting the warning and the stop condition
        self.fallen = False  # the curve has come down significantly from where it began
        # Evidence of memorisation from outside the curve (the training set's gradient no larger than its own
        # sampling noise, set by the forecaster): it stands in for the generalization gap's widening.
        self.memorising = False

    def decide(self, forecast: Forecast, x, loss, train, signal: Draws, method: str) -> None:
        """Band, probability and decisions from a signal's Monte Carlo draws of D* (inf: no basin in that
        draw)."""
        x_now = float(x[-1])
        draws = signal.d_star
        draws = np.where(draws <= x_now * (1 + 1e-9), np.minimum(draws, x_now), draws)  # crossed: no rounding
        draws = np.maximum(draws, x[0])  # a basin before the first point is one at the first point
        tail = (1 - self.confidence) / 2
        forecast.method = method
        # Quantiles without interpolation: draws may be inf (no basin in that draw).
        low, median, high = quantiles(draws, (tail, 0.5, 1 - tail))
        forecast.d_star, forecast.d_star_low, forecast.d_star_high = float(median), float(low), float(high)
        forecast.steps_to_basin = max(forecast.d_star - x_now, 0.0)
        forecast.p_basin = float(np.mean(draws <= x_now * (1 + self.horizon)))
        # Before stopping, the monitored curve must agree: it no longer falls significantly.
        short = np.log(x[-self.window :])
        loss_slope, loss_slope_se = slope(short, loss[-self.window :])
        flat_or_rising = loss_slope + 2 * loss_slope_se >= 0
        # The loss alone (law, prior): a warning, too, waits for a flat curve, and a basin needs a fall
        # before it (a curve flat or noisy from the start has no basin, whatever a fit makes of it).
        # Once seen, a fall stays seen: a long rise after the basin lifts the curve back above where it began.
        self.fallen = self.fallen or has_fallen(loss, self.window)
        fallen = self.fallen
        evidence = flat_or_rising and fallen
        because = "the monitored loss has come down significantly and no longer falls"  # (what evidence says)
        long = slice(-EVIDENCE_WINDOWS * self.window, None)
        if method == "ratio":
            # A ratio near zero also comes from a plateau where the training loss is as flat as the monitored
            # one (noise in the training loss pulls the regression slope toward zero). A basin shows more:
            # over a longer window the training loss still falls and the generalization gap widens, both
            # significantly (or the training set's gradient has sunk into its own sampling noise: the
            # measured twin of the widening gap, and known before the gap's slope is significant).
            # (On log losses, at 4.5 standard errors, the tests warned in time more often on the tuning runs
            # and less often on both held-out sets: docs/forecast.md.)
            u = np.log(x[long])
            train_slope, train_se = slope(u, train[long])
            gap, gap_se = slope(u, loss[long] - train[long])
            z = evidence_quantile(len(u) - 2)
            widening = gap - z * gap_se > 0
            evidence = train_slope + z * train_se < 0 and (widening or self.memorising)
            because = "the training loss falls and " + (
                "the generalization gap widens significantly"
                if widening
                else "the training set's SNR has been at most 1 (its gradient within its own sampling noise)"
            )
        # Whatever the signal says: a monitored loss that has risen significantly over the long window has
        # passed its basin (a noisy training loss, e.g. a small shard per rank, can hide the evidence above).
        rise, rise_se = slope(np.log(x[long]), loss[long])
        z = evidence_quantile(len(x[long]) - 2)
        risen = rise - z * rise_se > 0 and fallen  # a rise after a fall, not noise
        p_risen = 1.0 if risen else 0.0
        if risen:
            if not evidence:  # the rise itself is the evidence (the tests above did not pass)
                because = "the monitored loss has risen significantly after its fall"
            if forecast.d_star > x_now or forecast.p_basin < self.confidence:
                forecast.d_star = forecast.d_star_low = forecast.d_star_high = x_now  # placed below
                forecast.steps_to_basin, forecast.p_basin = 0.0, 1.0
                forecast.note = "the monitored loss has risen significantly: basin entered"
            evidence = flat_or_rising = True
        # A law's basin at the first point of a curve that has fallen significantly since contradicts the
        # fall (its draws before the first point were clamped there): it is no placement at all.
        at_start = forecast.d_star <= x[0] and fallen
        if forecast.d_star <= x_now and (risen or method == "ratio" or at_start):
            # A basin behind us is where the curve was lowest, over the whole curve: it does not move forward
            # with the window as a rise goes on (the band keeps the signal's spread around it). A law fitted
            # to the whole curve places it better than any one noisy point, and does not move with a window.
            lowest = float(x[np.argmin(loss)])
            forecast.d_star = lowest
            forecast.d_star_low, forecast.d_star_high = (
                min(forecast.d_star_low, lowest),
                max(forecast.d_star_high, lowest),
            )
        at = self.loss_at(forecast.d_star, x, loss)
        forecast.loss_at_d_star = at if at is not None and math.isfinite(at) else None
        # A stop needs the minimum behind us with the stated confidence (for a signal that forecasts the
        # edge: its minimum's draws; else the basin within the horizon, as for the warning).
        p_stop = forecast.p_basin
        if signal.minimum is not None:
            p_stop = max(float(np.mean(signal.minimum <= x_now * (1 + 1e-9))), p_risen)
        stop = p_stop >= self.confidence and evidence and flat_or_rising
        self.streaks[0] = self.streaks[0] + 1 if forecast.p_basin >= 0.5 and evidence else 0
        self.streaks[1] = self.streaks[1] + 1 if stop else 0
        forecast.warning = self.streaks[0] >= self.persist
        forecast.stop = self.streaks[1] >= self.persist
        # The state is what the decisions say: a basin the signal sees without the evidence to warn is not
        # one yet ("improving"), and the note says why not.
        if not (forecast.warning or forecast.stop):
            forecast.state = "improving"
            if forecast.p_basin >= 0.5 and not forecast.note:
                forecast.note = _no_warning_reason(method, fallen, flat_or_rising, evidence, self.persist)
        else:
            forecast.state = "basin entered" if forecast.d_star <= x_now else "basin ahead"
            if not forecast.note:  # what the warning (or stop) stands on, for its messages
                forecast.note = f"evidence: {because}"

    def hold_stop(self, forecast: Forecast) -> None:
        """No stop at this point (a prior's early forecast warns; a stop waits for the curve's own say)."""
        forecast.stop = False
        self.streaks[1] = 0

    def loss_at(self, d_star: float, x: np.ndarray, loss: np.ndarray) -> float | None:
        """The monitored loss at D*: the lowest value of a quadratic in log x through the window between now
        and D* (the curve's minimum is its basin, and a parabola through a flattening window turns up too
        soon to be read at D* itself); once D* is behind us, the loss observed there. None for a D* further
        ahead (in log x) than the window reaches back: a parabola says nothing that far out."""
        if not math.isfinite(d_star):
            return None
        if d_star <= x[-1]:  # behind us: the loss observed there (at the point nearest to it in log x)
            return float(loss[np.argmin(np.abs(np.log(x) - math.log(d_star)))])
        u = np.log(x[-self.window :])
        if math.log(d_star) - u[-1] > u[-1] - u[0]:
            return None
        coefficients = np.polyfit(u - u[-1], loss[-self.window :], 2)
        value = float(np.min(np.polyval(coefficients, np.linspace(0.0, math.log(d_star) - u[-1], 32))))
        return value if math.isfinite(value) else None


def quantiles(values: np.ndarray, levels: tuple[float, ...]) -> list[float]:
    """``np.quantile(values, levels, method="inverted_cdf")`` (no interpolation: values may be inf), by one
    partial sort: the same numbers at a tenth of the cost, which matters at every point of a replay."""
    n = len(values)
    indexes = []
    for level in levels:
        virtual = n * level - 1  # numpy's virtual index for this method, and its rounding up
        below = math.floor(virtual)
        indexes.append(min(max(below + 1 if virtual - below > 0 else below, 0), n - 1))
    ordered = np.partition(values, indexes)
    return [float(ordered[i]) for i in indexes]


def _no_warning_reason(method: str, fallen: bool, flat_or_rising: bool, evidence: bool, persist: int) -> str:
    """Why a basin the signal sees (P ≥ 0.5) gives no warning yet, in words."""
    if not fallen:
        return "no warning: the monitored loss has not come down significantly yet (no basin without a fall)"
    if not flat_or_rising:
        return "no warning: the monitored loss still falls significantly"
    if method == "ratio" and not evidence:
        return (
            "no warning: no evidence of memorisation yet: it needs the training loss falling significantly, "
            "and the generalization gap widening significantly or the training set's SNR at most 1 at two "
            "measurements in a row"
        )
    return f"no warning yet: the condition must hold at {persist} consecutive points"
