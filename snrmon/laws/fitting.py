"""Fitting any law of :mod:`snrmon.laws` to observed losses: robust, multi-start, bootstrap intervals.

The default follows Hoffmann et al. (2022) and Besiroglu et al. (2024): minimise a Huber loss (δ = 1e-3)
of the log-loss residuals log L̂ − log L over the log of the constants (so every constant stays positive),
from a grid of starting points. ``robust=False`` gives plain nonlinear least squares on the loss itself,
the method the Shannon law's paper reports. Scores (R², RMSE) are computed on the loss, not its log.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from snrmon.laws.equations import Columns, Law

EXPLORE_ROWS = 256  # rows used to explore the starting points of a large data set
EXPLORE_HUBER_DELTA = 0.05  # the smoother objective explored before polishing a robust fit
# Large data sets: only the final polish of the best start sees every row; choosing between the explored
# starts and each bootstrap resample use at most this many rows, so their cost does not grow with the data.
SUBSAMPLE_ROWS = 4096
BOUND_TOLERANCE = 1e-3  # a constant within 0.1% of a bound has ended at it
ROUNDING = 1e-9  # an estimate this close (relatively) to its bootstrap interval lies within it
MIN_SPARE_ROWS = 5  # fewer rows beyond the constants than max(this, the constants): almost no freedom left
MIN_RESAMPLES_TO_JUDGE = 20  # fewer resamples give percentile intervals too rough to judge


class FitError(ValueError):
    """A fit that cannot give trustworthy constants; the message says why."""


@dataclass
class Fit:
    """A fitted law: constants, their bootstrap intervals and in-sample scores."""

    law: Law
    theta: np.ndarray
    r2_train: float
    rmse_train: float
    n_train: int
    cost: float
    params_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # reasons to distrust the constants (see fit_law)

    @property
    def params(self) -> dict[str, float]:
        return self.law.as_dict(self.theta)

    def predict(self, columns: Columns) -> np.ndarray:
        return self.law.loss(self.theta, columns)

    def score(self, columns: Columns, loss: np.ndarray) -> dict[str, float]:
        """R², RMSE and row count of this fit on other rows (e.g. a held-out split)."""
        predicted = self.predict(columns)
        return {"r2": r2_score(loss, predicted), "rmse": rmse(loss, predicted), "n": len(loss)}


def r2_score(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination 1 − SS_res / SS_tot (negative when worse than the mean)."""
    observed, predicted = np.asarray(observed, float), np.asarray(predicted, float)
    total = np.sum((observed - observed.mean()) ** 2)
    return float(1.0 - np.sum((observed - predicted) ** 2) / total) if total > 0 else float("nan")


def rmse(observed: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(observed, float) - np.asarray(predicted, float)) ** 2)))


def fit_law(
    law: Law,
    columns: Columns,
    loss: np.ndarray,
    *,
    robust: bool = True,
    huber_delta: float = 1e-3,
    starts: int = 256,
    refine: int = 8,
    bootstrap: int = 0,
    seed: int = 0,
    theta0: np.ndarray | None = None,
    progress: str | None = None,
) -> Fit:
    """Fit ``law`` to rows (``columns``, ``loss``).

    Args:
        robust: Huber loss on log residuals (default); ``False``: plain least squares on the loss.
        huber_delta: the Huber threshold, in log-loss units.
        starts: size of the grid of starting points, screened by their initial cost.
        refine: how many of the best-screened starts are optimised (on at most ``EXPLORE_ROWS`` rows); the two
            best of those are then polished on all rows (beyond ``SUBSAMPLE_ROWS`` rows: on that many rows,
            and only the better one on all rows).
        bootstrap: number of row resamples for the 95% intervals in ``params_ci`` (0: none). Beyond
            ``SUBSAMPLE_ROWS`` rows each resample draws that many rows and its spread is scaled down to the
            full row count (see ``_bootstrap``).
        seed: seeds the grid subsampling and the bootstrap.
        theta0: an extra starting point (natural units), e.g. a previous fit; with ``starts=0`` the fit
            only polishes it (the fast path for refitting a growing curve).
        progress: a label: show a progress bar with it on stderr (tqdm); ``None``: no bar.

    The returned fit's ``warnings`` say when its constants deserve little trust: a constant at its bound,
    almost no rows beyond the number of constants, a bootstrap interval that excludes its own estimate.

    Raises:
        FitError: too few rows, non-positive values, or no start that reaches finite constants.
    """
    columns = {name: np.asarray(columns[name], dtype=float) for name in law.inputs}
    loss = np.asarray(loss, dtype=float)
    _check_rows(law, columns, loss)
    problem = _Problem(law, columns, loss, robust, huber_delta)

    candidates = law.starts(limit=starts, seed=seed) if starts else np.empty((0, len(law.params)))
    if theta0 is not None:
        candidates = np.vstack([np.asarray(theta0, float)[None], candidates])
    if not len(candidates):
        raise ValueError("give starting points: starts > 0 or theta0")
    log_starts = np.clip(np.log(candidates), problem.lower + 1e-9, problem.upper - 1e-9)
    if len(candidates) == 1:  # a warm start (e.g. the previous fit of a growing curve): polish it only
        with _Progress(progress, 1 + bootstrap) as bar:
            best = problem.solve(log_starts[0])
            bar.update()
            return _finish(problem, best, bootstrap, seed, bar)
    # Explore on a subsample of rows (the optimum moves little, the cost drops with the row count), then
    # polish the two best explorations on every row.
    rng = np.random.default_rng(seed)
    explore_rows = (
        rng.choice(len(loss), EXPLORE_ROWS, replace=False) if len(loss) > EXPLORE_ROWS else slice(None)
    )
    # A near-L1 Huber loss (tiny delta) makes a rugged landscape: explore a smoother one (a larger delta),
    # then polish on the real objective.
    smoother = max(huber_delta, EXPLORE_HUBER_DELTA)
    explorer = _Problem(law, columns, loss, robust, smoother) if robust else problem
    screened = np.array([explorer.cost(x, explore_rows) for x in log_starts])
    if not np.isfinite(screened).any():
        raise FitError(f"{law.name}: the law is not finite at any starting point for these data")
    # The initial cost is a poor guide in a landscape this rugged: take a few cheap steps from many
    # promising starts, then optimise the best of those fully.
    promising = [i for i in np.argsort(screened)[: 4 * refine] if np.isfinite(screened[i])]
    large = len(loss) > SUBSAMPLE_ROWS
    with _Progress(progress, len(promising) + refine + 2 + large + bootstrap) as bar:
        stepped = []
        for i in promising:
            stepped.append(explorer.solve(log_starts[i], explore_rows, tolerance=1e-3, max_steps=10))
            bar.update()
        stepped = sorted((r for r in stepped if np.isfinite(r.cost)), key=lambda r: r.cost)[:refine]
        explored = []
        for r in stepped:
            explored.append(explorer.solve(r.x, explore_rows, tolerance=1e-5))
            bar.update()
        bar.update(refine - len(stepped))
        explored = sorted((r for r in explored if np.isfinite(r.cost)), key=lambda r: r.cost)[:2]
        if large:
            # Polishing on every row costs time in proportion to the rows: pick the better exploration on a
            # bounded subsample, then bring it near the optimum on subsamples 8x larger each time, so that
            # the final polish on every row needs few steps.
            rows = rng.choice(len(loss), SUBSAMPLE_ROWS, replace=False)
            explored = [problem.solve(r.x, rows) for r in explored]
            explored = sorted((r for r in explored if np.isfinite(r.cost)), key=lambda r: r.cost)[:1]
            size = 8 * SUBSAMPLE_ROWS
            while explored and size < len(loss):
                explored = [problem.solve(explored[0].x, rng.choice(len(loss), size, replace=False))]
                size *= 8
            bar.update()
        polished = []
        for r in explored:
            polished.append(problem.polish(r.x))
            bar.update()
        bar.update(2 - len(explored))
        best = min((r for r in polished if np.isfinite(r.cost)), key=lambda r: r.cost, default=None)
        if best is None:
            raise FitError(f"{law.name}: no start converged to finite constants")
        return _finish(problem, best, bootstrap, seed, bar)


def _finish(problem: _Problem, best, bootstrap: int, seed: int, bar: _Progress) -> Fit:
    # The optimiser saw non-finite residuals replaced by large numbers; judge the result on the real ones.
    if not np.all(np.isfinite(best.x)) or not np.isfinite(problem.cost(best.x)):
        raise FitError(f"{problem.law.name}: no start converged to finite constants")
    theta = np.exp(best.x)
    predicted = problem.law.loss(theta, problem.columns)
    loss = problem.loss
    fit = Fit(
        problem.law, theta, r2_score(loss, predicted), rmse(loss, predicted), len(loss), float(best.cost)
    )
    if bootstrap:
        fit.params_ci = _bootstrap(problem, best.x, bootstrap, seed, bar)
    fit.warnings = _warnings(problem, fit, bootstrap)
    return fit


def _warnings(problem: _Problem, fit: Fit, resamples: int) -> list[str]:
    """Reasons not to trust ``fit``'s constants, one sentence each (the law's name is left to the caller)."""
    law, warnings = fit.law, []
    log_theta = np.log(fit.theta)
    at_bound = set()
    for i, param in enumerate(law.params):
        # A constant pressed against its bound is where the search stopped, not where the data put it.
        at_lower = log_theta[i] - problem.lower[i] < BOUND_TOLERANCE
        at_upper = problem.upper[i] - log_theta[i] < BOUND_TOLERANCE
        if at_lower or at_upper:
            at_bound.add(param.name)
            side, bound = ("lower", param.lower) if at_lower else ("upper", param.upper)
            warnings.append(
                f"{param.name} = {fit.theta[i]:.4g} ended at its {side} bound {bound:.4g}: the best fit lies "
                "at or past the range the fitter allows, so the constants mean little"
            )
    constants, rows = len(law.params), fit.n_train
    spare = rows - constants
    if spare < max(constants, MIN_SPARE_ROWS):
        warnings.append(
            f"{rows} rows for {constants} constants ({spare} degree{'s' if spare != 1 else ''} of freedom): "
            f"a close fit (R² {fit.r2_train:.4f}) says little; fit more rows or a law with fewer constants"
        )
    few_rows = _few_rows_set_r2(problem, fit)
    if few_rows:
        warnings.append(few_rows)
    if resamples >= MIN_RESAMPLES_TO_JUDGE:
        for name, (low, high) in fit.params_ci.items():
            value = fit.params[name]
            # (A constant at its bound is said above: its resampled fits stop there too, a rounding apart.)
            if name not in at_bound and not low * (1 - ROUNDING) <= value <= high * (1 + ROUNDING):
                warnings.append(
                    f"the 95% bootstrap interval of {name}, [{low:.4g}, {high:.4g}], excludes its estimate "
                    f"{value:.4g}: fits to resampled rows settle elsewhere, so the optimum is unstable"
                )
    return warnings


def _few_rows_set_r2(problem: _Problem, fit: Fit) -> str | None:
    """Why a low R² may say little of the fit: it is taken on the loss itself, where a few rows far off (the
    first steep points of a curve, outliers a robust fit gives little weight) can carry most of the error."""
    if not fit.r2_train < 0.5 or len(problem.loss) < 5:
        return None
    predicted = fit.law.loss(fit.theta, problem.columns)
    squared = (problem.loss - predicted) ** 2
    order = np.argsort(squared)[::-1]
    few = int(np.searchsorted(np.cumsum(squared[order]), 0.5 * squared.sum(), side="right")) + 1
    if few > max(1, len(squared) // 10):  # (the rows that carry more than half of the squared error)
        return None
    worst = order[:few]
    share = float(squared[worst].sum() / squared.sum())
    rest = np.setdiff1d(np.arange(len(squared)), worst)
    how = "the robust fit on log L gives them little weight" if problem.robust else "they are far off the law"
    return (
        f"R² {fit.r2_train:.3g} (on the loss itself) is set by {few} of {len(squared)} rows, which carry "
        f"{share:.0%} of the squared error ({how}): on the other rows R² is "
        f"{r2_score(problem.loss[rest], predicted[rest]):.3g}"
    )


class _Progress:
    """A tqdm progress bar on stderr counting solver runs, or nothing when ``label`` is None."""

    def __init__(self, label: str | None, total: int):
        self.bar = None
        if label is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="solve", file=sys.stderr, leave=False)

    def update(self, steps: int = 1) -> None:
        if self.bar is not None and steps > 0:
            self.bar.update(steps)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exception) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_rows(law: Law, columns: Columns, loss: np.ndarray) -> None:
    n_params = len(law.params)
    lengths = {name: len(values) for name, values in {**columns, "loss": loss}.items()}
    if len(set(lengths.values())) > 1:
        raise FitError(f"{law.name}: columns have different lengths {lengths}")
    if len(loss) < n_params:
        raise FitError(f"{law.name}: {len(loss)} rows cannot determine {n_params} constants")
    for name, values in {**columns, "loss": loss}.items():
        if not np.all(np.isfinite(values)):
            raise FitError(f"{law.name}: column {name!r} has non-finite values")
        if np.any(values <= 0):
            raise FitError(f"{law.name}: column {name!r} must be positive")


class _Problem:
    """The residuals of one law on one data set, as a function of log(theta)."""

    def __init__(self, law: Law, columns: Columns, loss: np.ndarray, robust: bool, huber_delta: float):
        self.law, self.columns, self.loss = law, columns, loss
        self.robust, self.huber_delta = robust, huber_delta
        self.lower, self.upper = (np.log(bound) for bound in law.bounds)
        self.log_observed = np.log(loss)

    def residuals(self, log_theta: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        columns = {name: values[rows] for name, values in self.columns.items()}
        with np.errstate(all="ignore"):
            log_predicted = self.law.log_loss(np.exp(log_theta), columns)
            if self.robust:
                return log_predicted - self.log_observed[rows]
            return np.exp(log_predicted) - self.loss[rows]

    def cost(self, log_theta: np.ndarray, rows: np.ndarray | slice = slice(None)) -> float:
        residuals = self.residuals(log_theta, rows)
        if self.robust:
            scaled = np.abs(residuals) / self.huber_delta
            value = np.where(scaled <= 1, scaled**2, 2 * scaled - 1).sum() * self.huber_delta**2 / 2
        else:
            value = 0.5 * np.sum(residuals**2)
        return float(value) if np.isfinite(value) else np.inf

    def jacobian(self, rows: np.ndarray | slice):
        """The residuals' Jacobian in log θ where the law gives d log L / d log θ, else finite differences."""
        columns = {name: values[rows] for name, values in self.columns.items()}
        if not self.law.has_jacobian:
            return "2-point"

        def jacobian(log_theta: np.ndarray) -> np.ndarray:
            theta = np.exp(log_theta)
            with np.errstate(all="ignore"):
                d_log_loss = self.law.log_loss_jacobian(theta, columns)
                if not self.robust:  # residual L̂ − L: d L̂ = L̂ · d log L̂
                    d_log_loss = d_log_loss * self.law.loss(theta, columns)[:, None]
            return np.nan_to_num(d_log_loss, nan=0.0, posinf=1e6, neginf=-1e6)

        return jacobian

    def polish(self, log_start: np.ndarray):
        """Optimise on every row until a restart no longer helps: least squares stops on small relative
        steps, which in a long curved valley (the Shannon law's) can be short of the bottom."""
        best = self.solve(log_start)
        for _ in range(2):
            again = self.solve(best.x)
            if not again.cost < best.cost * (1 - 1e-9):
                break
            best = again
        return best

    def solve(
        self,
        log_start: np.ndarray,
        rows: np.ndarray | slice = slice(None),
        tolerance: float = 1e-6,
        max_steps: int = 200,
    ):
        return least_squares(
            lambda x: np.nan_to_num(self.residuals(x, rows), nan=1e6, posinf=1e6, neginf=-1e6),
            log_start,
            jac=self.jacobian(rows),
            bounds=(self.lower, self.upper),
            loss="huber" if self.robust else "linear",
            f_scale=self.huber_delta if self.robust else 1.0,
            method="trf",
            ftol=tolerance,
            xtol=tolerance,
            max_nfev=max_steps * len(log_start),
        )


def _bootstrap(
    problem: _Problem, log_theta: np.ndarray, resamples: int, seed: int, bar: _Progress
) -> dict[str, tuple]:
    """95% percentile intervals of each constant over fits to rows resampled with replacement.

    With n > ``SUBSAMPLE_ROWS`` rows, each resample draws m = ``SUBSAMPLE_ROWS`` rows (the m-out-of-n
    bootstrap) and its deviation from the estimate, in log constants, is scaled by sqrt(m / n): an
    estimate's spread shrinks as 1 / sqrt(rows), so the intervals are those of n rows at the cost of m.
    """
    rng = np.random.default_rng(seed)
    n = len(problem.loss)
    m = min(n, SUBSAMPLE_ROWS)
    scale = math.sqrt(m / n)
    samples = []
    for _ in range(resamples):
        result = problem.solve(log_theta, rows=rng.integers(0, n, m))
        if np.all(np.isfinite(result.x)):
            samples.append(np.exp(log_theta + scale * (result.x - log_theta)) if m < n else np.exp(result.x))
        bar.update()
    if not samples:
        return {}
    low, high = np.percentile(np.array(samples), [2.5, 97.5], axis=0)
    return {
        name: (float(lo), float(hi)) for name, lo, hi in zip(problem.law.param_names, low, high, strict=True)
    }
