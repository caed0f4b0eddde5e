"""Replaying the recorded curves, validation by validation, through the forecaster and the baselines.

Each method maps a Curve to an Outcome (its first warning and its stop): the forecaster behind
``BasinEarlyStopping``, patience early stopping, the monotone power-law fit (METHODS); the capacity
candidates built from the recorded gradient statistics; and the forecaster watching the perturbation probe
curves.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import numpy as np
from eval_record import Curve


@dataclass
class Outcome:
    warning: float | None  # x of the first warning (None: never)
    stop: float | None  # x of the stop (None: ran to the end)


def run_forecaster(curve: Curve, **options) -> Outcome:
    from snrmon.forecast import BasinForecaster

    return replay_outcome(BasinForecaster(**options), curve)


def replay_outcome(forecaster, curve: Curve) -> Outcome:
    """Feed ``curve`` to ``forecaster`` point by point: its first warning and its stop (a stop warns too)."""
    warning = None
    for x, val, train in zip(curve.x, curve.val, curve.train or [None] * len(curve.x), strict=True):
        forecast = forecaster.update(x, val, train)
        if forecast.warning and warning is None:
            warning = x
        if forecast.stop:
            return Outcome(warning if warning is not None else x, x)
    return Outcome(warning, None)


def run_patience(curve: Curve, patience: int, values=None) -> Outcome:
    """Lightning's EarlyStopping (mode min, min_delta 0) on the validation loss (or on ``values``, one per
    validation): stop after ``patience`` validations without a new best."""
    best, waited = math.inf, 0
    for x, val in zip(curve.x, curve.val if values is None else values, strict=True):
        if val < best:
            best, waited = val, 0
        else:
            waited += 1
            if waited >= patience:
                return Outcome(x, x)
    return Outcome(None, None)


def run_power(curve: Curve, min_points: int = 10, run_length: int = 3) -> Outcome:
    """The monotone baseline: fit L = E + B/x^β to the curve so far; stop when its last ``run_length``
    points all lie above the fit by more than two robust standard deviations of the residuals."""
    from snrmon.laws import PowerLaw
    from snrmon.laws.fitting import FitError, fit_law

    law, theta = PowerLaw(), None
    x, val = np.asarray(curve.x), np.asarray(curve.val)
    for n in range(min_points, len(x) + 1):
        columns = {"D": x[:n] / x[0]}
        try:
            fit = fit_law(law, columns, val[:n], starts=16 if theta is None else 0, refine=2, theta0=theta)
        except FitError:
            continue
        theta = fit.theta
        residuals = np.log(val[:n]) - law.log_loss(theta, columns)
        sigma = 1.4826 * np.median(np.abs(residuals - np.median(residuals))) + 1e-12
        if np.all(residuals[-run_length:] > 2 * sigma):
            return Outcome(x[n - 1], x[n - 1])
    return Outcome(None, None)


METHODS = {
    "forecaster": lambda curve: run_forecaster(curve),
    "law (T9 only)": lambda curve: run_forecaster(curve, method="law"),
    "power law": run_power,
    "patience 3": lambda curve: run_patience(curve, 3),
    "patience 5": lambda curve: run_patience(curve, 5),
}


# ----------------------------------------------------------------------------------------------------------
# The capacity term (T6) from the recorded gradient statistics: candidate mappings, judged by the forecast
# (docs/theory.md, "The capacity term"; docs/forecast.md, "The capacity term, measured")


def capacity_series(curve: Curve, smooth: int = 1) -> dict[str, np.ndarray]:
    """At each validation, the two candidate capacities of snrmon.forecast.capacity: ``"cumulative"``,
    log2(1 + Σ η|G|² / Σ η² tr(Σ)/B), and ``"dataset"``, log2(1 + N|G|²/tr(Σ)) (NaN with fresh samples).
    ``smooth``: |G|² and tr Σ averaged over the last this many measurements (the monitor smooths with an EMA
    of the steps; here each validation has 8 micro-batches of its own)."""
    from snrmon.forecast.capacity import CapacityMeter

    stats = curve.stats
    meter = CapacityMeter(stats["n_train"])
    cumulative, dataset, previous = [], [], 0.0
    signals, noises = np.asarray(stats["signal"]), np.asarray(stats["noise"])
    for i, x in enumerate(curve.x):
        first = max(i + 1 - smooth, 0)
        signal, noise = signals[first : i + 1].mean(), noises[first : i + 1].mean()
        terms = meter.update(x - previous, signal, noise, stats["lr"], stats["batch"])
        previous = x
        cumulative.append(terms.capacity if terms else math.nan)
        dataset.append(terms.dataset_capacity if terms else math.nan)
    return {"cumulative": np.asarray(cumulative), "dataset": np.asarray(dataset)}


def _capacity_forecaster(series: np.ndarray, signal: str, combine: str, **options):
    """The forecaster behind BasinEarlyStopping with a capacity candidate's draws of D* in place of its
    ratio draws (``combine="replace"``), or joined to them: the earlier (``"either"``) or the later
    (``"both"``) of the two draws. Everything else (evidence, the rise rule, the decisions) is unchanged.

    ``signal="peak"``: the basin is where the capacity peaks (T8: L = 1/(A·C) is lowest where C is highest),
    the zero crossing of the trend of its local slope against log x. ``signal="one-bit"``: where it falls
    to one bit (dataset SNR 1, the signal beyond chance gone), the zero crossing of the trend of C − 1."""
    from snrmon.forecast import BasinForecaster
    from snrmon.forecast.curve import slope as _slope
    from snrmon.forecast.ratio import zero_crossing_draws as _zero_crossing_draws

    class CapacityCandidate(BasinForecaster):
        def _capacity_draws(self, x: np.ndarray, rng) -> np.ndarray:
            w = self.window
            c = series[: len(x)]
            if signal == "peak":
                u = np.log(x[w - 1 :])
                ends = range(w, len(x) + 1)
                values = np.array([_slope(np.log(x[e - w : e]), c[e - w : e])[0] for e in ends])
            else:
                u, values = np.log(x), c - 1.0
            keep = np.isfinite(values)
            u, values = u[keep][-w:], values[keep][-w:]
            if len(values) < 3:
                return np.full(100, np.inf)  # no finite training set (fresh samples): no basin from it
            return _zero_crossing_draws(u, values, rng)

        def _ratio_draws(self, x, loss, train, rng):
            capacity = self._capacity_draws(x, rng)
            if combine == "replace":
                return capacity
            ratio = super()._ratio_draws(x, loss, train, rng)
            if ratio is None:
                return None
            capacity = rng.choice(capacity, size=len(ratio))  # pair the draws at random
            return np.minimum(ratio, capacity) if combine == "either" else np.maximum(ratio, capacity)

    return CapacityCandidate(**options)


CAPACITY_CANDIDATES = {
    f"{name} {signal} ({combine})": (name, signal, combine)
    for name, signal in (("cumulative", "peak"), ("dataset", "peak"), ("dataset", "one-bit"))
    for combine in ("replace", "either", "both")
}


def run_capacity(curve: Curve, name: str, signal: str, combine: str, smooth: int = 1) -> Outcome:
    series = capacity_series(curve, smooth)[name]
    return replay_outcome(_capacity_forecaster(series, signal, combine), curve)


def capacity_methods(smooth: int = 1) -> dict:
    methods = {"forecaster": METHODS["forecaster"]}
    for label_, args in CAPACITY_CANDIDATES.items():
        methods[label_] = lambda curve, args=args: run_capacity(curve, *args, smooth=smooth)
    return methods


# ----------------------------------------------------------------------------------------------------------
# Perturbation probes as the forecaster's curve (docs/forecast.md, "Perturbation probes")

#: The recorded probe curves, and the control: the same validation batches, unperturbed.
PROBE_LABELS = {"gaussian_10db": "10 dB noise", "int4": "4-bit", "clean": "clean, probe batches"}


def probe_curve(curve: Curve, signal: str) -> Curve:
    """``curve`` with the probe curve ``signal`` in place of the validation loss (the training loss as
    recorded): what BasinEarlyStopping(monitor=probe.metric) sees."""
    return Curve(curve.name, curve.kind, curve.x, list(curve.probes[signal]), curve.train)


def probe_methods() -> dict:
    """The forecaster with its defaults (run_forecaster) watching the validation loss, then each probe
    curve. evaluate() judges every stop by the clean validation loss."""
    methods = {"val_loss": METHODS["forecaster"]}
    for signal, name in PROBE_LABELS.items():
        methods[name] = lambda curve, signal=signal: run_forecaster(probe_curve(curve, signal))
    return methods


# ----------------------------------------------------------------------------------------------------------
# Classic rules from Prechelt, "Early Stopping — But When?" (1998), for the corpus evaluation. Prechelt
# validates at the end of each strip of k epochs; here every validation ends a strip, and the training
# progress of PQ is taken over the training-loss means of the last k validations (one mean per validation is
# all that is recorded). A rule's warning is its stop.


def run_gl(curve: Curve, alpha: float) -> Outcome:
    """GL_α: stop when the generalization loss 100·(E_va/E_opt − 1) exceeds α (E_opt: the best so far)."""
    best = math.inf
    for x, val in zip(curve.x, curve.val, strict=True):
        best = min(best, val)
        if 100 * (val / best - 1) > alpha:
            return Outcome(x, x)
    return Outcome(None, None)


def run_pq(curve: Curve, alpha: float, k: int = 5) -> Outcome:
    """PQ_α: stop when GL / P_k exceeds α, with the training progress P_k = 1000·(mean/min − 1) of the
    training losses over the last k validations (from the k-th validation on: a full strip)."""
    best = math.inf
    for i, (x, val) in enumerate(zip(curve.x, curve.val, strict=True)):
        best = min(best, val)
        if i + 1 < k:
            continue
        strip = np.asarray(curve.train[i + 1 - k : i + 1])
        progress = 1000 * (strip.mean() / strip.min() - 1)
        # GL > α·P rather than GL/P > α: a flat strip (P = 0) with any generalization loss stops.
        if 100 * (val / best - 1) > alpha * progress:
            return Outcome(x, x)
    return Outcome(None, None)


def run_up(curve: Curve, s: int, strip: int = 1) -> Outcome:
    """UP_s: stop when the validation loss rose in s successive strips, comparing the loss at the end of
    each strip (every ``strip`` validations) with the one a strip before."""
    rises, previous = 0, None
    for i, (x, val) in enumerate(zip(curve.x, curve.val, strict=True)):
        if (i + 1) % strip:
            continue
        rises = rises + 1 if previous is not None and val > previous else 0
        previous = val
        if rises >= s:
            return Outcome(x, x)
    return Outcome(None, None)


#: The methods replayed on the corpus: the forecaster, the baselines of METHODS (without the law-only
#: forecaster, a variant of the forecaster itself) and Prechelt's rules.
CORPUS_METHODS = {
    "forecaster": METHODS["forecaster"],
    "patience 3": METHODS["patience 3"],
    "patience 5": METHODS["patience 5"],
    "power law": run_power,
    "GL_2": lambda curve: run_gl(curve, 2),
    "GL_5": lambda curve: run_gl(curve, 5),
    "PQ_0.5": lambda curve: run_pq(curve, 0.5),
    "PQ_2": lambda curve: run_pq(curve, 2),
    "UP_2": lambda curve: run_up(curve, 2),
    "UP_3": lambda curve: run_up(curve, 3),
    "UP_2 (strips of 5)": lambda curve: run_up(curve, 2, strip=5),
}


def run_loss_alone(curve: Curve) -> Outcome:
    """The forecaster as a replay without ``--train-metric`` sees a run: the monitored loss only (its law)."""
    return run_forecaster(dataclasses.replace(curve, train=None))


# What a user with the validation loss alone has: the forecaster's law and the rules that need no training
# loss (the ratio from the training loss, the default, for reference).
LOSS_ALONE_METHODS = {
    "forecaster, the loss alone": run_loss_alone,
    "forecaster (with the training loss)": METHODS["forecaster"],
    "patience 3": METHODS["patience 3"],
    "patience 5": METHODS["patience 5"],
    "power law": run_power,
    "GL_5": lambda curve: run_gl(curve, 5),
    "UP_3": lambda curve: run_up(curve, 3),
}


# ----------------------------------------------------------------------------------------------------------
# Leads the corpus records (corpus.py): the gradient inner products, and time in learning-rate units


# The inner-product conditions: the series, its sign when training hurts the validation loss, and the rule.
DOT_CONDITIONS = {
    "grad": ("grad_dot", -1, "g_val·g_train + 2 se < 0"),
    "step": ("step_dot", +1, "g_val·Δθ − 2 se > 0"),
    "full": ("full_dot", -1, "g_val·ḡ_train (whole set) + 2 se < 0"),
    "pre": ("pre_dot", -1, "g_val·P·ḡ_train (Adam's P) + 2 se < 0"),
    "avg": ("avg_dot", -1, "g_val·ḡ_interval + 2 se < 0"),
}


def dot_hurts(curve: Curve, which: str) -> np.ndarray:
    """At each validation, whether training significantly hurt the validation loss to first order. The
    change of the validation loss is −η g_val·g under plain SGD along a training gradient g (the last
    batch's, ``"grad"``; the whole training set's, ``"full"``; the mean of the interval's batches, ``"avg"``),
    −η g_val·P·g along Adam's step (P its preconditioner, g the whole set's: ``"pre"``) and g_val·Δθ for the
    actual step (``"step"``): each fires when its product lies 2 se on the hurting side."""
    series, sign, _ = DOT_CONDITIONS[which]
    dot, se = np.asarray(getattr(curve, series)), np.asarray(getattr(curve, series + "_se"))
    return sign * dot - 2 * se > 0


def run_condition(x: list[float], fires, persist: int) -> Outcome:
    """A condition per validation as a rule: its warning the first validation it holds, its stop the first
    time it held at ``persist`` consecutive validations."""
    warning, streak = None, 0
    for x_now, now in zip(x, fires, strict=True):
        streak = streak + 1 if now else 0
        if now and warning is None:
            warning = x_now
        if streak >= persist:
            return Outcome(warning, x_now)
    return Outcome(warning, None)


def run_dot(curve: Curve, which: str, persist: int = 2) -> Outcome:
    """The inner product as a rule (run_condition)."""
    return run_condition(curve.x, dot_hurts(curve, which), persist)


def run_forecaster_lr_time(curve: Curve) -> Outcome:
    """The forecaster (defaults) with x = Σ_t η_t (time in learning-rate units) instead of steps; the
    warning and the stop mapped back to the steps of the same validations."""
    in_lr = Curve(curve.name, curve.kind, list(curve.lr_sum), curve.val, curve.train)
    outcome = run_forecaster(in_lr)
    steps = dict(zip(curve.lr_sum, curve.x, strict=True))
    return Outcome(*(None if x is None else steps[x] for x in (outcome.warning, outcome.stop)))


def run_noise_patience(curve: Curve, patience: int, direction: int) -> Outcome:
    """Lightning's EarlyStopping watching the gradient noise tr(Σ) of the whole training set (corpus.py's
    ``train_noise``): stop after ``patience`` validations without a new best. ``direction=+1``: the best is
    the lowest, i.e. stop once the noise has risen for ``patience`` validations: gradient disparity's rule
    (Forouzesh & Thiran, arXiv 2107.06665; disparity √(2 tr Σ/B) is monotone in tr Σ, so the same stops).
    ``direction=-1``: the best is the highest, i.e. stop once the noise is past its peak (theory §5: on a
    label-noise MLP tr Σ peaked near the validation minimum as the flipped labels were memorised). No
    validation loss is read: both stop without a validation set."""
    return run_patience(curve, patience, direction * np.asarray(curve.train_noise))


def dataset_snr(curve: Curve) -> np.ndarray:
    """N·|G|²/tr(Σ) at each validation, with |G|² the training set's mean gradient squared: the recorded
    |ḡ|² of the sample the statistics read, less its sampling share tr(Σ)·(1/n − 1/N) (none when the sample
    is the whole set)."""
    n, n_sample = curve.train_examples, curve.noise_sample
    noise = np.asarray(curve.train_noise)
    signal = np.asarray(curve.train_signal) - noise * (1 / n_sample - 1 / n)
    return n * signal / np.maximum(noise, 1e-300)


def run_dataset_snr(curve: Curve, persist: int = 2) -> Outcome:
    """Mahsereci et al.'s evidence-based criterion (arXiv 1703.09580) in its trace form: stop once the
    training set's gradient is no larger than its own sampling noise, N·|G|²/tr(Σ) ≤ 1, at ``persist``
    consecutive validations (its warning: the first). Validation-free."""
    return run_condition(curve.x, dataset_snr(curve) <= 1, persist)


def run_gradstop(curve: Curve) -> Outcome:
    """GRADSTOP (Jamshidi et al., arXiv 2508.19028: early stopping by posterior sampling, validation-free) in
    the trace form the monitor measures. With the posterior ∝ e^(−L), L the training loss summed over its N
    examples, and its Laplace approximation of precision H ≈ N·C (C the per-example gradient covariance), the
    credibility of θ, the posterior mass less probable than θ, is s = P(χ²_d ≥ q) with q = ∇Lᵀ H⁻¹ ∇L =
    N ḡᵀC⁻¹ḡ for d parameters (``parameters`` in the cache); the stop is the first validation with s ≥ u, u
    uniform (drawn once per run, seeded by its name), so that the stopping point is distributed as a
    posterior sample. C is known only by its trace here: taken isotropic, q = d · N|ḡ|²/tr C = d · the
    dataset SNR. (The paper's estimate of C⁻¹ is finer; for large d the trace form is the evidence-based
    criterion, SNR ≤ 1, at one validation; for the small linear models, d = 11–62, the draw of u matters.)"""
    from scipy.stats import chi2

    d = curve.parameters
    u = np.random.default_rng(zlib.crc32(curve.name.encode())).uniform()
    credibility = chi2.sf(d * dataset_snr(curve), d)
    return run_condition(curve.x, credibility >= u, persist=1)


# Recorded with the monitor's quantities on the training set (corpus.py's train_noise): validation-free rules.
NOISE_LEAD_METHODS = {
    **{f"disparity, patience {p}": lambda c, p=p: run_noise_patience(c, p, +1) for p in (3, 5)},
    **{f"noise past its peak, patience {p}": lambda c, p=p: run_noise_patience(c, p, -1) for p in (3, 5)},
    "dataset SNR <= 1 (evidence-based)": run_dataset_snr,
    "GRADSTOP, trace form": run_gradstop,
}


LEAD_METHODS = {
    "g_val·g_train < 0": lambda curve: run_dot(curve, "grad"),
    "g_val·Δθ > 0": lambda curve: run_dot(curve, "step"),
}
# Recorded since the full-gradient leads were added (corpus.py): scored where the cache has them.
LATER_LEAD_METHODS = {
    "g_val·ḡ_train < 0": lambda curve: run_dot(curve, "full"),
    "g_val·P·ḡ_train < 0": lambda curve: run_dot(curve, "pre"),
    "g_val·ḡ_interval < 0": lambda curve: run_dot(curve, "avg"),
}
