"""Scaling laws as small objects: their equation, their constants, and evaluation. No fitting here.

Every law predicts the loss L from named input columns (``N`` parameters, ``D`` tokens, ``bits``) and a
vector ``theta`` of positive constants in the order of :attr:`Law.params`. Evaluation is done in log space
(``log_loss``) because the fitter compares log-losses and because the Shannon law's terms span many decades.
Equation numbers refer to the theory reference (T6–T14); see docs/law.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import qmc

LN2 = np.log(2.0)
Columns = dict[str, np.ndarray]


@dataclass(frozen=True)
class Param:
    """One positive constant: its name, unit, meaning and the bounds a fit may explore."""

    name: str
    unit: str
    meaning: str
    lower: float
    upper: float
    starts: tuple[float, ...]  # the range (smallest to largest) that starting points are drawn from


class Law:
    """A scaling law: ``log_loss(theta, columns)`` for positive constants ``theta``."""

    name: str = ""
    equation: str = ""  # e.g. "T8"
    formula: str = ""
    inputs: tuple[str, ...] = ("N", "D")
    params: tuple[Param, ...] = ()
    single_run: bool = False  # a law of D alone, fitted to one run (one N) at a time
    has_basin: bool = False  # the law can turn up (T10): ``d_star`` gives the loss-minimising D
    has_jacobian: bool = False  # ``log_loss_jacobian`` gives d log L / d log θ in closed form

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array([p.lower for p in self.params]), np.array([p.upper for p in self.params])

    def starts(self, limit: int = 64, seed: int = 0) -> np.ndarray:
        """``limit`` starting points spread (scrambled Sobol, log-uniform) over each constant's start range.

        A low-discrepancy sample covers wide ranges of many constants far better than a product grid of the
        same size, which matters for the Shannon law, whose coefficients span tens of decades.
        """
        low = np.log([min(p.starts) for p in self.params])
        high = np.log([max(p.starts) for p in self.params])
        power_of_two = max(int(np.ceil(np.log2(limit))), 0)
        unit = qmc.Sobol(len(self.params), scramble=True, seed=seed).random_base2(power_of_two)[:limit]
        return np.exp(low + unit * (high - low))

    def log_loss(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        raise NotImplementedError

    def loss(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        return np.exp(self.log_loss(np.asarray(theta, dtype=float), columns))

    def log_loss_jacobian(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        """d log L / d log θ, shape [rows, constants], for laws that declare ``has_jacobian`` (the fitter
        differentiates the others numerically)."""
        raise NotImplementedError(f"{self.name} gives no Jacobian (has_jacobian is False)")

    def d_star(self, theta: np.ndarray, n: float | None = None) -> float:
        """The basin D* (T10) at model size ``n`` (single-run laws: their own run), inf where the loss keeps
        falling; for laws that declare ``has_basin``."""
        raise NotImplementedError(f"{self.name} has no basin (has_basin is False)")

    def as_dict(self, theta: np.ndarray) -> dict[str, float]:
        return {name: float(value) for name, value in zip(self.param_names, theta, strict=True)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.formula})"


def _log_sum_exp(*logs: np.ndarray) -> np.ndarray:
    return np.logaddexp.reduce(np.broadcast_arrays(*logs), axis=0)


def _log_capacity_bits(log_snr: np.ndarray) -> np.ndarray:
    """log(log2(1 + SNR)) from log SNR, stable for tiny and huge SNR."""
    # log(1 + SNR) → SNR for tiny SNR: use log SNR itself there, where logaddexp would underflow to 0.
    with np.errstate(divide="ignore"):
        log_natural = np.where(log_snr < -30, log_snr, np.log(np.logaddexp(0.0, log_snr)))
    return log_natural - np.log(LN2)


def _capacity_jacobian(log_snr: np.ndarray, snr_derivatives: list[np.ndarray]) -> np.ndarray:
    """d log L / d log θ for L = 1 / (scale · log2(1 + SNR)), given d log SNR / d log θ per constant.

    d log(log(1 + SNR)) / d log SNR = sigmoid(log SNR) / softplus(log SNR), which tends to 1 for tiny SNR.
    """
    softplus = np.logaddexp(0.0, log_snr)
    with np.errstate(all="ignore"):
        sensitivity = np.where(log_snr < -30, 1.0, np.exp(log_snr - softplus) / softplus)
    return -sensitivity[:, None] * np.stack(snr_derivatives, axis=1)


def _noise_shares(terms: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """log of the summed noise terms (given as logs), and each term's share of the sum."""
    stacked = np.stack(np.broadcast_arrays(*terms))
    log_noise = np.logaddexp.reduce(stacked, axis=0)
    return log_noise, np.exp(stacked - log_noise)


# Bounds shared by the laws: exponents in (0, 3], coefficients over many decades.
def _exponent(name: str, meaning: str, starts=(0.05, 1.0)) -> Param:
    return Param(name, "1", meaning, 1e-4, 3.0, starts)


def _coefficient(name: str, unit: str, meaning: str, starts=(1e-3, 1e3)) -> Param:
    return Param(name, unit, meaning, 1e-30, 1e30, starts)


class ShannonLaw(Law):
    """The Shannon scaling law (T6–T8) with the redundant b fixed to 1 (scaling b, c, d, e together leaves
    SNR unchanged, so only their ratios are identifiable):

        L(N, D) = 1 / (a · N^α · log2(1 + D^β / (c·(D·N)^γ + d·D^δ + e)))
    """

    name = "shannon"
    equation = "T6–T8"
    formula = "1 / (a N^alpha log2(1 + D^beta / (c (D N)^gamma + d D^delta + e)))"
    has_basin = True
    has_jacobian = True
    params = (
        _coefficient("a", "loss^-1 · N^-alpha", "bandwidth scale of the capacity", (1e-6, 1.0)),
        _exponent("alpha", "how capacity grows with parameters N", (0.01, 1.0)),
        _coefficient("c", "D^(beta-gamma) N^-gamma", "model-data noise (the D·N cross-term)", (1e-20, 1.0)),
        _coefficient("d", "D^(beta-delta)", "data noise", (1e-8, 1e4)),
        _coefficient("e", "D^beta", "irreducible noise", (1e-3, 1e8)),
        _exponent("beta", "signal power exponent of D"),
        _exponent("gamma", "exponent of the D·N cross-term"),
        _exponent("delta", "exponent of the data-noise term"),
    )

    def log_snr(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        """log SNR(N, D) of T7 (b = 1)."""
        a, alpha, c, d, e, beta, gamma, delta = theta
        log_n, log_d = np.log(columns["N"]), np.log(columns["D"])
        noise = _log_sum_exp(np.log(c) + gamma * (log_d + log_n), np.log(d) + delta * log_d, np.log(e))
        return beta * log_d - noise

    def log_loss(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        a, alpha = theta[0], theta[1]
        log_capacity = (
            np.log(a) + alpha * np.log(columns["N"]) + _log_capacity_bits(self.log_snr(theta, columns))
        )
        return -log_capacity

    def log_loss_jacobian(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        a, alpha, c, d, e, beta, gamma, delta = theta
        log_n, log_d = np.log(columns["N"]), np.log(columns["D"])
        log_dn = log_d + log_n
        log_noise, (share_c, share_d, share_e) = _noise_shares(
            [np.log(c) + gamma * log_dn, np.log(d) + delta * log_d, np.full_like(log_d, np.log(e))]
        )
        zero = np.zeros_like(log_d)
        snr_derivatives = [
            zero, zero, -share_c, -share_d, -share_e, beta * log_d, -share_c * gamma * log_dn,
            -share_d * delta * log_d,
        ]  # fmt: skip
        jacobian = _capacity_jacobian(beta * log_d - log_noise, snr_derivatives)
        jacobian[:, 0] = -1.0
        jacobian[:, 1] = -alpha * log_n
        return jacobian

    def d_star(self, theta: np.ndarray, n: float) -> float:
        """Loss-minimising token count D* at model size N (T10); ``inf`` when the curve never turns up."""
        from snrmon.laws.basin import basin_tokens

        a, alpha, c, d, e, beta, gamma, delta = theta
        return basin_tokens(c * n**gamma, d, e, beta, gamma, delta)


class ShannonRunLaw(Law):
    """The Shannon law at fixed N (T9), one training run: N^α and N^γ fold into A and c.

    L(D) = 1 / (A · log2(1 + D^β / (c·D^γ + d·D^δ + e)))
    """

    name = "shannon-run"
    equation = "T9"
    formula = "1 / (A log2(1 + D^beta / (c D^gamma + d D^delta + e)))"
    inputs = ("D",)
    single_run = True
    has_basin = True
    has_jacobian = True
    params = (
        _coefficient("A", "loss^-1", "capacity scale of this run", (1e-4, 1.0)),
        _coefficient("c", "D^(beta-gamma)", "model-data noise at this N", (1e-12, 1e2)),
        _coefficient("d", "D^(beta-delta)", "data noise", (1e-8, 1e4)),
        _coefficient("e", "D^beta", "irreducible noise", (1e-3, 1e8)),
        _exponent("beta", "signal power exponent of D"),
        _exponent("gamma", "exponent of the model-data term"),
        _exponent("delta", "exponent of the data-noise term"),
    )

    # T9 is T6–T8 at N = 1 with a = A (N^α = 1, so α drops out): evaluate it through ShannonLaw.
    def _as_shannon(self, theta: np.ndarray, columns: Columns) -> tuple[np.ndarray, Columns]:
        big_a, c, d, e, beta, gamma, delta = theta
        return np.array([big_a, 1.0, c, d, e, beta, gamma, delta]), {
            "N": np.ones_like(columns["D"]),
            "D": columns["D"],
        }

    def log_loss(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        return ShannonLaw().log_loss(*self._as_shannon(theta, columns))

    def log_loss_jacobian(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        return np.delete(ShannonLaw().log_loss_jacobian(*self._as_shannon(theta, columns)), 1, axis=1)

    def d_star(self, theta: np.ndarray, n: float | None = None) -> float:
        """Loss-minimising D of this run (T10 with the c-term already holding N^γ)."""
        return ShannonLaw().d_star(self._as_shannon(theta, {"D": np.ones(1)})[0], 1.0)


class ChinchillaLaw(Law):
    """Hoffmann et al. 2022 (T11): L = E + A/N^α + B/D^β."""

    name = "chinchilla"
    equation = "T11"
    formula = "E + A / N^alpha + B / D^beta"
    params = (
        Param("E", "loss", "irreducible loss", 1e-3, 20.0, (0.1, 5.0)),
        _coefficient("A", "loss · N^alpha", "parameter term scale", (1.0, 1e5)),
        _exponent("alpha", "parameter exponent"),
        _coefficient("B", "loss · D^beta", "data term scale", (1.0, 1e5)),
        _exponent("beta", "data exponent"),
    )

    def log_loss(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        big_e, big_a, alpha, big_b, beta = theta
        return _log_sum_exp(
            np.log(big_e),
            np.log(big_a) - alpha * np.log(columns["N"]),
            np.log(big_b) - beta * np.log(columns["D"]),
        )


class KaplanLaw(Law):
    """Kaplan et al. 2020 (T12): L = ((N_c/N)^(α_N/α_D) + D_c/D)^α_D."""

    name = "kaplan"
    equation = "T12"
    formula = "((N_c / N)^(alpha_N / alpha_D) + D_c / D)^alpha_D"
    params = (
        Param("N_c", "parameters", "critical model size", 1e3, 1e20, (1e6, 1e16)),
        Param("D_c", "tokens", "critical data size", 1e3, 1e20, (1e6, 1e16)),
        _exponent("alpha_N", "parameter exponent", (0.01, 1.0)),
        _exponent("alpha_D", "data exponent", (0.01, 1.0)),
    )

    def log_loss(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        n_c, d_c, alpha_n, alpha_d = theta
        inner = _log_sum_exp(
            (alpha_n / alpha_d) * (np.log(n_c) - np.log(columns["N"])), np.log(d_c) - np.log(columns["D"])
        )
        return alpha_d * inner


class PowerLaw(Law):
    """The monotone single-run baseline: L(D) = E + B/D^β (T11 at fixed N). It never predicts a basin."""

    name = "power"
    equation = "T11 at fixed N"
    formula = "E + B / D^beta"
    inputs = ("D",)
    single_run = True
    params = (
        Param("E", "loss", "loss as D → ∞", 1e-3, 20.0, (0.1, 5.0)),
        _coefficient("B", "loss · D^beta", "data term scale", (1.0, 1e5)),
        _exponent("beta", "data exponent"),
    )

    def log_loss(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        big_e, big_b, beta = theta
        return _log_sum_exp(np.log(big_e), np.log(big_b) - beta * np.log(columns["D"]))


class KumarLaw(Law):
    """Kumar et al. 2024 precision law (T13), post-training quantization to ``bits``:

        L = A/N^α + B/D^β + E + C_T · (D^γ_D / N^γ_N) · exp(−bits / γ_post)

    Training precision is not modelled (N_eff = N): rows are quantized after training.
    """

    name = "kumar"
    equation = "T13"
    formula = "A / N^alpha + B / D^beta + E + C_T D^gamma_D / N^gamma_N exp(-bits / gamma_post)"
    inputs = ("N", "D", "bits")
    params = ChinchillaLaw.params + (
        _coefficient("C_T", "loss", "post-training-quantization degradation scale", (1e-4, 1e2)),
        _exponent("gamma_D", "degradation growth with D"),
        _exponent("gamma_N", "degradation decay with N"),
        Param("gamma_post", "bits", "bit scale of the degradation", 1e-2, 1e2, (0.3, 5.0)),
    )

    def log_loss(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        c_t, gamma_d, gamma_n, gamma_post = theta[5:]
        log_n, log_d = np.log(columns["N"]), np.log(columns["D"])
        degradation = np.log(c_t) + gamma_d * log_d - gamma_n * log_n - columns["bits"] / gamma_post
        return _log_sum_exp(ChinchillaLaw().log_loss(theta[:5], columns), degradation)


class QiDLaw(Law):
    """Quantization-induced degradation (Ouyang et al. 2024, T14) on top of Chinchilla (our composition):

    L = E + A/N^α + B/D^β + k · D^β_q / (N^α_q · bits^γ_q)
    """

    name = "qid"
    equation = "T11 + T14"
    formula = "E + A / N^alpha + B / D^beta + k D^beta_q / (N^alpha_q bits^gamma_q)"
    inputs = ("N", "D", "bits")
    params = ChinchillaLaw.params + (
        _coefficient("k", "loss", "degradation scale", (1e-4, 1e2)),
        _exponent("alpha_q", "degradation decay with N"),
        _exponent("beta_q", "degradation growth with D"),
        _exponent("gamma_q", "degradation decay with bits", (0.3, 2.5)),
    )

    def log_loss(self, theta: np.ndarray, columns: Columns) -> np.ndarray:
        k, alpha_q, beta_q, gamma_q = theta[5:]
        degradation = (
            np.log(k)
            + beta_q * np.log(columns["D"])
            - alpha_q * np.log(columns["N"])
            - gamma_q * np.log(columns["bits"])
        )
        return _log_sum_exp(ChinchillaLaw().log_loss(theta[:5], columns), degradation)


LAWS: dict[str, Law] = {
    law.name: law
    for law in (ShannonLaw(), ShannonRunLaw(), ChinchillaLaw(), KaplanLaw(), KumarLaw(), QiDLaw(), PowerLaw())
}


def get_law(name: str) -> Law:
    """The law called ``name`` (see :data:`LAWS`)."""
    try:
        return LAWS[name]
    except KeyError:
        raise ValueError(f"unknown law {name!r}; choose from {', '.join(LAWS)}") from None
