"""The laws of snrmon.laws against their equations (T6–T14), written out plainly here in linear space.

Each law is evaluated in log space by the library; here every equation is evaluated directly with numpy at
random positive constants and inputs, and the two must agree to rel 1e-10 (double precision leaves ~1e-13).
The ranges keep the direct evaluation itself accurate: no overflow, and log2(1 + x) is written as
log1p(x) / ln 2 so that a tiny SNR keeps its digits.
"""

from __future__ import annotations

import numpy as np
import pytest

from snrmon.laws import LAWS, ShannonLaw, ShannonRunLaw, get_law
from snrmon.laws.basin import basin_tokens

RTOL = 1e-10
ROWS = 500


def log2_1p(x):
    return np.log1p(x) / np.log(2.0)


# The equations, as printed in the theory reference, in the order of each law's params.
def shannon(theta, N, D):  # T6–T8 with b = 1
    a, alpha, c, d, e, beta, gamma, delta = theta
    snr = D**beta / (c * (D * N) ** gamma + d * D**delta + e)
    return 1.0 / (a * N**alpha * log2_1p(snr))


def shannon_run(theta, D):  # T9
    big_a, c, d, e, beta, gamma, delta = theta
    return 1.0 / (big_a * log2_1p(D**beta / (c * D**gamma + d * D**delta + e)))


def chinchilla(theta, N, D):  # T11
    big_e, big_a, alpha, big_b, beta = theta
    return big_e + big_a / N**alpha + big_b / D**beta


def kaplan(theta, N, D):  # T12
    n_c, d_c, alpha_n, alpha_d = theta
    return ((n_c / N) ** (alpha_n / alpha_d) + d_c / D) ** alpha_d


def power(theta, D):  # T11 at fixed N
    big_e, big_b, beta = theta
    return big_e + big_b / D**beta


def kumar(theta, N, D, bits):  # T13, N_eff = N
    big_e, big_a, alpha, big_b, beta, c_t, gamma_d, gamma_n, gamma_post = theta
    degradation = c_t * D**gamma_d / N**gamma_n * np.exp(-bits / gamma_post)
    return big_a / N**alpha + big_b / D**beta + big_e + degradation


def qid(theta, N, D, bits):  # T11 + T14
    big_e, big_a, alpha, big_b, beta, k, alpha_q, beta_q, gamma_q = theta
    return big_e + big_a / N**alpha + big_b / D**beta + k * D**beta_q / (N**alpha_q * bits**gamma_q)


EQUATIONS = {
    "shannon": shannon,
    "shannon-run": shannon_run,
    "chinchilla": chinchilla,
    "kaplan": kaplan,
    "power": power,
    "kumar": kumar,
    "qid": qid,
}

# Ranges (log-uniform) for random constants: realistic magnitudes that keep the direct formulas in range.
EXPONENT = (0.03, 0.8)
CHINCHILLA = [(0.5, 3.0), (10.0, 1e4), EXPONENT, (10.0, 1e4), EXPONENT]
CONSTANT_RANGES = {
    "shannon": [(1e-3, 1.0), EXPONENT, (1e-8, 1e-2), (1e-6, 1.0), (1e-2, 1e2), EXPONENT, EXPONENT, EXPONENT],
    "shannon-run": [(1e-3, 1.0), (1e-6, 1.0), (1e-6, 1.0), (1e-2, 1e2), EXPONENT, EXPONENT, EXPONENT],
    "chinchilla": CHINCHILLA,
    "kaplan": [(1e8, 1e15), (1e8, 1e15), (0.03, 0.3), (0.03, 0.3)],
    "power": [(0.5, 3.0), (10.0, 1e4), EXPONENT],
    "kumar": [*CHINCHILLA, (1e-3, 1e2), EXPONENT, EXPONENT, (0.3, 5.0)],
    "qid": [*CHINCHILLA, (1e-3, 1e2), EXPONENT, EXPONENT, (0.5, 3.0)],
}


def log_uniform(rng, low, high, size=None):
    return np.exp(rng.uniform(np.log(low), np.log(high), size))


def random_inputs(law, rng, rows=ROWS):
    values = {
        "N": log_uniform(rng, 1e6, 1e12, rows),
        "D": log_uniform(rng, 1e6, 1e13, rows),
        "bits": rng.choice([2.0, 3.0, 4.0, 8.0, 16.0], rows),
    }
    return {name: values[name] for name in law.inputs}


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_log_loss_matches_the_equation(name):
    law = get_law(name)
    rng = np.random.default_rng(sum(map(ord, name)))
    for _ in range(20):
        theta = np.array([log_uniform(rng, low, high) for low, high in CONSTANT_RANGES[name]])
        columns = random_inputs(law, rng)
        direct = EQUATIONS[name](theta, **columns)
        assert np.all(np.isfinite(direct)) and np.all(direct > 0)
        np.testing.assert_allclose(law.loss(theta, columns), direct, rtol=RTOL)
        np.testing.assert_allclose(np.exp(law.log_loss(theta, columns)), direct, rtol=RTOL)


def test_registry_and_get_law():
    assert set(LAWS) == set(EQUATIONS)
    for name, law in LAWS.items():
        assert law.name == name and get_law(name) is law
        assert law.single_run == ("N" not in law.inputs)
    with pytest.raises(ValueError, match="unknown law 'chinchila'.*shannon"):
        get_law("chinchila")
    with pytest.raises(ValueError, match="unknown law"):
        get_law("")


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_params_have_positive_bounds_around_their_starts(name):
    law = get_law(name)
    assert len(set(law.param_names)) == len(law.params) > 0
    for p in law.params:
        assert 0 < p.lower < p.upper, p
        assert p.starts and all(p.lower < s < p.upper for s in p.starts), p
        assert p.unit and p.meaning
    lower, upper = law.bounds
    np.testing.assert_array_equal(lower, [p.lower for p in law.params])
    np.testing.assert_array_equal(upper, [p.upper for p in law.params])
    theta = np.arange(1.0, len(law.params) + 1)
    assert law.as_dict(theta) == dict(zip(law.param_names, theta.tolist(), strict=True))


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_starting_points(name):
    """``starts(limit, seed)``: ``limit`` seeded points inside every constant's start range and its bounds,
    spread over the whole range (scrambled Sobol: with 2^k points each 1-D projection has one point in every
    1/2^k of the log range)."""
    law = get_law(name)
    points = law.starts(limit=64, seed=3)
    assert points.shape == (64, len(law.params))
    np.testing.assert_array_equal(points, law.starts(limit=64, seed=3))
    assert not np.array_equal(points, law.starts(limit=64, seed=4))
    low = np.log([min(p.starts) for p in law.params])
    high = np.log([max(p.starts) for p in law.params])
    assert np.all(low < high)
    unit = (np.log(points) - low) / (high - low)
    assert np.all((unit >= 0) & (unit < 1))
    assert np.all(unit.min(axis=0) < 1 / 32) and np.all(unit.max(axis=0) > 31 / 32)
    lower, upper = law.bounds
    assert np.all((points > lower) & (points < upper))


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_finite_at_extreme_inputs(name):
    """Constants at every corner of the start grid, inputs over 60 decades: the log-loss stays finite."""
    law = get_law(name)
    grid = law.starts(limit=64, seed=1)
    extremes = {"N": [1e-10, 1.0, 1e50], "D": [1e-10, 1.0, 1e50], "bits": [1.0, 64.0]}
    mesh = np.meshgrid(*(extremes[name] for name in law.inputs), indexing="ij")
    columns = {name: values.ravel() for name, values in zip(law.inputs, mesh, strict=True)}
    for theta in grid:
        log_loss = law.log_loss(theta, columns)
        assert log_loss.shape == columns["D"].shape
        assert np.all(np.isfinite(log_loss)), theta


@pytest.mark.parametrize("log10_snr", [-300.0, -20.0, 20.0, 300.0])
def test_shannon_stable_at_tiny_and_huge_snr(log10_snr):
    """log2(1 + SNR) ≈ SNR / ln 2 for tiny SNR and ≈ log2(SNR) for huge SNR; the naive formula gives 1/0."""
    law = ShannonLaw()
    # c and d negligible (1e-30 against e), so SNR = D^beta / e: a tiny signal for a tiny SNR, a huge one
    # (D = 1e100, beta = 3) for a huge SNR.
    beta, tokens = (1e-4, 1e10) if log10_snr < 0 else (3.0, 1e100)
    n, d = np.array([1e9]), np.array([tokens])
    log_e = beta * np.log(tokens) - log10_snr * np.log(10.0)
    theta = np.array([0.1, 0.2, 1e-30, 1e-30, np.exp(log_e), beta, 1e-4, 1e-4])
    log_snr = log10_snr * np.log(10.0)
    log_loss = law.log_loss(theta, {"N": n, "D": d})
    if log10_snr < 0:
        expected = -(np.log(0.1) + 0.2 * np.log(n) + log_snr - np.log(np.log(2.0)))
    else:
        expected = -(np.log(0.1) + 0.2 * np.log(n) + np.log(log_snr / np.log(2.0)))
    assert np.all(np.isfinite(log_loss))
    np.testing.assert_allclose(log_loss, expected, rtol=1e-9)
    np.testing.assert_allclose(law.log_snr(theta, {"N": n, "D": d}), log_snr, rtol=1e-9)


def test_shannon_log_loss_finite_below_float_snr():
    """An SNR below the smallest double (log SNR ≈ -1450 here) still has a finite log-loss (≈ -log SNR)."""
    law = ShannonLaw()
    theta = np.array([0.1, 0.2, 1e30, 1e-30, 1.0, 1e-4, 3.0, 1e-4])
    columns = {"N": np.array([1e100]), "D": np.array([1e100])}
    log_snr = law.log_snr(theta, columns)
    assert log_snr[0] < -745
    np.testing.assert_allclose(
        law.log_loss(theta, columns), -(np.log(0.1) + 0.2 * np.log(1e100) + log_snr - np.log(np.log(2.0)))
    )


def test_shannon_run_is_shannon_at_fixed_n():
    """T9: at fixed N, A = a N^α and c_run = c N^γ fold the model size into the single-run law."""
    rng = np.random.default_rng(9)
    full, run = ShannonLaw(), ShannonRunLaw()
    for _ in range(20):
        theta = np.array([log_uniform(rng, low, high) for low, high in CONSTANT_RANGES["shannon"]])
        a, alpha, c, d, e, beta, gamma, delta = theta
        n = log_uniform(rng, 1e6, 1e12)
        tokens = log_uniform(rng, 1e6, 1e13, ROWS)
        theta_run = np.array([a * n**alpha, c * n**gamma, d, e, beta, gamma, delta])
        np.testing.assert_allclose(
            run.log_loss(theta_run, {"D": tokens}),
            full.log_loss(theta, {"N": np.full_like(tokens, n), "D": tokens}),
            rtol=1e-12,
        )
        assert run.d_star(theta_run) == pytest.approx(full.d_star(theta, n), rel=1e-12)


def test_b_is_redundant():
    """Identifiability (section 2): the law with an explicit signal scale b equals the b = 1 law with c, d
    and e divided by b, so b carries no information of its own; the basin (T10) ignores a common scale of
    c, d, e."""
    rng = np.random.default_rng(2)
    law = ShannonLaw()
    for _ in range(20):
        theta = np.array([log_uniform(rng, low, high) for low, high in CONSTANT_RANGES["shannon"]])
        a, alpha, c, d, e, beta, gamma, delta = theta
        b = log_uniform(rng, 1e-3, 1e3)
        columns = random_inputs(law, rng)
        N, D = columns["N"], columns["D"]
        with_b = 1.0 / (a * N**alpha * log2_1p(b * D**beta / (c * (D * N) ** gamma + d * D**delta + e)))
        scaled = theta.copy()
        scaled[2:5] /= b
        np.testing.assert_allclose(law.loss(scaled, columns), with_b, rtol=RTOL)
        n = N[0]
        assert basin_tokens(c * n**gamma / b, d / b, e / b, beta, gamma, delta) == pytest.approx(
            law.d_star(theta, n), rel=1e-9
        )


def test_power_law_never_has_a_basin():
    law = get_law("power")
    tokens = np.geomspace(1e3, 1e20, 200)
    assert np.all(np.diff(law.loss(np.array([1.5, 300.0, 0.3]), {"D": tokens})) < 0)


@pytest.mark.parametrize("name", ["shannon", "shannon-run"])
def test_analytic_jacobian_matches_central_differences(name):
    """The fitter trusts d log L / d log θ from the law: it must equal central differences of log_loss."""
    law = get_law(name)
    rng = np.random.default_rng(3)
    theta = law.starts(limit=1, seed=4)[0]
    columns = {"N": np.exp(rng.uniform(16, 23, 40)), "D": np.exp(rng.uniform(18, 28, 40))}
    columns = {key: columns[key] for key in law.inputs}
    analytic = law.log_loss_jacobian(theta, columns)
    step = 1e-6
    numeric = np.empty_like(analytic)
    for k in range(len(theta)):
        up, down = np.log(theta), np.log(theta)
        up[k] += step
        down[k] -= step
        numeric[:, k] = (law.log_loss(np.exp(up), columns) - law.log_loss(np.exp(down), columns)) / (2 * step)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max())


def test_laws_declare_what_they_can_do():
    """has_basin and has_jacobian are declared, and a law asked for what it does not declare says so."""
    assert {name for name, law in LAWS.items() if law.has_basin} == {"shannon", "shannon-run"}
    assert {name for name, law in LAWS.items() if law.has_jacobian} == {"shannon", "shannon-run"}
    law = get_law("chinchilla")
    columns = {"N": np.full(3, 1e9), "D": np.full(3, 1e10)}
    with pytest.raises(NotImplementedError, match="chinchilla gives no Jacobian"):
        law.log_loss_jacobian(law.starts(limit=1)[0], columns)
    with pytest.raises(NotImplementedError, match="power has no basin"):
        get_law("power").d_star(np.array([1.5, 300.0, 0.3]))
