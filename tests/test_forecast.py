"""The basin forecaster (snrmon.forecast) on curves with a known basin, without one, and on bad input; the
``snrmon forecast`` replay command.

Synthetic curves: a validation loss L∞ + B·x^(−β) + k·x (a basin at x* = (βB/k)^(1/(1+β))) while the
training loss keeps falling (memorisation), against a validation loss that improves like its training loss
(no basin). Noise is Gaussian with a fixed seed; tolerances are derived from the noise and the grid.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from snrmon.forecast import BasinForecaster, PriorError, load_prior
from snrmon.forecast.forecaster import CONFIDENCE, HORIZON, MIN_POINTS, PRIOR_MIN_POINTS
from snrmon.laws import ShannonLaw, ShannonRunLaw
from snrmon.laws.basin import basin_tokens

L_INF, B, BETA, K = 0.5, 2.0, 0.5, 4e-5  # the basin at x* ≈ 860
X = np.arange(1, 81) * 25.0  # 80 validations, 25 steps apart
# Validation noise, about 0.17% of the loss at the basin: a clear signal (docs/forecast.md has noisier runs).
SIGMA = 0.001

# The constants of examples/make_law_data.py (data/shannon_synthetic.csv): a Shannon-law family of sizes.
SHANNON_FAMILY = {
    "a": 0.02, "alpha": 0.08, "c": 1.6e-11, "d": 1e-3, "e": 1.0, "beta": 0.3, "gamma": 0.6, "delta": 0.2,
}  # fmt: skip


def basin_x() -> float:
    return (BETA * B / K) ** (1 / (1 + BETA))


def interval_means(power: float, scale: float) -> np.ndarray:
    """Means of scale·x^(−power) over (x[i−1], x[i]] (x[−1] = 0): a training loss averaged between
    validations, as BasinEarlyStopping collects it."""
    edges = np.concatenate([[0.0], X])
    antiderivative = scale * edges ** (1 - power) / (1 - power)
    return np.diff(antiderivative) / np.diff(edges)


def u_curve(seed: int, sigma: float = SIGMA) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val = L_INF + B * X**-BETA + K * X + sigma * rng.normal(size=len(X))
    train = 0.1 + interval_means(0.6, 3.0) + sigma * rng.normal(size=len(X))  # keeps falling: memorisation
    return val, train


def improving_curve(seed: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val = L_INF + B * X**-BETA + sigma * rng.normal(size=len(X))
    return val, L_INF - 0.02 + interval_means(BETA, B) + sigma * rng.normal(size=len(X))


def test_u_curve_warns_by_the_basin_and_stops_near_it():
    x_star = basin_x()
    assert X[MIN_POINTS] < x_star < X[-20]  # the design puts the basin well inside the curve
    clean = L_INF + B * X**-BETA + K * X
    for seed in range(3):
        val, train = u_curve(seed)
        forecasts = BasinForecaster().replay(X, val, train)
        warning = next(f.x for f in forecasts if f.warning)
        stop = next(f.x for f in forecasts if f.stop)
        # The targets: a warning at or before the minimum (on the validation grid), the stop after
        # the warning, and the true (noise-free) loss at the stop within 1% of the minimum.
        assert warning <= X[np.argmin(clean)]
        assert warning <= stop
        assert L_INF + B * stop**-BETA + K * stop <= clean.min() * 1.01
        first = next(f for f in forecasts if f.stop)
        assert first.d_star_low <= first.d_star <= first.d_star_high
        assert first.p_basin >= CONFIDENCE
        # At the first warning the forecast basin lies within one horizon of the true one, and the loss
        # forecast there within 1% of the true minimum.
        warned = next(f for f in forecasts if f.warning)
        assert x_star / (1 + HORIZON) <= warned.d_star <= x_star * (1 + HORIZON)
        assert abs(warned.loss_at_d_star / clean.min() - 1) <= 0.01


def test_a_rise_of_the_monitored_loss_stops_even_when_the_training_loss_is_noise():
    # A training loss lost in noise (e.g. one small shard per rank) gives no evidence of memorisation; the
    # monitored loss rising significantly over two windows is evidence enough, after the minimum.
    clean = L_INF + B * X**-BETA + K * X
    for seed in range(3):
        rng = np.random.default_rng(seed)
        val = clean + SIGMA * rng.normal(size=len(X))
        stop = next(
            f.x for f in BasinForecaster().replay(X, val, 0.5 + 0.2 * rng.normal(size=len(X))) if f.stop
        )
        assert stop > X[np.argmin(clean)]
        assert L_INF + B * stop**-BETA + K * stop <= clean.min() * 1.01


def test_a_stop_on_a_rise_says_the_rise_is_its_evidence():
    # Without a training set's SNR and without a widening gap, the stop's note named the SNR as evidence.
    clean = L_INF + B * X**-BETA + K * X
    rng = np.random.default_rng(0)
    val = clean + SIGMA * rng.normal(size=len(X))
    forecaster = BasinForecaster()
    stop = next(f for f in forecaster.replay(X, val, 0.5 + 0.2 * rng.normal(size=len(X))) if f.stop)
    assert not forecaster.decider.memorising
    assert "risen significantly" in stop.note and "SNR" not in stop.note


def test_an_infinite_training_loss_counts_as_missing_not_as_the_end_of_forecasting():
    # One overflowed mean (inf) made every later point "values beyond 1e+150: no forecast".
    x = np.arange(1, 81) * 10.0
    train = 2.0 * np.exp(-x / 200) + 0.1
    val = train + 0.05 + 0.4 * (x / x[-1]) ** 2 + np.random.default_rng(1).normal(0, 0.002, len(x))
    decisions = []
    for bad in (math.nan, math.inf, -math.inf):
        with_bad = train.copy()
        with_bad[5] = bad
        forecasts = BasinForecaster().replay(x, val, with_bad)
        decisions.append((first_index(forecasts, "warning"), first_index(forecasts, "stop")))
    assert decisions[0][1] is not None  # the curve turns up: it stops
    assert decisions[0] == decisions[1] == decisions[2]
    # A checkpoint of an earlier version that kept the infinite value resumes as if it had not.
    forecaster = BasinForecaster()
    forecaster.replay(x[:30], val[:30], train[:30])
    state = forecaster.state_dict()
    state["points"]["train"][5] = math.inf
    resumed = BasinForecaster()
    resumed.load_state_dict(state)
    later = resumed.replay(x[30:], val[30:], train[30:])
    assert (first_index(later, "warning"), first_index(later, "stop")) == (
        decisions[0][0] - 30,
        decisions[0][1] - 30,
    )


def test_the_ratio_forecasts_losses_of_any_scale_alike():
    # The ratio skipped every window of losses below ~1e-12 (an absolute floor in its flatness test).
    x = np.arange(1, 81) * 10.0
    train = 2.0 * np.exp(-x / 200) + 0.1
    val = train + 0.05 + 0.4 * (x / x[-1]) ** 2 + np.random.default_rng(1).normal(0, 0.002, len(x))
    decisions = []
    for scale in (1.0, 1e-30):
        forecasts = BasinForecaster().replay(x, scale * val, scale * train)
        decisions.append((first_index(forecasts, "warning"), first_index(forecasts, "stop")))
    assert decisions[0][1] is not None and decisions[0] == decisions[1]


@pytest.mark.parametrize("sigma", [0.002, 0.02])  # 0.02: noise about 3% of the loss
def test_improving_curves_raise_no_alarm(sigma):
    for seed in range(3):
        val, train = improving_curve(seed, sigma)
        forecasts = BasinForecaster().replay(X, val, train)
        assert not any(f.warning or f.stop for f in forecasts)


def test_plateau_of_both_losses_is_not_a_basin():
    # Validation and training loss flat and equally noisy (an exhausted learning rate, or fresh data that
    # no longer teaches anything): the ratio hovers near zero, but no gap widens.
    rng = np.random.default_rng(0)
    val = 0.5 + 0.01 * rng.normal(size=len(X))
    train = 0.5 + 0.01 * rng.normal(size=len(X))
    assert not any(f.stop or f.warning for f in BasinForecaster().replay(X, val, train))


def test_no_basin_in_sight_is_infinite_and_a_state_needs_a_warning():
    """An improving run: D* is inf (null in JSON), never a huge finite number (a clipped e^700); a basin the
    signal sees without the evidence to warn reads "improving", with the reason in the note."""
    for seed in range(3):
        forecasts = BasinForecaster().replay(X, *improving_curve(seed, 0.002))
        forecast_made = [f for f in forecasts if f.d_star is not None]
        assert forecast_made
        assert all(f.d_star == math.inf or f.d_star <= 1e3 * f.x for f in forecast_made)
        assert all(f.d_star_high == math.inf or f.d_star_high <= 1e3 * f.x for f in forecast_made)
    plateau = BasinForecaster().replay(X, *(0.5 + 0.01 * np.random.default_rng(0).normal(size=(2, len(X)))))
    for f in plateau:  # the ratio near zero sees a basin (P high) that the evidence does not bear out
        assert f.state in ("no forecast", "improving") or f.warning or f.stop
        if f.p_basin is not None and f.p_basin >= 0.5 and not f.warning:
            assert f.note.startswith("no warning"), f.note
    assert any(f.p_basin is not None and f.p_basin >= 0.5 for f in plateau)


def test_after_a_rise_the_basin_stays_at_the_minimum():
    """Once the monitored loss has risen, the basin is where it was lowest: it does not move forward with
    the window, and the loss quoted there is the loss observed there."""
    x = np.arange(1, 121) * 25.0
    rng = np.random.default_rng(1)
    val = 0.5 + 2.0 * x**-0.5 + 2e-4 * x + 0.001 * rng.normal(size=len(x))  # lowest near x = 250
    train = 0.1 + 3.0 * x**-0.6 + 0.001 * rng.normal(size=len(x))
    forecasts = BasinForecaster().replay(x, val, train)
    late = [f for f in forecasts[60:] if f.state == "basin entered"]
    assert len(late) >= 50
    for f in late:
        seen = val[: list(x).index(f.x) + 1]
        assert f.d_star == x[np.argmin(seen)]
        assert f.loss_at_d_star == pytest.approx(seen.min())


def test_the_loss_alone_places_a_basin_behind_us_where_the_curve_was_lowest_not_at_its_start():
    """Pythia-160m from the loss alone (its 15 checkpoints from step 3000): the law's draws before the first
    point were clamped to it, which put the basin at the first checkpoint (the highest loss of the run) once
    it was behind us; and a basin far ahead was quoted a loss extrapolated from a parabola (−107 nats)."""
    import csv
    from pathlib import Path

    pythia = Path(__file__).resolve().parents[1] / "data" / "pythia_deduped_lambada_loss.csv"
    rows = csv.DictReader(pythia.open())
    points = [(float(r["D"]), float(r["loss"])) for r in rows if r["model"] == "pythia-160m-deduped"]
    x, loss = np.array([p for p in points if p[0] >= 6.29e9]).T
    forecasts = BasinForecaster().replay(x, loss)
    behind = [f for f in forecasts if f.d_star is not None and f.d_star <= f.x]
    assert behind  # the rise after the minimum (checkpoint 9) is seen
    for f in behind:
        seen = loss[: list(x).index(f.x) + 1]
        assert f.d_star > x[0]
        assert f.loss_at_d_star <= seen[0]
    window = BasinForecaster().window
    for f in forecasts:
        if f.d_star is not None and f.d_star > f.x and f.loss_at_d_star is not None:
            here = list(x).index(f.x)
            assert math.log(f.d_star / f.x) <= math.log(f.x / x[here - window + 1]) + 1e-12
            assert loss.min() - 1 <= f.loss_at_d_star <= loss.max() + 1


def test_the_ratio_warns_at_the_edge_and_stops_near_the_minimum():
    """A curve whose generalization ratio r = dL_val/dL_train falls linearly in log x through the floor
    (0.1, the basin's edge) at x = 700 and through zero (the minimum) at x = 1100: the warning comes by the
    edge, and the stop waits for the same drawn lines to put the minimum behind (stopping at the edge stopped
    2-7 validations too early, before x = 800, on three of these five seeds)."""
    x = np.arange(1, 81) * 25.0
    floor_at, zero_at = 700.0, 1100.0
    r = np.clip(0.1 + np.log(floor_at / x) * 0.1 / np.log(zero_at / floor_at), -1, 1)
    train = 0.2 + 3.0 * x**-0.6
    val = 1.0 + np.concatenate([[0.0], np.cumsum(r[1:] * np.diff(train))])
    for seed in range(5):
        rng = np.random.default_rng(seed)
        noisy_val, noisy_train = (v + 0.0005 * rng.normal(size=len(x)) for v in (val, train))
        forecasts = BasinForecaster().replay(x, noisy_val, noisy_train)
        warning = next(f.x for f in forecasts if f.warning)
        stop = next(f.x for f in forecasts if f.stop)
        assert warning <= floor_at, seed
        assert 800 <= stop <= zero_at + 4 * 25, seed


def test_too_few_points_give_no_forecast():
    val, train = u_curve(0)
    forecasts = BasinForecaster().replay(X[: MIN_POINTS - 1], val[: MIN_POINTS - 1], train[: MIN_POINTS - 1])
    assert all(f.d_star is None and not f.warning and not f.stop for f in forecasts)
    assert "needed" in forecasts[-1].note


def test_nan_losses_are_skipped_and_flat_curves_are_quiet():
    val, train = u_curve(0)
    val[[3, 20, 21]] = np.nan
    train[5] = np.nan
    forecasts = BasinForecaster().replay(X, val, train)
    assert [f.d_star for f in forecasts[20:22]] == [None, None]
    assert any(f.stop for f in forecasts)  # the basin is still found
    flat = BasinForecaster().replay(X, np.full(len(X), 1.0), np.full(len(X), 1.0))
    assert not any(f.warning or f.stop for f in flat)


@pytest.mark.parametrize("method", ["law", "prior"])
def test_the_loss_alone_raises_no_alarm_on_flat_or_noisy_curves(method):
    """With the loss alone a fit can place a 'basin' anywhere on a curve that never fell: a basin needs the
    curve to have come down first. Pure noise: no alarm in 12 (law: 6) seeds (measured over 200 seeds of 30
    points: the law 0 alarms, the prior 1, the ratio 0)."""
    options = (
        {"prior": {"law": "shannon", "params": SHANNON_FAMILY}, "n_params": 1e8} if method == "prior" else {}
    )
    x = np.geomspace(5e8, 2e10, 20)
    flat = BasinForecaster(method=method, **options).replay(x, np.full(len(x), 2.0))
    assert not any(f.warning or f.stop for f in flat)
    for seed in range(12 if method == "prior" else 6):  # (the law's fits are slower)
        noisy = 2.0 + 0.02 * np.random.default_rng(seed).normal(size=len(x))
        forecasts = BasinForecaster(method=method, **options).replay(x, noisy)
        assert not any(f.warning or f.stop for f in forecasts), seed


def test_bad_points_and_priors_never_break_a_forecast(tmp_path):
    """update() informs a training run and must not end it: losses of 0 or below, infinities and extreme
    constants give notes, not exceptions (nor warnings, which a strict filter turns into errors); bad priors
    are refused up front with a PriorError naming the problem."""
    x = np.geomspace(5e8, 2e10, 14)
    prior = {"law": "shannon", "params": SHANNON_FAMILY}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method, options in (("prior", {"prior": prior, "n_params": 1e8}), ("law", {})):
            forecaster = BasinForecaster(method=method, **options)
            losses = [3.0, 2.9, 2.8, 0.0, -1.0, math.inf, 2.6, 2.5, 2.45, 2.4, 2.38, 2.37, 2.36, 2.35]
            forecaster.replay(x, losses)
            assert forecaster.history[-1].d_star is not None  # the positive points still forecast
        BasinForecaster(method="law").replay(np.geomspace(1, 1e300, 20), np.geomspace(5, 1, 20))
    with pytest.raises(ValueError, match="finite"):
        BasinForecaster().update(math.inf, 1.0)
    # A curve whose squares overflow: no forecast, said (a U-curve times 1e300 read "improving" before).
    val, train = u_curve(0)
    for scale_val, scale_train in ((1e300, 1.0), (1.0, 1e300)):
        huge = BasinForecaster().replay(X, val * scale_val, train * scale_train)
        assert all(f.d_star is None for f in huge) and "values beyond 1e+150" in huge[-1].note
    assert BasinForecaster().replay(X, val * 1e100, train * 1e100)[-1].stop  # within range: forecast as is
    for params, match in (
        (SHANNON_FAMILY | {"beta": 50.0}, "beta = 50 is outside"),
        (SHANNON_FAMILY | {"gamma": 2.9, "c": 1e30}, "out of range|outside"),
    ):
        with pytest.raises(PriorError, match=match):
            BasinForecaster(prior={"law": "shannon", "params": params}, n_params=1e12)
    with pytest.raises(PriorError, match="n_params"):
        BasinForecaster(prior=prior, n_params=-1e8)
    binary = tmp_path / "prior.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PriorError, match="cannot read the prior"):
        BasinForecaster(prior=binary)
    with pytest.raises(ValueError, match="tokens_per_x"):
        BasinForecaster(tokens_per_x=math.inf)


def test_points_must_come_in_order_and_options_are_checked():
    forecaster = BasinForecaster()
    forecaster.update(10, 1.0)
    with pytest.raises(ValueError, match="increasing x"):
        forecaster.update(10, 0.9)
    bad_options = [{"horizon": -1}, {"horizon": math.inf}, {"confidence": 1.0}, {"confidence": "0.9"}]
    bad_options += [{"window": 2}, {"min_points": 3}, {"method": "x"}, {"seed": 1.5}, {"tokens_per_x": True}]
    for bad in bad_options:
        with pytest.raises(ValueError):
            BasinForecaster(**bad)


def test_state_dict_resumes_exactly():
    val, train = u_curve(1)
    whole = BasinForecaster().replay(X, val, train)
    first = BasinForecaster()
    first.replay(X[:40], val[:40], train[:40])
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint holds plain data
    resumed = BasinForecaster()
    resumed.load_state_dict(state)
    rest = resumed.replay(X[40:], val[40:], train[40:])
    assert [f.as_dict() for f in resumed.history] == [f.as_dict() for f in whole]
    assert len(rest) == len(X) - 40


@pytest.mark.parametrize("method", ["ratio", "law"])
def test_a_state_dict_is_plain_data_its_own_and_from_a_clean_start(tmp_path, method):
    """A checkpoint of every method loads with torch.load(weights_only=True) (the law's cached draws held
    numpy floats); loading copies the state (the next point went into the saved lists); and a forecaster that
    forecast another curve before resumes as a fresh one would (its ratio cache was kept)."""
    import copy

    import torch

    # (the law's fresh searches take seconds each on a nearly noise-free curve: a noisier one)
    val, train = u_curve(1, sigma=0.01)
    train = train if method == "ratio" else [None] * len(X)
    cut, end = 24, 34
    first = BasinForecaster(method=method)
    first.replay(X[:cut], val[:cut], train[:cut])
    torch.save(first.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert method == "ratio" or state["law_draws"] is not None  # (the law's cached draws, saved and loaded)
    kept = copy.deepcopy(state)
    fresh, used = BasinForecaster(method=method), BasinForecaster(method=method)
    other_val, other_train = u_curve(2, sigma=0.01)
    used.replay(X[:end], other_val[:end], other_train[:end] if method == "ratio" else [None] * end)
    for forecaster in (fresh, used):
        forecaster.load_state_dict(state)
    later = [f.as_dict() for f in fresh.replay(X[cut:end], val[cut:end], train[cut:end])]
    assert [f.as_dict() for f in used.replay(X[cut:end], val[cut:end], train[cut:end])] == later
    assert any(f["d_star"] is not None for f in later)  # (forecasts, not "too few points")
    assert state == kept  # the loaded state was not written into


def plateau_with_noisy_gap() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A monitored loss that falls, then stays flat under noise (sd 0.03), while a smooth training loss keeps
    falling: the ratio nears zero and the training loss falls significantly, but the gap's slope is lost in
    the monitored loss's noise, so the curves alone give no evidence of memorisation."""
    rng = np.random.default_rng(0)
    x = np.arange(1, 41) * 10.0
    train = 0.3 + 1 / np.sqrt(x) + rng.normal(0, 0.001, len(x))
    val = 0.6 + 3 / x + rng.normal(0, 0.03, len(x))
    return x, val, train


def first_index(forecasts, decision: str) -> int | None:
    return next((i for i, f in enumerate(forecasts) if getattr(f, decision)), None)


def test_a_training_set_snr_at_most_one_stands_in_for_the_widening_gap():
    x, val, train = plateau_with_noisy_gap()
    alone = BasinForecaster().replay(x, val, train)
    assert first_index(alone, "warning") is None and first_index(alone, "stop") is None
    assert any("no evidence of memorisation" in f.note for f in alone)
    # Measured at most 1 from the start: evidence from the second measurement on, the warning at the first
    # forecast whose other conditions hold.
    measured = BasinForecaster().replay(x, val, train, [0.5] * len(x))
    assert first_index(measured, "warning") is not None and first_index(measured, "stop") is not None
    # The warning says what it stands on, and its message too.
    from snrmon.forecast.watch import BasinWatch

    warned = measured[first_index(measured, "warning")]
    evidence = "evidence: the training loss falls and the training set's SNR has been at most 1"
    assert warned.note.startswith(evidence)
    assert f"; {evidence}" in BasinWatch("val_loss").stop_reason(warned)
    # Above 1, never two measurements in a row at most 1, or not measured (None, NaN): the curves alone.
    for snr in ([3.0] * len(x), [0.5, 3.0] * (len(x) // 2), [None] * len(x), [math.nan] * len(x)):
        again = BasinForecaster().replay(x, val, train, snr)
        assert [f.as_dict() for f in again] == [f.as_dict() for f in alone]
    # Two in a row with checks between them that measured nothing (None, NaN) count as consecutive; once
    # given, the evidence stays (memorisation is not undone by a later, larger SNR).
    gaps = [None, 0.5, math.nan, 0.5] + [3.0] * (len(x) - 4)
    late = BasinForecaster().replay(x, val, train, gaps)
    assert [f.as_dict() for f in late] == [f.as_dict() for f in measured]


def test_the_memorisation_evidence_survives_a_checkpoint():
    x, val, train = plateau_with_noisy_gap()
    snr = [2.0] * 9 + [0.8, 0.9] + [2.0] * (len(x) - 11)
    whole = BasinForecaster().replay(x, val, train, snr)
    for cut in (10, 20):  # between the two measurements at most 1, and after them
        first = BasinForecaster()
        first.replay(x[:cut], val[:cut], train[:cut], snr[:cut])
        resumed = BasinForecaster()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        resumed.replay(x[cut:], val[cut:], train[cut:], snr[cut:])
        assert [f.as_dict() for f in resumed.history] == [f.as_dict() for f in whole]
    assert first_index(whole, "warning") is not None


def test_a_training_set_snr_that_is_not_a_number_is_refused_before_the_point_is_added():
    forecaster = BasinForecaster()
    for bad in ("low", "0.5", True):
        with pytest.raises(TypeError, match="dataset_snr"):
            forecaster.update(10.0, 1.0, 1.0, bad)
    assert forecaster.points.x == []


def test_a_negative_or_infinite_training_set_snr_is_no_measurement():
    # Negative: a signal or noise estimate below zero; infinite: a noise estimate of exactly zero. Neither is
    # a measurement (as NaN: the streak neither grows nor ends); the callbacks log neither (finite values
    # only), so a replay of their logs reads what the live forecaster did.
    cases = ([0.5, -3.0, 0.5], True), ([0.5, math.inf, 0.5], True), ([-1.0, -1.0], False), ([2, 0.5], False)
    for values, memorising in cases:
        n = len(values)
        forecaster = BasinForecaster()
        forecaster.replay(np.arange(1, n + 1) * 10.0, [1.0] * n, [1.0] * n, values)
        assert forecaster.decider.memorising is memorising, values


def test_the_training_set_snr_counts_as_tensorboard_stores_it():
    # The monitor's estimate is float64; TensorBoard keeps float32, where 1 + 1e-9 is 1.0 and 1e39 is inf.
    # The live forecaster reads it at that precision, so a replay of TensorBoard logs decides the same.
    live = [1 + 1e-9, 1 + 1e-9, 0.5, 1e39, 0.5]
    with np.errstate(over="ignore"):
        stored = np.asarray(live, dtype=np.float32).astype(float).tolist()
    assert stored[:2] == [1.0, 1.0] and stored[3] == math.inf
    n = len(live)
    for values in (live, stored):
        forecaster = BasinForecaster()
        forecaster.replay(np.arange(1, n + 1) * 10.0, [1.0] * n, [1.0] * n, values)
        # 1.0, 1.0: memorising from the second point; inf is no measurement: the streak runs on to 3
        assert forecaster.decider.memorising and forecaster.snr_streak == 4


def test_law_forecast_finds_a_known_basin_from_the_loss_alone():
    # Noise-free T9 with its basin inside the curve: the law signal's band holds the true D*.
    law = ShannonRunLaw()
    theta = np.array([0.5, 1e-3, 1e-6, 1.0, 0.5, 0.9, 0.1])
    true = basin_tokens(*theta[1:])
    x = np.geomspace(true / 30, true * 3, 16)
    loss = law.loss(theta, {"D": x})
    forecasts = BasinForecaster(method="law").replay(x, loss)
    last = forecasts[-1]
    rounding = 1e-6  # the band of a noise-free fit is as narrow as the solver's tolerance
    assert last.d_star_low * (1 - rounding) <= true <= last.d_star_high * (1 + rounding)
    assert math.isclose(last.d_star, true, rel_tol=0.05)
    assert last.stop and last.state == "basin entered"


def test_prior_from_a_fit_document(tmp_path):
    family = SHANNON_FAMILY
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"law": "shannon", "params": family}))
    # Without N only the constants that do not depend on it carry over.
    assert load_prior(path) == {k: family[k] for k in ("d", "e", "beta", "gamma", "delta")}
    with pytest.raises(PriorError, match="chinchilla"):
        load_prior({"law": "chinchilla", "params": {"E": 1.0}})
    with pytest.raises(PriorError, match="cannot read"):
        load_prior(tmp_path / "missing.json")
    # A constant out of place is named (six of the seven here are fine).
    with pytest.raises(PriorError, match="constants are positive numbers; the prior has c = -1$"):
        load_prior({"A": 1, "c": -1, "d": 1, "e": 1, "beta": 0.5, "gamma": 0.3, "delta": 0.2})
    with pytest.raises(PriorError, match="holds no constants of the Shannon law"):
        load_prior({"law": "shannon-run", "params": {"x": 1.0}})
    # With this run's N the prior gives its whole curve: D* (T10) from the first point, in tokens or in steps
    # of a million tokens, and no decision before the data can make one.
    n = 1e8
    theta = np.array([family[k] for k in ("a", "alpha", "c", "d", "e", "beta", "gamma", "delta")])
    true = ShannonLaw().d_star(theta, n)
    for tokens_per_x in (1.0, 1e6):
        forecaster = BasinForecaster(prior=str(path), n_params=n, tokens_per_x=tokens_per_x)
        x = 1e8 / tokens_per_x
        first = forecaster.update(
            x, float(ShannonLaw().loss(theta, {"N": np.array([n]), "D": np.array([1e8])})[0])
        )
        assert math.isclose(first.d_star * tokens_per_x, true, rel_tol=1e-9)
        assert first.method == "prior" and not first.warning and not first.stop
    # A prior of this run's own constants starts the law fit; the forecast then comes from the data.
    law = ShannonRunLaw()
    run = np.array([0.5, 1e-3, 1e-6, 1.0, 0.5, 0.9, 0.1])
    x = np.geomspace(10, 3000, 16)
    forecaster = BasinForecaster(method="law", prior=dict(zip(law.param_names, run, strict=True)))
    last = forecaster.replay(x, law.loss(run, {"D": x}))[-1]
    assert last.method == "law" and math.isclose(last.d_star, basin_tokens(*run[1:]), rel_tol=0.05)


def _family_run(seed: int, n: float, x: np.ndarray, relative_noise: float) -> np.ndarray:
    """The loss of the SHANNON_FAMILY model of size n at tokens x, with log-normal noise."""
    theta = np.array([SHANNON_FAMILY[k] for k in ("a", "alpha", "c", "d", "e", "beta", "gamma", "delta")])
    loss = ShannonLaw().loss(theta, {"N": np.full(len(x), n), "D": x})
    return loss * np.exp(relative_noise * np.random.default_rng(seed).normal(size=len(x)))


def test_a_family_prior_is_refitted_to_the_run_from_its_first_points():
    """With the loss alone and a prior that gives every constant, the forecaster carries the family's law over
    and refits this run's scale A and cross-term c: from PRIOR_MIN_POINTS points on, with a band that covers
    the true basin as often as it claims, even when the prior alone is far off (c three times too large: a
    family fit's error moves D* by a factor of six)."""
    n = 1e8
    theta = np.array([SHANNON_FAMILY[k] for k in ("a", "alpha", "c", "d", "e", "beta", "gamma", "delta")])
    true = ShannonLaw().d_star(theta, n)
    wrong = SHANNON_FAMILY | {"c": 3 * SHANNON_FAMILY["c"], "a": 1.1 * SHANNON_FAMILY["a"]}
    prior = {"law": "shannon", "params": wrong}
    x = np.geomspace(true / 20, 2 * true, 16)[:12]  # up to 0.9 D*: before the basin
    seeds = range(20)
    covered, widths = [], []
    for seed in seeds:
        forecasts = BasinForecaster(prior=prior, n_params=n).replay(x, _family_run(seed, n, x, 0.003))
        early, later = forecasts[: PRIOR_MIN_POINTS - 1], forecasts[PRIOR_MIN_POINTS - 1 :]
        assert all(f.method == "prior" and f.d_star_low is None for f in early)  # the prior alone, no band
        assert all(f.method == "prior" and f.d_star_low is not None for f in later)  # refitted from 4 points
        assert not any(f.warning or f.stop for f in forecasts)  # the basin is not yet within the horizon
        last = forecasts[-1]
        covered.append(last.d_star_low <= true <= last.d_star_high)
        widths.append(last.d_star_high / last.d_star_low)
    prior_alone = forecasts[0].d_star
    assert prior_alone < true / 5  # the prior alone is far off ...
    # ... the refit is not: its 90% band covers the truth in at least 0.9 - 2.2 binomial sd of the seeds
    assert np.mean(covered) >= 0.9 - 2.2 * math.sqrt(0.9 * 0.1 / len(seeds))
    assert np.median(widths) < 2.0  # and is narrow enough to act on


def test_a_family_prior_warns_and_stops_past_min_points_only():
    """Through the basin: a warning once the band reaches the horizon and the curve flattens, a stop only
    from MIN_POINTS on; a run of the same family far before its basin never warns."""
    n = 1e8
    theta = np.array([SHANNON_FAMILY[k] for k in ("a", "alpha", "c", "d", "e", "beta", "gamma", "delta")])
    true = ShannonLaw().d_star(theta, n)
    prior = {"law": "shannon", "params": SHANNON_FAMILY}
    x = np.geomspace(true / 20, 2 * true, 16)
    forecasts = BasinForecaster(prior=prior, n_params=n).replay(x, _family_run(0, n, x, 0.003))
    stops = [i for i, f in enumerate(forecasts) if f.stop]
    warnings_ = [i for i, f in enumerate(forecasts) if f.warning]
    assert stops and stops[0] >= MIN_POINTS - 1 and x[stops[0]] >= true / (1 + HORIZON)
    assert warnings_ and warnings_[0] <= stops[0]
    early = np.geomspace(true / 400, true / 10, 16)  # a tenth of the way to the basin at most
    quiet = BasinForecaster(prior=prior, n_params=n).replay(early, _family_run(1, n, early, 0.003))
    assert not any(f.warning or f.stop for f in quiet)
    assert not any("departs from the prior" in f.note for f in forecasts)
    # A prior of another setup (c ten thousand times off) is refitted, and said to depart from the run.
    other = {"law": "shannon", "params": SHANNON_FAMILY | {"c": 1e4 * SHANNON_FAMILY["c"]}}
    refitted = BasinForecaster(prior=other, n_params=n).replay(x, _family_run(0, n, x, 0.003))
    assert all("departs from the prior" in f.note for f in refitted[PRIOR_MIN_POINTS - 1 :])
    with pytest.raises(ValueError, match="method='prior' needs a prior"):
        BasinForecaster(method="prior", prior={"law": "shannon", "params": SHANNON_FAMILY})  # no n_params


def test_the_replay_says_a_prior_the_run_departs_from_and_why_a_point_has_no_forecast(tmp_path, capsys):
    from snrmon.cli import main

    n = 1e8
    theta = np.array([SHANNON_FAMILY[k] for k in ("a", "alpha", "c", "d", "e", "beta", "gamma", "delta")])
    true = ShannonLaw().d_star(theta, n)
    x = np.geomspace(true / 20, 2 * true, 16)
    run = _csv(tmp_path / "run.csv", {"D": x, "loss": _family_run(0, n, x, 0.003)})
    other = tmp_path / "other.json"  # a prior of another setup: c ten thousand times off
    params = SHANNON_FAMILY | {"c": 1e4 * SHANNON_FAMILY["c"]}
    other.write_text(json.dumps({"law": "shannon", "params": params}))
    assert main(["forecast", run, "--prior", str(other), "--N", "1e8"]) == 0
    out, err = capsys.readouterr()
    assert err.count("departs from the prior") == 1 and "snrmon: warning: at D " in err  # once, as live
    # The loss alone (no prior): its first rows have no forecast, and say why.
    assert main(["forecast", run]) == 0
    rows = capsys.readouterr().out.splitlines()[1:4]
    assert all(row.rstrip().endswith(f"no forecast  ({i + 1} finite point{'s' * (i > 0)} of 10 needed)")
               for i, row in enumerate(rows)), rows  # fmt: skip


def test_the_projection_follows_the_curve_and_reaches_past_the_basin():
    """``forecaster.projection`` (the figure's curve ahead): the law's projection on the points it was fitted
    to lies within the noise of the clean curve; every method's grid reaches past a basin ahead (the
    ratio's parabola no further than its window reaches back), with low <= central <= high; and it goes with
    the latest forecast's basin."""
    clean = L_INF + B * X**-BETA + K * X
    val, train = u_curve(0)
    for method, curve in (("ratio", (X, val, train)), ("law", (X[:30], val[:30]))):
        forecaster = BasinForecaster(method=method)
        forecasts = forecaster.replay(*curve)
        projection = forecaster.projection
        assert projection is not None and projection.method == method
        assert projection.d_star == forecasts[-1].d_star
        low, central, high = (np.array(v) for v in (projection.low, projection.loss, projection.high))
        assert np.all(low <= central) and np.all(central <= high)
        x_now, reach = curve[0][-1], 4 * curve[0][-1]
        if method == "ratio":  # a parabola goes no further ahead (in log x) than its window reaches back
            reach = x_now * x_now / curve[0][-forecaster.window]
            assert projection.x[-1] <= reach * (1 + 1e-9)
        if math.isfinite(projection.d_star) and projection.d_star > x_now:
            assert projection.x[-1] >= min(projection.d_star, reach) * (1 - 1e-9)
    # The law's central curve against the noise-free truth, where it was fitted (X[:30]): within 4 sigma.
    seen = np.array(projection.x) <= X[29]
    truth = L_INF + B * np.array(projection.x)[seen] ** -BETA + K * np.array(projection.x)[seen]
    assert np.max(np.abs(central[seen] - truth)) <= 4 * SIGMA + 0.002 * clean.min()


# -- snrmon forecast ---------------------------------------------------------------------------------------


def _csv(path, columns: dict) -> str:
    names = list(columns)
    rows = [",".join(names)] + [",".join(str(v) for v in row) for row in zip(*columns.values(), strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_replay_command_json_matches_the_forecaster(tmp_path, capsys):
    from snrmon.cli import main

    val, train = u_curve(0)
    data = _csv(tmp_path / "run.csv", {"step": X, "val_loss": val, "train_loss": train})
    status = main(["forecast", data, "--metric", "val_loss", "--train-metric", "train_loss", "--json"])
    assert status == 0
    document = json.loads(capsys.readouterr().out)
    expected = BasinForecaster().replay(X, val, train)
    assert len(document["points"]) == len(X)
    assert set(document["points"][0]) >= {
        "x",
        "loss",
        "d_star",
        "d_star_low",
        "d_star_high",
        "warning",
        "stop",
    }
    assert document["points"][0]["d_star"] is None  # no forecast yet
    assert document["first_warning"] == next(f.x for f in expected if f.warning)
    assert document["stop"] == next(f.x for f in expected if f.stop)


def test_replay_every_kth_point_is_what_a_periodic_check_sees(tmp_path, capsys):
    """--every K: the forecaster fed every K-th point, with the training loss averaged over each group of K
    (a group without any training loss: NaN), as a callback checking every K steps would be."""
    from snrmon.cli import main

    val, train = u_curve(0)
    train[8:12] = np.nan  # the third group of four has no training loss
    data = _csv(tmp_path / "run.csv", {"step": X, "val_loss": val, "train_loss": train})
    args = ["forecast", data, "--metric", "val_loss", "--train-metric", "train_loss", "--json"]
    assert main(args + ["--every", "4"]) == 0
    document = json.loads(capsys.readouterr().out)
    means = [np.mean(train[i : i + 4]) for i in range(0, len(X), 4)]
    expected = BasinForecaster().replay(X[3::4], val[3::4], means)
    assert [p["x"] for p in document["points"]] == list(X[3::4])
    assert [p["d_star"] for p in document["points"]] == [
        f.d_star if f.d_star is not None and math.isfinite(f.d_star) else None for f in expected
    ]
    assert document["stop"] == next((f.x for f in expected if f.stop), None)
    assert main(args + ["--every", "81"]) == 2
    assert "keeps no point" in capsys.readouterr().err


def test_points_kept_point_by_point_equal_the_whole_curve_at_once():
    """The forecaster's finite points are kept up to date one point at a time (a replay costs O(n)); they
    must be exactly the vectorised conversion of the whole curve, NaNs and gaps included."""
    from snrmon.forecast.curve import Points, train_at_points

    rng = np.random.default_rng(3)
    x = np.cumsum(rng.uniform(1, 50, size=300))
    loss = rng.uniform(0.5, 3, size=300)
    train = rng.uniform(0.5, 3, size=300)
    loss[rng.choice(300, 30, replace=False)] = np.nan
    train[rng.choice(300, 30, replace=False)] = np.nan
    points = Points()
    for i in range(300):
        points.x.append(float(x[i]))
        points.loss.append(float(loss[i]))
        points.train.append(float(train[i]))
        if i % 7 == 0 or i == 299:  # read now and then, as forecasts do
            got = points.finite()
    keep = np.isfinite(loss)
    for mine, whole in zip(got, (x[keep], loss[keep], train_at_points(x, train)[keep]), strict=True):
        np.testing.assert_array_equal(mine, whole)
    # A forecaster resumed into one that has already forecast another curve forecasts as a fresh one.
    val, train_loss = u_curve(1)
    first = BasinForecaster()
    first.replay(X[:40], val[:40], train_loss[:40])
    used = BasinForecaster()
    used.replay(X[:30] * 3, val[:30] + 0.1, train_loss[:30])
    used.load_state_dict(first.state_dict())
    fresh = BasinForecaster()
    fresh.load_state_dict(first.state_dict())
    rest = (X[40:], val[40:], train_loss[40:])
    assert [f.as_dict() for f in used.replay(*rest)] == [f.as_dict() for f in fresh.replay(*rest)]


def test_replay_table_says_why_a_likely_basin_gives_no_warning(tmp_path, capsys):
    """A plateau of both losses: the ratio sees a basin (P >= 0.5) that the evidence does not bear out; the
    table's rows say why there is no warning, not only "improving"."""
    from snrmon.cli import main

    val, train = 0.5 + 0.01 * np.random.default_rng(0).normal(size=(2, len(X)))
    data = _csv(tmp_path / "plateau.csv", {"step": X, "val_loss": val, "train_loss": train})
    assert main(["forecast", data, "--metric", "val_loss", "--train-metric", "train_loss"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if " improving " in line]
    # x, the loss, D*, the band "low .. high", P(basin), the state, and the reason
    likely = [" ".join(row) for row in rows if row[4] == ".." and float(row[6]) >= 0.5]
    assert likely and all("(no warning" in row for row in likely)


def test_replay_command_text_plot_and_bad_input(tmp_path, capsys):
    from snrmon.cli import main

    val, _ = u_curve(0)
    data = _csv(tmp_path / "run.csv", {"D": X[:16], "loss": val[:16]})  # the loss alone: the law signal
    plot = tmp_path / "replay.png"
    assert main(["forecast", data, "--plot", str(plot)]) == 0
    assert "first warning" in capsys.readouterr().out and plot.stat().st_size > 0
    two = _csv(
        tmp_path / "two.csv", {"group": ["a"] * 3 + ["b"] * 3, "D": [1, 2, 3] * 2, "loss": [3, 2, 1] * 2}
    )
    assert main(["forecast", two]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "2 runs" in error and "--where" in error
    assert main(["forecast", two, "--where", 'group == "a"']) == 0
    capsys.readouterr()
    assert main(["forecast", data, "--plot", ""]) == 2
    assert "--plot: needs a file name" in capsys.readouterr().err
    assert main(["forecast", data, "--metric", "val_loss"]) == 2
    assert "no numeric column 'val_loss'" in capsys.readouterr().err
    assert main(["forecast", data, "--prior", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the prior" in capsys.readouterr().err
    # A prior of the family with this run's N forecasts from the first point (D = step x tokens per step).
    prior = tmp_path / "fit.json"
    prior.write_text(json.dumps({"law": "shannon", "params": SHANNON_FAMILY}))
    steps = _csv(tmp_path / "steps.csv", {"step": X[:3], "loss": val[:3]})
    assert (
        main(["forecast", steps, "--prior", str(prior), "--N", "1e8", "--tokens-per-step", "1e6", "--json"])
        == 0
    )
    first = json.loads(capsys.readouterr().out)["points"][0]
    assert first["state"] == "no forecast" and first["d_star"] > 0 and not first["warning"]
    assert first["method"] == "prior"
    assert main(["forecast", steps, "--prior", str(prior), "--N", "1e8", "--tokens-per-step", "1e6"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:4]
    assert all(row.rstrip().endswith("no forecast  (D* from the prior alone)") for row in rows), rows
    # Without --N a shannon prior cannot give this run's basin: said, not silently ignored.
    assert main(["forecast", steps, "--prior", str(prior), "--json"]) == 0
    assert "needs this run's parameter count" in capsys.readouterr().err


def test_replay_of_a_tensorboard_run_averages_the_training_loss_between_validations(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    from snrmon.cli import main

    val, train = u_curve(0)
    writer = SummaryWriter(str(tmp_path))
    for i, x in enumerate(X.astype(int)):
        for step in range(
            x - 20, x + 1, 10
        ):  # the training loss every 10 steps, the same value in each interval
            writer.add_scalar("train/loss", train[i], step)
        writer.add_scalar("val/loss", val[i], x)
    writer.close()
    assert (
        main(["forecast", str(tmp_path), "--tag", "val/loss", "--train-metric", "train/loss", "--json"]) == 0
    )
    document = json.loads(capsys.readouterr().out)
    # TensorBoard stores float32: the replay equals the forecaster fed the rounded values.
    rounded = [np.float32(v).item() for v in val], [np.float32(v).item() for v in train]
    expected = BasinForecaster().replay(X, *rounded)
    assert [p["warning"] for p in document["points"]] == [f.warning for f in expected]
    assert document["stop"] == next(f.x for f in expected if f.stop)


def test_law_forecasts_do_not_depend_on_the_machines_speed(monkeypatch):
    # A loss-only replay must make the same fits as the live run, on any machine: the law's fresh searches
    # follow the point count, not the clock. A clock on which every search seems to take a minute (a slow or
    # busy machine) changes nothing by default, and with max_seconds skips the searches after the first.
    law = ShannonRunLaw()
    theta = np.array([0.5, 1e-3, 1e-6, 1.0, 0.5, 0.9, 0.1])
    x = np.geomspace(basin_tokens(*theta[1:]) / 30, basin_tokens(*theta[1:]) * 3, 16)
    loss = law.loss(theta, {"D": x}) * np.exp(np.random.default_rng(0).normal(0, 0.01, len(x)))
    quick = [f.as_dict() for f in BasinForecaster(method="law").replay(x, loss)]
    ticks = iter(range(0, 10**9, 60))
    monkeypatch.setattr("snrmon.forecast.law.time.perf_counter", lambda: float(next(ticks)))
    slow = BasinForecaster(method="law")
    assert [f.as_dict() for f in slow.replay(x, loss)] == quick
    assert slow.law.searched_at == 15  # searches at 10 and 15 points
    limited = BasinForecaster(method="law", max_seconds=2.0)
    limited.replay(x, loss)
    assert limited.law.searched_at == 10
    with pytest.raises(ValueError, match="max_seconds"):
        BasinForecaster(max_seconds=-1)


def test_points_at_or_below_zero_do_not_break_the_curve():
    # x <= 0 adds no point; a pair of them (-1 then 0) once made every later forecast a ZeroDivisionError.
    forecaster = BasinForecaster()
    forecaster.update(-1.0, 2.0, 2.0)
    forecaster.update(0.0, 2.0, 2.0)
    val, train = u_curve(0)
    for forecast in forecaster.replay(X[:20], val[:20], train[:20]):
        assert "Error" not in forecast.note


def test_a_resumed_law_forecast_goes_on_exactly_while_its_draws_stand(monkeypatch):
    # A long curve's law draws stand until it has grown by REFIT_GROWTH (1%: past 100 points); they are saved
    # with the state, so a forecaster resumed while they stand forecasts what the uninterrupted one does.
    # (Shown on a short curve with the draws standing until it has grown by half.)
    monkeypatch.setattr("snrmon.forecast.law.REFIT_GROWTH", 0.5)
    law = ShannonRunLaw()
    theta = np.array([0.5, 1e-3, 1e-6, 1.0, 0.5, 0.9, 0.1])
    x = np.geomspace(basin_tokens(*theta[1:]) / 30, basin_tokens(*theta[1:]) * 3, 16)
    loss = law.loss(theta, {"D": x}) * np.exp(np.random.default_rng(1).normal(0, 0.01, len(x)))
    first = BasinForecaster(method="law")
    first.replay(x[:12], loss[:12])  # draws from 10 points stand until 15
    resumed = BasinForecaster(method="law")
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # plain values, as in a checkpoint
    assert [f.as_dict() for f in resumed.replay(x[12:], loss[12:])] == [
        f.as_dict() for f in first.replay(x[12:], loss[12:])
    ]


def test_a_basin_one_step_away_reads_one_step():
    from snrmon.forecast.result import Forecast
    from snrmon.forecast.watch import BasinWatch

    ahead = Forecast(120.0, 0.5, 121.0, 110.0, 130.0, 0.49, 1.0, 0.8, True, False, "basin ahead", "ratio")
    assert BasinWatch("val_loss").describe(ahead).endswith(", 1 step from step 120")
    ahead.d_star, ahead.steps_to_basin = 123.0, 3.0
    assert BasinWatch("val_loss").describe(ahead).endswith(", 3 steps from step 120")


def test_the_fast_statistics_are_the_reference_computations():
    """The forecaster's small-array statistics, written for speed, against numpy's own routines: the slope
    against np.polyfit, the drawn lines against lstsq, pinv and multivariate_normal with the same seed, the
    quantiles against np.quantile (bit for bit), on random windows of the sizes the forecaster uses."""
    from snrmon.forecast.curve import slope
    from snrmon.forecast.decision import quantiles

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(3, 17))
        u = np.sort(rng.uniform(0, 3, n)) + np.arange(n) * 1e-3  # distinct, as window ends are
        r = 0.8 - 0.3 * (u - u[-1]) + rng.normal(0, 10 ** rng.uniform(-4, 0), n)
        value, se = slope(u, r)
        reference, covariance = np.polyfit(u, r, 1, cov="unscaled")
        residuals = r - np.polyval(reference, u)
        assert value == pytest.approx(reference[0], rel=1e-9, abs=1e-12)
        assert se == pytest.approx(math.sqrt(residuals @ residuals / (n - 2) * covariance[0, 0]), rel=1e-6)

        assert_draws_as_numpys(u, r, seed=trial)

        values = rng.normal(size=int(rng.integers(1, 500))) * 10 ** rng.uniform(-3, 3)
        values[rng.uniform(size=len(values)) < rng.uniform(0, 0.6)] = np.inf
        tail = float(rng.uniform(0.001, 0.25))
        assert quantiles(values, (tail, 0.5, 1 - tail)) == list(
            np.quantile(values, [tail, 0.5, 1 - tail], method="inverted_cdf")
        )
    # Distinct x can share one log x (x ~ 1e16 in steps of 2): a level without a slope, as lstsq and pinv
    # give, not a division by zero.
    assert_draws_as_numpys(np.full(6, math.log(1e16)), rng.normal(0.5, 0.1, 6), seed=1)
    forecaster = BasinForecaster()
    for i, x in enumerate([1e15, 2e15, 5e15] + [1e16 + 2 * k for k in range(10)]):
        forecast = forecaster.update(x, 3 - 0.1 * i, 3 - 0.15 * i)
    assert forecast.method == "ratio" and "Error" not in forecast.note


def assert_draws_as_numpys(u: np.ndarray, r: np.ndarray, seed: int) -> None:
    """ratio.crossing_draws against the same lines drawn by numpy's lstsq, pinv and multivariate_normal."""
    from snrmon.forecast.decision import SAMPLES
    from snrmon.forecast.ratio import FAR_AHEAD, crossing_draws

    levels = (0.1, 0.0)
    fast = crossing_draws(u, r, levels, np.random.default_rng(seed))
    centred = u - u[-1]
    design = np.stack([np.ones_like(centred), centred], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, r, rcond=None)
    sigma2 = np.sum((r - design @ coefficients) ** 2) / (len(r) - 2)
    covariance = sigma2 * np.linalg.pinv(design.T @ design)
    draw = np.random.default_rng(seed).multivariate_normal
    a, b = draw(coefficients, covariance, size=SAMPLES, method="eigh").T
    far = math.log(FAR_AHEAD)
    for level, drawn in zip(levels, fast, strict=True):
        with np.errstate(divide="ignore", invalid="ignore"):
            ahead = np.where(b < 0, -(a - level) / b, np.where(a - level <= 0, 0.0, np.inf))
        expected = np.where(ahead > far, np.inf, np.exp(u[-1] + np.clip(ahead, centred[0], far)))
        # (a draw within rounding of the far bound may fall on either side of it)
        finite = np.isfinite(expected) & np.isfinite(drawn)
        assert np.sum(np.isfinite(expected) != np.isfinite(drawn)) <= 1
        np.testing.assert_allclose(drawn[finite], expected[finite], rtol=1e-7)


def test_a_warning_that_lapses_is_withdrawn_in_words():
    from snrmon.forecast import Forecast
    from snrmon.forecast.watch import BasinWatch

    watch = BasinWatch("val_loss")
    ahead = dict(d_star=120.0, d_star_low=110.0, d_star_high=130.0, steps_to_basin=20.0, p_basin=0.7)
    lapsed = "no warning: the monitored loss still falls significantly"
    said = [
        watch.announcement(Forecast(90.0, 1.0, d_star=500.0, p_basin=0.1, state="improving")),
        watch.announcement(Forecast(100.0, 0.9, **ahead, warning=True, state="basin ahead")),
        watch.announcement(Forecast(110.0, 0.8, **ahead, state="improving", note=lapsed)),
        watch.announcement(Forecast(120.0, 0.7, **ahead, state="improving", note=lapsed)),
    ]
    assert said[0] is None and said[1].startswith("val_loss: basin ahead at step 120") and said[3] is None
    assert said[2] == (
        "val_loss: warning withdrawn at step 110: improving again (the monitored loss still falls"
        " significantly)"
    )
    from snrmon.cli.forecast import replay_report

    forecasts = [
        Forecast(100.0, 0.9, **ahead, warning=True, state="basin ahead"),
        Forecast(110.0, 0.8, **ahead, state="improving", note=lapsed),
        Forecast(120.0, 0.7, **ahead, state="improving"),
    ]
    document = {"metric": "val_loss", "stop": None, "mode": "min", "first_warning": 100.0, "minimum": None}
    rows = replay_report(forecasts, document, "step").splitlines()[1:4]
    assert rows[0].endswith("warning") and rows[2].endswith("improving")
    expected = f"improving warning withdrawn ({lapsed})".split()
    assert rows[1].split()[-len(expected) :] == expected


def test_the_figure_marks_an_entered_basin_and_scales_to_the_curve_that_matters():
    pytest.importorskip("matplotlib")
    from snrmon.forecast.plot import forecast_figure

    clean = L_INF + B * X**-BETA + K * X
    val = clean + SIGMA * np.random.default_rng(0).normal(size=len(X))
    forecaster = BasinForecaster()
    forecasts = []
    for x, v, t in zip(X, val, 0.5 * clean, strict=True):
        forecasts.append(forecaster.update(x, v, t))
        if forecasts[-1].stop:
            break
    projection = forecaster.projection
    assert forecasts[-1].d_star < projection.x[0]  # entered: the basin lies behind the curve ahead
    top = forecast_figure(forecasts, "val_loss", projection=projection).axes[0]
    stars = [c for c in top.collections if c.get_label().endswith("(entered)")]
    assert len(stars) == 1 and stars[0].get_offsets()[0][0] == forecasts[-1].d_star
    low, high = top.get_ylim()
    assert high < forecasts[0].loss  # the first steep fall does not flatten the rest
    assert low < min(projection.loss) and max(projection.loss) < high  # the curve ahead is in the chart
    assert low < min(f.loss for f in forecasts[len(forecasts) // 4 :]) and forecasts[-1].loss < high


def test_a_band_without_an_upper_end_is_said_to_be_open_ended():
    from snrmon.forecast import Forecast
    from snrmon.forecast.watch import BasinWatch

    entered = Forecast(160.0, 0.34, d_star=80.0, d_star_low=80.0, d_star_high=math.inf, p_basin=0.94)
    entered.state, entered.warning, entered.stop = "basin entered", True, True
    said = BasinWatch("val_loss").describe(entered)
    assert said.startswith("basin entered: forecast at step 80 (band from 80, open-ended)")
    assert "inf" not in said
