"""The basin D* of a Shannon-law loss curve (T10): root finding against closed forms and direct minimisation.

At fixed N the loss is smallest where SNR(D) = D^β / (c' D^γ + d D^δ + e) is largest (c' = c N^γ), which
is where (γ − β) c' D^γ + (δ − β) d D^δ = β e (T10). Tolerances: brentq runs to rtol 1e-12 in log D, so the
root and the closed forms agree to ~1e-11 relative; 1e-9 leaves room for the exp/log round trips.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from snrmon.laws import ShannonLaw, ShannonRunLaw
from snrmon.laws.basin import basin_tokens, basin_tokens_data_limit, basin_tokens_model_limit


def t10_residual(dstar, c, d, e, beta, gamma, delta):
    """T10's two sides at D*, as (difference, scale of the terms) for a relative check."""
    model, data = (gamma - beta) * c * dstar**gamma, (delta - beta) * d * dstar**delta
    return model + data - beta * e, abs(model) + abs(data) + beta * e


def log_uniform(rng, low, high):
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


@pytest.mark.parametrize(
    ("d", "e", "beta", "delta"), [(2e-6, 1.0, 0.4, 0.6), (1e-3, 50.0, 0.3, 0.5), (5.0, 1e-2, 0.1, 1.2)]
)
def test_data_limit_when_c_is_zero(d, e, beta, delta):
    expected = (beta * e / ((delta - beta) * d)) ** (1 / delta)
    assert basin_tokens_data_limit(d, e, beta, delta) == pytest.approx(expected, rel=1e-12)
    for gamma in (0.05, 0.4, 2.0):  # with c = 0 the model-data exponent is irrelevant
        assert basin_tokens(0.0, d, e, beta, gamma, delta) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("c", "e", "beta", "gamma"), [(1e-4, 1.0, 0.3, 0.5), (3e-2, 50.0, 0.2, 0.25), (10.0, 1e-3, 0.1, 2.5)]
)
def test_model_limit_when_d_is_zero(c, e, beta, gamma):
    expected = (beta * e / ((gamma - beta) * c)) ** (1 / gamma)
    assert basin_tokens_model_limit(c, e, beta, gamma) == pytest.approx(expected, rel=1e-12)
    for delta in (0.05, 0.4, 2.0):
        assert basin_tokens(c, 0.0, e, beta, gamma, delta) == pytest.approx(expected, rel=1e-9)


def test_basin_moves_as_one_over_n_when_data_noise_is_negligible():
    """Model limit with c' = c N^γ: D* = (β e / ((γ − β) c))^(1/γ) · N^(−γ/γ) = const / N, for any γ > β."""
    law = ShannonLaw()
    for gamma in (0.35, 0.5, 1.5):
        # d = 0 exactly, then d tiny with δ < β so that its (negative) T10 term is negligible.
        for d, rel in ((0.0, 1e-9), (1e-20, 1e-6)):
            theta = np.array([0.1, 0.1, 1e-4, d, 1.0, 0.3, gamma, 0.2])
            for n in (1e6, 1e8, 1e10):
                assert law.d_star(theta, 10 * n) == pytest.approx(law.d_star(theta, n) / 10, rel=rel)
            if d == 0:
                expected = basin_tokens_model_limit(1e-4 * 1e8**gamma, 1.0, 0.3, gamma)
                assert law.d_star(theta, 1e8) == pytest.approx(expected, rel=1e-9)


def test_basin_grows_with_n_when_the_cross_term_is_slower_than_the_signal():
    """γ < β < δ: the cross term enters T10 with a negative sign and pushes D* later for bigger models."""
    law = ShannonLaw()
    theta = np.array([0.02, 0.15, 6e-3, 4e-4, 50.0, 0.3, 0.2, 0.5])
    basins = [law.d_star(theta, n) for n in np.geomspace(1e7, 1e12, 6)]
    assert np.all(np.isfinite(basins)) and np.all(np.diff(basins) > 0)
    assert basins[0] > basin_tokens_data_limit(4e-4, 50.0, 0.3, 0.5)


@pytest.mark.parametrize(
    "theta",
    [
        np.array([0.02, 0.15, 6e-3, 4e-4, 50.0, 0.3, 0.2, 0.5]),  # data-noise basin, cross term slower
        np.array([0.1, 0.1, 1e-6, 1e-3, 1.0, 0.3, 0.5, 0.1]),  # model-data basin
        np.array([0.1, 0.1, 1e-6, 1e-5, 1.0, 0.3, 0.45, 0.6]),  # both terms grow faster than the signal
    ],
)
def test_d_star_minimises_the_loss_on_a_fine_grid(theta):
    """The grid minimiser of the law's own loss lies within one grid step (in log D) of the root of T10."""
    law, n = ShannonLaw(), 3e8
    dstar = law.d_star(theta, n)
    assert np.isfinite(dstar)
    log_grid = np.linspace(np.log(dstar) - 5.0, np.log(dstar) + 5.0, 20001)
    step = log_grid[1] - log_grid[0]
    loss = law.loss(theta, {"N": np.full_like(log_grid, n), "D": np.exp(log_grid)})
    best = log_grid[np.argmin(loss)]
    assert abs(best - np.log(dstar)) <= step
    assert 5 < np.argmin(loss) < len(log_grid) - 5  # an interior minimum: the curve is U-shaped around D*
    # The single-run law with c' = c N^γ has the same basin.
    a, alpha, c, d, e, beta, gamma, delta = theta
    run = ShannonRunLaw()
    assert run.d_star(np.array([a * n**alpha, c * n**gamma, d, e, beta, gamma, delta])) == pytest.approx(
        dstar, rel=1e-12
    )


@pytest.mark.parametrize(
    ("c", "d", "beta", "gamma", "delta"),
    [
        (1e-3, 1e-3, 0.5, 0.3, 0.2),  # both terms slower than the signal
        (1e-3, 1e-3, 0.5, 0.5, 0.5),  # equal exponents: SNR saturates, never turns down
        (1e-3, 1e-3, 0.5, 0.5, 0.1),
        (1e-3, 0.0, 0.5, 0.4, 0.9),  # the faster term is absent (d = 0)
        (0.0, 1e-3, 0.5, 0.9, 0.4),  # the faster term is absent (c = 0)
        (0.0, 0.0, 0.5, 0.9, 0.9),  # no noise term besides e
    ],
)
def test_no_basin_unless_a_noise_term_outgrows_the_signal(c, d, beta, gamma, delta):
    assert basin_tokens(c, d, 1.0, beta, gamma, delta) == math.inf


def test_limits_are_inf_without_a_faster_term():
    assert basin_tokens_model_limit(1e-3, 1.0, 0.5, 0.5) == math.inf
    assert basin_tokens_model_limit(1e-3, 1.0, 0.5, 0.3) == math.inf
    assert basin_tokens_data_limit(1e-3, 1.0, 0.5, 0.5) == math.inf
    assert basin_tokens_data_limit(1e-3, 1.0, 0.5, 0.3) == math.inf


@pytest.mark.parametrize(
    "call",
    [
        # γ barely above β, as a fit to a saturating curve gives: the root is at D ≈ 1e314.
        lambda: ShannonLaw().d_star(np.array([0.1, 0.1, 1e-12, 1e-12, 1.0, 0.04999, 0.05, 0.01]), 1.0),
        lambda: basin_tokens_model_limit(1e-12, 1.0, 0.04999, 0.05),
    ],
)
def test_basin_beyond_float_range_is_inf_not_an_error(call):
    result = call()
    assert result == math.inf or result > 1e300


def test_absent_term_with_a_larger_exponent_is_ignored():
    """d = 0 removes the data-noise term, whatever δ: the basin is the model-dominated closed form."""
    result = basin_tokens(1e-100, 0.0, 1.0, 0.3, 0.5, 2.0)
    assert result == pytest.approx(basin_tokens_model_limit(1e-100, 1.0, 0.3, 0.5), rel=1e-9)


def test_shannon_curves_without_basin_fall_forever():
    law = ShannonLaw()
    theta = np.array([0.1, 0.1, 1e-3, 1e-3, 1.0, 0.5, 0.3, 0.2])
    assert law.d_star(theta, 1e9) == math.inf
    tokens = np.geomspace(1e3, 1e30, 500)
    assert np.all(np.diff(law.loss(theta, {"N": np.full_like(tokens, 1e9), "D": tokens})) < 0)


def test_random_basins_satisfy_t10():
    """Property loop over seeded random constants: where max(γ, δ) > β, the root satisfies T10 to 1e-8 of
    its terms' scale and is a minimum of the loss; otherwise the answer is inf.

    Ranges: c, d, e in [1e-6, 1e3], exponents in [0.05, 2], and a basin's exponent gap max(γ, δ) − β of at
    least 0.05, which keeps every root inside 1e±250 (a smaller gap can push D* past the float range: that
    case is tested above).
    """
    rng = np.random.default_rng(10)
    run = ShannonRunLaw()
    found = 0
    for _ in range(400):
        c, d, e = (log_uniform(rng, 1e-6, 1e3) for _ in range(3))
        beta, gamma, delta = (log_uniform(rng, 0.05, 2.0) for _ in range(3))
        if 0 < max(gamma, delta) - beta < 0.05:
            continue
        dstar = basin_tokens(c, d, e, beta, gamma, delta)
        if max(gamma, delta) <= beta:
            assert dstar == math.inf
            continue
        assert 1e-250 < dstar < 1e250
        found += 1
        difference, scale = t10_residual(dstar, c, d, e, beta, gamma, delta)
        assert abs(difference) <= 1e-8 * scale, (c, d, e, beta, gamma, delta)
        theta = np.array([1.0, c, d, e, beta, gamma, delta])
        log_loss = run.log_loss(theta, {"D": dstar * np.array([1 - 1e-3, 1.0, 1 + 1e-3])})
        assert log_loss[1] <= min(log_loss[0], log_loss[2]) + 1e-15
    assert found > 200  # the loop exercised many basins
