"""The prior signal (the loss alone, and a prior that gives every constant of this run): the family's law
carried over to this run (T6–T8 at its N: the exponents and the data and irreducible noise are the family's),
with only this run's scale A and model-data noise c refitted to its points; from its first few points, since
two constants need few. Measured on Pythia (a prior fitted to the other sizes): docs/forecast.md.

Also reads priors (:func:`load_prior`): the output of ``snrmon fit --json`` or a dict of constants."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from snrmon.forecast.decision import SAMPLES, Draws
from snrmon.forecast.law import prior_theta, run_basin
from snrmon.forecast.result import Forecast
from snrmon.laws.equations import ShannonRunLaw

# With a prior that gives every constant, two are refitted (A, c): a forecast from this many points on. A stop
# still waits for min_points (the curve's own slope must be measurable to agree).
PRIOR_MIN_POINTS = 4
PRIOR_DEPARTURE = 100.0  # a refitted c this factor from the family's is noted as a prior that may not fit
RUN_CONSTANTS = ("A", "c", "d", "e", "beta", "gamma", "delta")
SHANNON_CONSTANTS = RUN_CONSTANTS + ("a", "alpha")


class PriorError(ValueError):
    """A prior that cannot be used (another law, unreadable, or no constants)."""


class PriorSignal:
    """D* draws from the prior's law with this run's A and c refitted to its points (least squares on log
    losses), c drawn from the fit's Student-t Laplace approximation (few points: t, not normal)."""

    name = "prior"

    def __init__(self, prior: dict, tokens_per_x: float) -> None:
        self.prior, self.tokens_per_x = prior, tokens_per_x
        self.departure = 1.0  # this run's refitted c over the prior's

    @property
    def departs(self) -> bool:
        """This run's refitted c lies more than PRIOR_DEPARTURE times from the prior's: it may not fit."""
        return not 1 / PRIOR_DEPARTURE <= self.departure <= PRIOR_DEPARTURE

    def draws(self, x: np.ndarray, loss: np.ndarray, rng) -> Draws | None:
        law = ShannonRunLaw()
        scale = x[0]
        columns = {"D": x / scale}
        theta = prior_theta(self.prior, law, scale * self.tokens_per_x)
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
        self.departure = float(np.exp(solution.x[1]) / theta[free[1]])
        dof = max(len(loss) - len(free), 1)
        sigma2 = float(np.sum(solution.fun**2) / dof)
        covariance = sigma2 * np.linalg.pinv(solution.jac.T @ solution.jac)
        covariance = (covariance + covariance.T) / 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            normal = rng.multivariate_normal(np.zeros(len(free)), covariance, size=SAMPLES, method="eigh")
        samples = solution.x + normal / np.sqrt(rng.chisquare(dof, size=(SAMPLES, 1)) / dof)
        curve = (constants(solution.x), np.array([constants(s) for s in samples[: SAMPLES // 4]]), scale)
        d_star = np.array([run_basin(constants(s)) for s in samples])
        return Draws(np.where(np.isnan(d_star), np.inf, d_star) * scale, curve)

    def forecast_alone(self, forecast: Forecast) -> None:
        """Before the data can speak: D* and the loss there from the prior's constants."""
        law = ShannonRunLaw()
        theta = np.array([self.prior[name] for name in law.param_names])
        d_star = run_basin(theta)  # in the prior's tokens
        forecast.method = "prior"
        forecast.d_star = d_star / self.tokens_per_x
        if math.isfinite(d_star):
            at = float(law.loss(theta, {"D": np.array([d_star])})[0])
            forecast.loss_at_d_star = at if math.isfinite(at) else None
            forecast.steps_to_basin = max(forecast.d_star - forecast.x, 0.0)
        forecast.note += "; D* from the prior"


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
    if not values:
        raise PriorError("the prior holds no constants of the Shannon law (beta, gamma, delta, ...)")
    bad = [f"{k} = {v:g}" for k, v in values.items() if not (math.isfinite(v) and v > 0)]
    if bad:
        raise PriorError(f"the Shannon law's constants are positive numbers; the prior has {', '.join(bad)}")
    # The fits keep every constant within the law's bounds; a prior outside them is of another law or unit.
    for param in ShannonRunLaw.params:
        value = values.get(param.name)
        if value is not None and not param.lower <= value <= param.upper:
            raise PriorError(
                f"the prior's {param.name} = {value:g} is outside the law's range ({param.lower:g} to "
                f"{param.upper:g})"
            )
    return values
