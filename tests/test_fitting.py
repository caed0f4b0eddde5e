"""fit_law on data with known constants: recovery, out-of-range forecasts, robustness, failure modes.

Synthetic rows are a law's loss times log-normal noise (σ = SIGMA in log space), seeded. Tolerances follow
from that noise:

* Constants: each lies inside its 95% bootstrap interval *widened about its (log) midpoint* by
  z(1 − 0.001/2) / z(0.975) ≈ 1.68. This file checks about 50 constants; at 95% each, two or three would
  miss by chance (30-resample percentile intervals of a Huber/median-type fit also undercover a little), so
  the plain intervals are Bonferroni-corrected to 99.9% each, 5% for the whole file.
* Curves: where constants are weakly identified (the Shannon laws: a valley in which a, c, d, e and the
  exponents trade off with no change of the curve), the fitted curve must match the true one on a dense
  held-out grid inside the observed box: RMS log error within 2·σ_fit·sqrt(p/n), where σ_fit = σ·sqrt(π/2)
  is the noise a median-type (Huber δ ≪ σ) fit sees and p/n is constants per row; no point off by 2σ.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from snrmon.laws import Law, Param, fitting, get_law
from snrmon.laws.fitting import FitError, fit_law, r2_score, rmse

SIGMA = 0.01
WIDEN = NormalDist().inv_cdf(1 - 0.001 / 2) / NormalDist().inv_cdf(0.975)
STARTS = 256  # fit_law's default; 64 starts take as long here and miss the optimum more often
RESAMPLES = 30
RESAMPLES_CHEAP = 50  # for the fast laws (Chinchilla, Kaplan, power)
PYTHIA = Path(__file__).resolve().parents[1] / "data" / "pythia_deduped_lambada_loss.csv"
TOKENS_PER_STEP = 2_097_152  # Pythia: 1024 sequences of 2048 tokens per step


def grid(**axes: np.ndarray) -> dict[str, np.ndarray]:
    mesh = np.meshgrid(*axes.values(), indexing="ij")
    return {name: values.ravel() for name, values in zip(axes, mesh, strict=True)}


def subset(columns: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {name: values[rows] for name, values in columns.items()}


def noisy(law: Law, theta: np.ndarray, columns: dict, seed: int, sigma: float = SIGMA) -> np.ndarray:
    return law.loss(theta, columns) * np.exp(
        np.random.default_rng(seed).normal(0.0, sigma, len(columns["D"]))
    )


def outside_intervals(fit, truth: np.ndarray, names=None) -> list[str]:
    """Constants whose true value lies outside the widened bootstrap interval (empty: all recovered)."""
    missed = []
    for name, true in zip(fit.law.param_names, truth, strict=True):
        if names is not None and name not in names:
            continue
        low, high = fit.params_ci[name]
        assert low <= fit.params[name] <= high or math.isclose(low, high), name
        middle, half = math.sqrt(low * high), math.log(high / low) / 2
        if not middle * math.exp(-WIDEN * half) <= true <= middle * math.exp(WIDEN * half):
            missed.append(f"{name}: true {true:.4g}, fit {fit.params[name]:.4g}, 95% [{low:.4g}, {high:.4g}]")
    return missed


def assert_curve_recovered(law: Law, theta: np.ndarray, truth: np.ndarray, box: dict, rows: int) -> None:
    """The fitted curve matches the true one on a held-out grid ``box`` within the noise (module doc)."""
    error = law.log_loss(theta, box) - law.log_loss(truth, box)
    bound = 2 * SIGMA * math.sqrt(math.pi / 2) * math.sqrt(len(law.params) / rows)
    assert np.sqrt(np.mean(error**2)) <= bound
    assert np.max(np.abs(error)) <= 2 * SIGMA


# ---------------------------------------------------------------------------------------------------------
# Chinchilla, Kaplan and the single-run power law: every constant recovered.

CHINCHILLA = np.array([1.8, 400.0, 0.34, 410.0, 0.28])  # E, A, α, B, β: Hoffmann's fit, rounded
NOT_SHANNON_ROWS = grid(N=np.geomspace(1e7, 1e10, 8), D=np.geomspace(1e8, 1e12, 30))  # 240 rows


@pytest.mark.parametrize(
    ("name", "truth", "columns"),
    [
        ("chinchilla", CHINCHILLA, NOT_SHANNON_ROWS),
        ("kaplan", np.array([8.8e13, 5.4e13, 0.076, 0.095]), NOT_SHANNON_ROWS),  # Kaplan's constants
        ("power", np.array([1.5, 300.0, 0.3]), {"D": np.geomspace(1e8, 1e12, 200)}),
    ],
)
def test_recovers_every_constant(name, truth, columns):
    law = get_law(name)
    # These fits are cheap: 50 resamples, whose percentile intervals cover better than 30 (over 30 noise
    # draws each, every constant inside its widened interval in 30 of 30 with 50 resamples, 29 of 30 with 30)
    loss = noisy(law, truth, columns, seed=1)
    fit = fit_law(law, columns, loss, starts=STARTS, bootstrap=RESAMPLES_CHEAP, seed=1)
    assert set(fit.params_ci) == set(law.param_names)
    assert not outside_intervals(fit, truth), outside_intervals(fit, truth)
    assert fit.n_train == len(columns["D"]) and fit.r2_train > 0.99
    assert fit.warnings == []  # a well-determined fit raises no false alarm
    assert fit.rmse_train < 2 * SIGMA * np.max(law.loss(truth, columns))


# ---------------------------------------------------------------------------------------------------------
# Precision laws: rows quantized to 3, 4, 8 and 16 bits.

PRECISION_ROWS = grid(
    N=np.geomspace(1e8, 1e10, 5), D=np.geomspace(1e9, 1e12, 12), bits=np.array([3, 4, 8, 16.0])
)
PRECISION_BOX = grid(
    N=np.geomspace(1e8, 1e10, 9), D=np.geomspace(1e9, 1e12, 25), bits=np.array([3, 5, 8, 12, 16.0])
)


@pytest.mark.parametrize(
    ("name", "degradation", "names"),
    [
        # C_T, γ_D, γ_N, γ_post: at 3 bits, N = 1e9, D = 1e10 the degradation is 0.5 nats, at 16 bits 1e-4.
        ("kumar", [9.0, 0.5, 0.6, 1.5], ("C_T", "gamma_D", "gamma_N", "gamma_post")),
        # k, α_q, β_q, γ_q: 0.2 nats at 3 bits, N = 1e9, D = 1e10; 0.008 at 16 bits.
        ("qid", [5.0, 0.6, 0.5, 2.0], ("k", "alpha_q", "beta_q", "gamma_q")),
    ],
)
def test_recovers_quantization_degradation(name, degradation, names):
    """The degradation constants (what these laws add to T11) are recovered within their intervals; the
    Chinchilla part shares the precision rows' weaker D range (B, β are checked in the test above), so the
    whole law is checked through its curve."""
    law = get_law(name)
    truth = np.concatenate([CHINCHILLA, degradation])
    loss = noisy(law, truth, PRECISION_ROWS, seed=2)
    fit = fit_law(law, PRECISION_ROWS, loss, starts=STARTS, bootstrap=RESAMPLES, seed=2)
    assert not outside_intervals(fit, truth, names), outside_intervals(fit, truth, names)
    assert_curve_recovered(law, fit.theta, truth, PRECISION_BOX, rows=len(loss))


# ---------------------------------------------------------------------------------------------------------
# The Shannon law (T6–T8) on U-shaped data.
#
# Design: β = 0.3 < δ = 0.5, so data noise makes every run turn up (T10); γ = 0.2 < β, so the cross term
# enters T10 with a negative sign and bigger models reach their basin later (as Pythia's do). d places the
# data-noise-only basin at 3e10 tokens; c makes the cross term half of e at N = 1e8, D = 1e10; e sets SNR ~ 1
# at 1e9 tokens (the capacity log2(1 + SNR) then varies strongly with D); a sets L ≈ 3.6 at N = 1e8.
# D* grows from ≈ 4.5e10 (N = 1e8) to ≈ 8e10 (N = 1e10): inside the observed 1e9–1e12 tokens for every N.

BETA, GAMMA, DELTA, E_NOISE = 0.3, 0.2, 0.5, 50.0
SHANNON = np.array(
    [
        0.28 / 1e8**0.15,  # a
        0.15,  # α
        0.5 * E_NOISE / 1e18**GAMMA,  # c
        BETA * E_NOISE / ((DELTA - BETA) * 3e10**DELTA),  # d
        E_NOISE,
        BETA,
        GAMMA,
        DELTA,
    ]
)
MODEL_SIZES = np.geomspace(1e8, 1e10, 5)
SHANNON_ROWS = grid(N=MODEL_SIZES, D=np.geomspace(1e9, 1e12, 60))  # 300 rows
SHANNON_BOX = grid(N=np.geomspace(1e8, 1e10, 17), D=np.geomspace(1e9, 1e12, 97))


def true_basins() -> np.ndarray:
    return np.array([get_law("shannon").d_star(SHANNON, n) for n in MODEL_SIZES])


@pytest.fixture(scope="module")
def shannon_data():
    law = get_law("shannon")
    loss = noisy(law, SHANNON, SHANNON_ROWS, seed=3)
    return law, loss, fit_law(law, SHANNON_ROWS, loss, starts=STARTS, seed=3)


def test_shannon_design_has_basins_inside_the_data():
    basins = true_basins()
    assert np.all((basins > 1e9) & (basins < 1e12)) and np.all(np.diff(basins) > 0)
    # and the curve is U-shaped there: the loss at the ends exceeds the minimum by well over the noise
    law = get_law("shannon")
    n = MODEL_SIZES[0]
    ends = law.loss(SHANNON, {"N": np.full(2, n), "D": np.array([1e9, 1e12])})
    bottom = law.loss(SHANNON, {"N": np.array([n]), "D": basins[:1]})
    assert np.all(np.log(ends / bottom) > 5 * SIGMA)


def test_shannon_recovers_the_curve_and_the_basin(shannon_data):
    """Constants are weakly identified here (see module docstring), the curve and D* are not: D* per N is
    within 25% of the truth and inside its (widened) bootstrap interval from refits of resampled rows."""
    law, loss, fit = shannon_data
    assert_curve_recovered(law, fit.theta, SHANNON, SHANNON_BOX, rows=len(loss))
    fitted = np.array([law.d_star(fit.theta, n) for n in MODEL_SIZES])
    truth = true_basins()
    np.testing.assert_allclose(fitted, truth, rtol=0.25)

    rng = np.random.default_rng(4)
    samples = []
    for _ in range(RESAMPLES):
        rows = rng.integers(0, len(loss), len(loss))
        refit = fit_law(law, subset(SHANNON_ROWS, rows), loss[rows], theta0=fit.theta, starts=0)
        samples.append([law.d_star(refit.theta, n) for n in MODEL_SIZES])
    low, high = np.percentile(np.log(samples), [2.5, 97.5], axis=0)
    middle, half = (low + high) / 2, (high - low) / 2
    assert np.all(np.abs(np.log(truth) - middle) <= WIDEN * half)


def test_shannon_run_recovers_one_curve_and_its_basin():
    """T9 on one run (N = 1e8 of the design above). Its seven constants are not identified by one curve
    (c·D^γ and d·D^δ even swap roles freely), so the curve and D* are checked."""
    full, law = get_law("shannon"), get_law("shannon-run")
    n = MODEL_SIZES[0]
    a, alpha, c, d, e, beta, gamma, delta = SHANNON
    truth = np.array([a * n**alpha, c * n**gamma, d, e, beta, gamma, delta])
    tokens = {"D": np.geomspace(1e9, 1e12, 200)}
    loss = noisy(law, truth, tokens, seed=5)
    fit = fit_law(law, tokens, loss, starts=STARTS, seed=5)
    assert_curve_recovered(law, fit.theta, truth, {"D": np.geomspace(1e9, 1e12, 1001)}, rows=len(loss))
    assert law.d_star(fit.theta) == pytest.approx(full.d_star(SHANNON, n), rel=0.25)


@pytest.mark.parametrize("seed", [23, 32, 37])
def test_multi_start_finds_the_optimum(seed):
    """The cold fit (default settings) reaches the optimum that a polish from the truth finds. These seeds
    made an earlier fitter (8 refined starts, numerical Jacobian) miss it by about 20%, with c → 1e-21 and
    one D* for every N; with analytic Jacobians and a smoother exploration, 0 of seeds 20–39 miss."""
    law = get_law("shannon")
    loss = noisy(law, SHANNON, SHANNON_ROWS, seed=seed)
    cold = fit_law(law, SHANNON_ROWS, loss, seed=seed)
    reference = fit_law(law, SHANNON_ROWS, loss, theta0=SHANNON, starts=0)
    assert cold.cost <= reference.cost * (1 + 1e-4)


def test_shannon_beats_monotone_baselines_out_of_range():
    """Fit on D ≤ 2e11 (every basin is inside), score pooled R² on D > 2e11, where every run turns up:
    Shannon must beat Chinchilla, Kaplan and a per-run power law, which can only keep falling."""
    loss = noisy(get_law("shannon"), SHANNON, SHANNON_ROWS, seed=6)
    train = SHANNON_ROWS["D"] <= 2e11
    test = ~train
    assert np.all(true_basins() < 2e11)
    scores = {}
    for name in ("shannon", "chinchilla", "kaplan"):
        fit = fit_law(get_law(name), subset(SHANNON_ROWS, train), loss[train], starts=STARTS)
        scores[name] = fit.score(subset(SHANNON_ROWS, test), loss[test])["r2"]
    power, predicted = get_law("power"), np.empty(test.sum())
    for n in MODEL_SIZES:
        run_train, run_test = train & (SHANNON_ROWS["N"] == n), SHANNON_ROWS["N"][test] == n
        fit = fit_law(power, {"D": SHANNON_ROWS["D"][run_train]}, loss[run_train], starts=STARTS)
        predicted[run_test] = fit.predict({"D": SHANNON_ROWS["D"][test][run_test]})
    scores["power per run"] = r2_score(loss[test], predicted)
    print("held-out pooled R²:", {name: round(score, 4) for name, score in scores.items()})
    assert all(scores["shannon"] > score for name, score in scores.items() if name != "shannon"), scores


def test_shannon_invents_no_basin_in_monotone_data():
    """Chinchilla data never turn up; a Shannon fit must not put a basin inside the observed tokens."""
    law = get_law("shannon")
    loss = noisy(get_law("chinchilla"), CHINCHILLA, SHANNON_ROWS, seed=7)
    fit = fit_law(law, SHANNON_ROWS, loss, starts=STARTS, seed=7)
    assert fit.r2_train > 0.9
    basins = np.array([law.d_star(fit.theta, n) for n in MODEL_SIZES])
    assert np.all(basins > SHANNON_ROWS["D"].max()), basins


# ---------------------------------------------------------------------------------------------------------
# Robustness, warm starts, failures.


def test_huber_fit_resists_outliers_where_least_squares_does_not():
    """5% of rows corrupted by +30% loss. The Huber fit keeps the curve within the noise bound and its
    exponents inside their intervals; plain least squares on the loss is pulled off the curve (by about
    5% × log 1.3 ≈ 0.013, several times the bound) and its constants further from the truth, measured in
    units of the Huber interval widths. (The Huber fit is not immune: one-sided outliers move a median-type
    fit by Φ⁻¹(0.5 / 0.95)·σ ≈ 0.07σ, about one standard error here, so E, A, B are judged by the curve.)"""
    law = get_law("chinchilla")
    rng = np.random.default_rng(8)
    loss = noisy(law, CHINCHILLA, NOT_SHANNON_ROWS, seed=8)
    loss[rng.choice(len(loss), len(loss) // 20, replace=False)] *= 1.3
    huber = fit_law(law, NOT_SHANNON_ROWS, loss, starts=STARTS, bootstrap=RESAMPLES, seed=8)
    plain = fit_law(law, NOT_SHANNON_ROWS, loss, starts=STARTS, robust=False, seed=8)
    box = grid(N=np.geomspace(1e7, 1e10, 15), D=np.geomspace(1e8, 1e12, 61))
    assert_curve_recovered(law, huber.theta, CHINCHILLA, box, rows=len(loss))
    with pytest.raises(AssertionError):
        assert_curve_recovered(law, plain.theta, CHINCHILLA, box, rows=len(loss))
    assert not outside_intervals(huber, CHINCHILLA, ("alpha", "beta")), outside_intervals(huber, CHINCHILLA)
    widths = np.array([math.log(high / low) / 2 for low, high in huber.params_ci.values()])
    huber_error = np.abs(np.log(huber.theta / CHINCHILLA)) / widths
    plain_error = np.abs(np.log(plain.theta / CHINCHILLA)) / widths
    assert plain_error.max() > huber_error.max()


def test_warm_start_reproduces_the_cold_fit():
    """Polishing a fit on the same rows (theta0, starts=0) finds the same optimum (Chinchilla: well posed)."""
    law = get_law("chinchilla")
    loss = noisy(law, CHINCHILLA, NOT_SHANNON_ROWS, seed=9)
    for robust in (True, False):
        cold = fit_law(law, NOT_SHANNON_ROWS, loss, starts=STARTS, robust=robust)
        warm = fit_law(law, NOT_SHANNON_ROWS, loss, theta0=cold.theta, starts=0, robust=robust)
        assert warm.cost == pytest.approx(cold.cost, rel=1e-6)
        np.testing.assert_allclose(warm.theta, cold.theta, rtol=1e-5)


def test_warm_start_on_the_shannon_valley(shannon_data):
    """In the Shannon law's flat valley the warm polish may still creep along it (its cost by 1e-5 relative:
    see the xfail below), but never uphill, and neither the curve nor the basin moves: the curve by less than
    1% of the noise, D* by less than 1%."""
    law, loss, cold = shannon_data
    warm = fit_law(law, SHANNON_ROWS, loss, theta0=cold.theta, starts=0)
    assert warm.cost <= cold.cost * (1 + 1e-12)
    moved = law.log_loss(warm.theta, SHANNON_BOX) - law.log_loss(cold.theta, SHANNON_BOX)
    assert np.max(np.abs(moved)) <= SIGMA / 100
    for n in MODEL_SIZES:
        assert law.d_star(warm.theta, n) == pytest.approx(law.d_star(cold.theta, n), rel=0.01)


@pytest.mark.xfail(
    strict=True,
    reason="fitting: a warm refit (one least_squares solve, ftol = xtol = 1e-6) stops short of the bottom of "
    "the Shannon valley; a second one lowers the cost by up to 3e-4 relative (reported with a repro)",
)
def test_polish_is_converged():
    """A polish of a polished fit on the same rows changes its cost by at most 1e-6 relative (what a warm
    refit of an unchanged curve must reproduce). Six noise draws of each Shannon law, polished from truth."""
    run_truth = np.array([0.28, 0.25, 4.33e-4, 50.0, 0.3, 0.2, 0.5])  # the T9 run of the design, N = 1e8
    cases = [
        ("shannon-run", run_truth, {"D": np.geomspace(1e9, 1e12, 200)}),
        ("shannon", SHANNON, SHANNON_ROWS),
    ]
    gaps = []
    for name, truth, columns in cases:
        law = get_law(name)
        for seed in range(6):
            loss = noisy(law, truth, columns, seed=seed)
            first = fit_law(law, columns, loss, theta0=truth, starts=0)
            second = fit_law(law, columns, loss, theta0=first.theta, starts=0)
            gaps.append((first.cost - second.cost) / first.cost)
    assert max(gaps) <= 1e-6, gaps


def test_large_inputs_use_bounded_subsamples(monkeypatch):
    """Beyond SUBSAMPLE_ROWS rows only the final polish (and its restarts) sees every row; choosing between
    the explored starts and each bootstrap resample use bounded subsamples. The constants are those of the
    fit on every row, and the rescaled (m-out-of-n) intervals match the full bootstrap's width: 30 resamples
    estimate a width to about ±25%, and a nonlinear fit on 100 rows follows the 1/sqrt(rows) law loosely,
    hence the factor 2.5."""
    law = get_law("chinchilla")
    columns = grid(N=np.geomspace(1e7, 1e10, 8), D=np.geomspace(1e8, 1e12, 120))  # 960 rows
    loss = noisy(law, CHINCHILLA, columns, seed=0)
    full = fit_law(law, columns, loss, starts=64, refine=4, bootstrap=30, seed=0)

    rows_seen = []
    solve = fitting._Problem.solve

    def counting(problem, log_start, rows=slice(None), **options):
        rows_seen.append(len(problem.loss) if isinstance(rows, slice) else len(rows))
        return solve(problem, log_start, rows, **options)

    monkeypatch.setattr(fitting._Problem, "solve", counting)
    monkeypatch.setattr(fitting, "SUBSAMPLE_ROWS", 100)
    fit = fit_law(law, columns, loss, starts=64, refine=4, bootstrap=30, seed=0)
    assert 1 <= rows_seen.count(960) <= 3  # the polish on every row, restarted at most twice
    assert set(rows_seen) == {fitting.EXPLORE_ROWS, 100, 800, 960}  # explore, choose, 8x larger, all
    assert rows_seen.count(100) == 30 + 2  # each resample, and the choice between the two best starts
    np.testing.assert_allclose(fit.theta, full.theta, rtol=1e-3)
    assert not outside_intervals(fit, CHINCHILLA), outside_intervals(fit, CHINCHILLA)
    for name, (low, high) in fit.params_ci.items():
        full_low, full_high = full.params_ci[name]
        assert 0.4 <= math.log(high / low) / math.log(full_high / full_low) <= 2.5, name


def test_too_few_rows():
    law = get_law("shannon")
    columns = {"N": np.full(5, 1e9), "D": np.geomspace(1e9, 1e10, 5)}
    with pytest.raises(FitError, match="5 rows cannot determine 8 constants"):
        fit_law(law, columns, np.ones(5))


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("N", 0.0, "positive"),
        ("D", -1.0, "positive"),
        ("loss", np.nan, "non-finite"),
        ("bits", np.inf, "non-finite"),
    ],
)
def test_bad_values_name_their_column(column, value, problem):
    law = get_law("kumar")
    columns = dict(PRECISION_ROWS)
    loss = law.loss(np.concatenate([CHINCHILLA, [9.0, 0.5, 0.6, 1.5]]), columns)
    if column == "loss":
        loss[3] = value
    else:
        columns[column] = columns[column].copy()
        columns[column][3] = value
    with pytest.raises(FitError, match=f"column '{column}'.*{problem}"):
        fit_law(law, columns, loss)


class NowhereFinite(Law):
    """A law that cannot be evaluated anywhere (stands in for one overflowing at every start)."""

    name = "nowhere-finite"
    inputs = ("D",)
    single_run = True
    params = (Param("k", "1", "scale", 1e-3, 1e3, (0.1, 1.0, 10.0)),)

    def log_loss(self, theta, columns):
        return np.full(np.shape(columns["D"]), np.nan)


def test_law_not_finite_at_any_start():
    tokens = {"D": np.geomspace(1e9, 1e12, 20)}
    with pytest.raises(FitError, match="not finite at any starting point"):
        fit_law(NowhereFinite(), tokens, np.ones(20), starts=8)


def test_warm_start_where_law_is_not_finite():
    """The warm path judges its result on the real residuals, not on the optimiser's clipped ones."""
    tokens = {"D": np.geomspace(1e9, 1e12, 20)}
    with pytest.raises(FitError):
        fit_law(NowhereFinite(), tokens, np.ones(20), theta0=np.array([1.0]), starts=0)


def test_no_nan_constants_from_hard_data():
    """Pure noise with no trend, or a constant loss: fits either raise FitError or return finite constants
    inside the bounds (here they run into the bounds)."""
    rng = np.random.default_rng(11)
    columns = {"N": np.repeat([1e8, 1e9], 10), "D": np.tile(np.geomspace(1e9, 1e11, 10), 2)}
    for name in ("shannon", "chinchilla"):
        law = get_law(name)
        lower, upper = law.bounds
        for loss in (np.exp(rng.normal(1.0, 0.5, 20)), np.full(20, 2.0)):
            try:
                fit = fit_law(law, columns, loss, starts=8, refine=2, bootstrap=3)
            except FitError:
                continue
            assert np.all(np.isfinite(fit.theta)) and np.all((fit.theta >= lower) & (fit.theta <= upper))
            assert all(np.isfinite(bound) for interval in fit.params_ci.values() for bound in interval)
            assert np.isfinite(fit.cost) and np.all(np.isfinite(fit.predict(columns)))


def test_r2_and_rmse():
    observed = np.array([1.0, 2.0, 3.0, 4.0])
    assert r2_score(observed, observed) == 1.0 and rmse(observed, observed) == 0.0
    assert r2_score(observed, np.full(4, observed.mean())) == pytest.approx(0.0, abs=1e-15)
    assert r2_score(observed, observed[::-1]) < 0  # worse than the mean
    assert rmse(observed, observed + 0.5) == pytest.approx(0.5)
    assert rmse(observed, observed[::-1]) == pytest.approx(math.sqrt((9 + 1 + 1 + 9) / 4))
    assert math.isnan(r2_score(np.full(3, 2.0), np.full(3, 2.0)))  # no variance to explain


# ---------------------------------------------------------------------------------------------------------
# Real data: Pythia deduped on LAMBADA (data/README.md).


def read_pythia():
    with PYTHIA.open() as handle:
        rows = list(csv.DictReader(handle))
    columns = {name: np.array([float(row[name]) for row in rows]) for name in ("N", "D", "loss")}
    keep = columns["D"] >= 3000 * TOKENS_PER_STEP  # the chaotic first checkpoints are dropped
    return {name: values[keep] for name, values in columns.items()}


def test_pythia_fits_and_held_out_scores():
    """Fit on N ≤ 7e9 and D ≤ 1.8e11 (the paper's split), score the held-out rows: the 12B model and every
    later checkpoint. Scores are printed, not asserted against the paper."""
    data = read_pythia()
    assert len(data["loss"]) == 8 * 15
    train = (data["N"] <= 7e9) & (data["D"] <= 1.8e11)
    columns = {"N": data["N"], "D": data["D"]}
    report = {}
    for name, robust in (("shannon", True), ("chinchilla", True), ("shannon", False)):
        law = get_law(name)
        fit = fit_law(law, subset(columns, train), data["loss"][train], starts=STARTS, robust=robust)
        held_out = fit.score(subset(columns, ~train), data["loss"][~train])
        assert np.all(np.isfinite(fit.theta)) and fit.r2_train > 0.5
        assert np.isfinite(held_out["r2"]) and held_out["n"] == int((~train).sum())
        label = f"{name} ({'Huber' if robust else 'least squares'})"
        report[label] = (round(fit.r2_train, 3), round(held_out["r2"], 3))
        if name == "shannon":
            report[label] += ([f"{law.d_star(fit.theta, n):.3g}" for n in np.unique(data["N"])],)
    print("Pythia (R² train, R² held out[, D* per N]):", report)


def test_a_low_r2_set_by_a_few_rows_far_off_is_said_with_the_r2_of_the_others():
    """A curve whose first point lies far above the law (a steep start the robust fit on log L gives little
    weight): R² on the loss itself goes below 0, which alone reads as a failed fit."""
    law, truth = get_law("power"), np.array([1.5, 3.0, 0.3])
    columns = {"D": np.geomspace(1e3, 1e6, 40)}
    loss = noisy(law, truth, columns, seed=2)
    loss[0] *= 30.0
    fit = fit_law(law, columns, loss, starts=STARTS, seed=1)
    assert fit.r2_train < 0.5
    said = [w for w in fit.warnings if "(on the loss itself) is set by 1 of 40 rows" in w]
    assert len(said) == 1 and "robust fit on log L" in said[0]
    others = float(said[0].rsplit("R² is ", 1)[1])
    assert others > 0.9  # the law fits the rest
