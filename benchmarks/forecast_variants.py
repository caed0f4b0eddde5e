"""Variants of the forecaster's ratio signal and stop, replayed on a corpus split (docs/forecast.md).

Measured, not adopted: each replaces one part of the default forecaster and is scored like it.

* the ratio's estimate: the default regresses the monitored loss on the training loss in each window of 8
  points, so noise in the training loss pulls each window's ratio toward zero (errors in the regressor).
  ``integrated``: one regression over the last ``span`` points, v = c + r0·t + r1·∫(u − u_now) dt, for a
  ratio r(u) = r0 + r1·(u − u_now) with its covariance (still t as the regressor). ``slopes``: each window's
  ratio as the ratio of the two curves' slopes against log x (time as the instrument: no attenuation).
  ``quadratic``: r and its trend from local quadratics of both curves in log x over ``span`` points.
* what carries the warning: how often the default forecaster's P(basin within the horizon) reaches 0.5, and
  how often it warns (P ≥ 0.5 and the evidence tests pass), on U-runs before their minimum (from half of
  it, where a warning is in time), after it, and on improving-there runs.
* how separable the moments to warn are at all (``--separability``): each validation from the 16th on is
  labelled "warn now" (a target U-run, from half its minimum to the minimum) or "do not" (an improving-there
  run, or a U-run before half its minimum); the AUC of simple curve features (slopes against log x over 8
  and 16 points as z-scores, the ratio, on log losses too, the distance from the best) and of a logistic
  regression of all of them fitted on the tuning split, on each split. 0.5: no better than chance.
* the stop: after the forecaster's first warning, a stop at ``p`` validations without a new best (or the
  forecaster's own stop, whichever comes first); or the forecaster's stop or the first time g_val·ḡ_train
  (the whole training set's gradient, corpus.py) is significantly negative twice in a row, whichever first.

* the loss alone (``--loss-alone``): the law's warning, or one from the vertex of a local quadratic of the
  log loss in log x (``VertexDraws``), with the law's stop.

    python benchmarks/forecast_variants.py --corpus tuning   # ~20 s
    python benchmarks/forecast_variants.py --corpus held-out --loss-alone   # ~3 min
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os

import numpy as np
from eval_record import load_corpus
from eval_replay import (
    CORPUS_METHODS,
    Outcome,
    dataset_snr,
    replay_outcome,
    run_dataset_snr,
    run_dot,
    run_loss_alone,
)
from eval_score import evaluate_corpus
from eval_tables import corpus_summary_table

from snrmon.forecast import BasinForecaster
from snrmon.forecast.curve import slope, train_at_points
from snrmon.forecast.decision import SAMPLES, Draws
from snrmon.forecast.ratio import FAR_AHEAD, RATIO_FLOOR, RatioSignal, crossing_draws


def line_crossings(u_now: float, u_first: float, a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Draws of x where r = a + b·(u − u_now) crosses RATIO_FLOOR (the edge) and 0 (the minimum), as
    ratio.crossing_draws places them from drawn coefficients."""
    out = []
    for level in (RATIO_FLOOR, 0.0):
        above = a - level
        with np.errstate(divide="ignore", invalid="ignore"):
            ahead = np.where(b < 0, -above / b, np.where(above <= 0, 0.0, np.inf))
        far = ~(ahead <= math.log(FAR_AHEAD))  # NaN (a 0/0 draw) too: no crossing in sight
        ahead = np.clip(np.nan_to_num(ahead, nan=np.inf), u_first - u_now, math.log(FAR_AHEAD))
        out.append(np.where(far, np.inf, np.exp(u_now + ahead)))
    return out


class IntegratedRatio:
    """r(u) = r0 + r1·(u − u_now) from v = c + r0·t + r1·∫(u − u_now) dt over the last ``span`` points."""

    name = "ratio"

    def __init__(self, span: int) -> None:
        self.span = span

    def draws(self, x, loss, train, rng) -> Draws | None:
        n = min(self.span, len(x))
        v, t = loss[-n:], train[-n:]
        if n < 6 or not np.all(np.isfinite(t)):
            return None
        u = np.log(x[-n:])
        integral = np.concatenate([[0.0], np.cumsum(((u[1:] + u[:-1]) / 2 - u[-1]) * np.diff(t))])
        design = np.stack([np.ones(n), t - t[-1], integral - integral[-1]], axis=1)
        coefficients, *_ = np.linalg.lstsq(design, v, rcond=None)
        residuals = v - design @ coefficients
        covariance = float(residuals @ residuals / (n - 3)) * np.linalg.pinv(design.T @ design)
        a, b = rng.multivariate_normal(coefficients[1:], covariance[1:, 1:], size=SAMPLES, method="eigh").T
        edge, minimum = line_crossings(u[-1], u[0], a, b)
        return Draws(edge, minimum=minimum)


class SlopesRatio(RatioSignal):
    """Each window's ratio as slope(v vs log x) / slope(t vs log x); the trend line as the default's."""

    def draws(self, x, loss, train, rng) -> Draws | None:
        w, u_ends, ratios = self.window, [], []
        for end in range(w, len(x) + 1):
            t, v = train[end - w : end], loss[end - w : end]
            if not np.all(np.isfinite(t)):
                continue
            u = np.log(x[end - w : end])
            train_slope = slope(u, t)[0]
            if train_slope < 0:  # only a falling training loss makes the ratio meaningful
                ratios.append(slope(u, v)[0] / train_slope)
                u_ends.append(u[-1])
        if len(ratios) < 3:
            return None
        u, r = np.asarray(u_ends[-w:]), np.asarray(ratios[-w:])
        edge, minimum = crossing_draws(u, r, (RATIO_FLOOR, 0.0), rng)
        return Draws(edge, minimum=minimum)


def _quadratic(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    design = np.stack([np.ones_like(s), s, s**2], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - design @ coefficients
    return coefficients, float(residuals @ residuals / (len(y) - 3)) * np.linalg.pinv(design.T @ design)


class QuadraticRatio:
    """r = v'/t' and its trend at now, from quadratics of both curves in s = log x − log x_now over ``span``
    points: r0 = b_v/b_t, r1 = 2(c_v b_t − b_v c_t)/b_t²."""

    name = "ratio"

    def __init__(self, span: int) -> None:
        self.span = span

    def draws(self, x, loss, train, rng) -> Draws | None:
        n = min(self.span, len(x))
        if n < 8 or not np.all(np.isfinite(train[-n:])):
            return None
        s = np.log(x[-n:]) - math.log(x[-1])
        val = rng.multivariate_normal(*_quadratic(s, loss[-n:]), size=SAMPLES, method="eigh")
        trn = rng.multivariate_normal(*_quadratic(s, train[-n:]), size=SAMPLES, method="eigh")
        (b_v, c_v), (b_t, c_t) = val[:, 1:].T, trn[:, 1:].T
        with np.errstate(all="ignore"):
            a, b = b_v / b_t, 2 * (c_v * b_t - b_v * c_t) / b_t**2
        a = np.where(b_t < 0, a, np.nan)  # a training loss not falling: no ratio, no crossing in that draw
        edge, minimum = line_crossings(math.log(x[-1]), math.log(x[-n]), a, b)
        return Draws(edge, minimum=minimum)


def with_signal(make_signal):
    def run(curve) -> Outcome:
        forecaster = BasinForecaster()
        forecaster.ratio = make_signal(forecaster.window)
        return replay_outcome(forecaster, curve)

    return run


def warned_then_patience(patience: int):
    def run(curve) -> Outcome:
        forecaster, warning, best, since = BasinForecaster(), None, math.inf, 0
        for x, val, train in zip(curve.x, curve.val, curve.train, strict=True):
            forecast = forecaster.update(x, val, train)
            best, since = (val, 0) if val < best else (best, since + 1)
            if forecast.warning and warning is None:
                warning = x
            if forecast.stop or (warning is not None and since >= patience):
                return Outcome(warning if warning is not None else x, x)
        return Outcome(warning, None)

    return run


def or_gradient_stop(which: str):
    def run(curve) -> Outcome:
        forecast, gradient = CORPUS_METHODS["forecaster"](curve), run_dot(curve, which)
        stops = [stop for stop in (forecast.stop, gradient.stop) if stop is not None]
        return Outcome(forecast.warning, min(stops) if stops else None)

    return run


def gated_by_dataset_snr(curve) -> Outcome:
    """The forecaster, with the generalization gap's test replaced by external evidence of memorisation once
    the training set's gradient is no larger than its own sampling noise (N|G|²/tr Σ ≤ 1 at two consecutive
    validations: the evidence-based criterion's stop, eval_replay.run_dataset_snr). Fixed on the tuning split
    (commit 1c9ce7e) and built as BasinForecaster's ``dataset_snr``: this replays it through that API."""
    forecaster, warning = BasinForecaster(), None
    for x, val, train, snr in zip(curve.x, curve.val, curve.train, dataset_snr(curve), strict=True):
        forecast = forecaster.update(x, val, train, snr)
        if forecast.warning and warning is None:
            warning = x
        if forecast.stop:
            return Outcome(warning if warning is not None else x, x)
    return Outcome(warning, None)


class VertexDraws:
    """The loss alone: D* draws at the vertex of a quadratic in s = log x − log x_now fitted to the log loss
    over the last ``span`` points (its three coefficients drawn from their least-squares covariance). A
    convex draw's minimum is at −b/2c; a concave one that rises has passed it (the window's start); one that
    falls, or a vertex beyond FAR_AHEAD times the training done, gives inf. Stands in for the law's signal."""

    name = "law"

    def __init__(self, span: int) -> None:
        self.span = span

    def draws(self, x, loss, rng) -> Draws | None:
        n = min(self.span, len(x))
        s, y = np.log(x[-n:]) - math.log(x[-1]), np.log(loss[-n:])
        design = np.stack([np.ones(n), s, s * s], axis=1)
        coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
        residuals = y - design @ coefficients
        covariance = float(residuals @ residuals) / max(n - 3, 1) * np.linalg.pinv(design.T @ design)
        drawn = rng.multivariate_normal(
            coefficients, (covariance + covariance.T) / 2, size=SAMPLES, method="eigh"
        )
        b, c = drawn[:, 1], drawn[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            vertex = np.where(c > 0, -b / (2 * c), np.where(b >= 0, s[0], np.inf))
        vertex = np.where(vertex > math.log(FAR_AHEAD), np.inf, np.maximum(vertex, s[0]))
        return Draws(np.exp(math.log(x[-1]) + vertex))


def loss_alone(curve):
    """The curve without its training loss (the forecaster's law)."""
    return dataclasses.replace(curve, train=None)


def law_with_vertex_warning(span: int = 24):
    """The loss alone: the warning from VertexDraws (the decider's evidence tests as for the law), the stop
    the law's (its stop also warns). Fixed on the tuning split before any held-out replay of the loss
    alone."""

    def run(curve) -> Outcome:
        law = run_loss_alone(curve)
        vertex = BasinForecaster(method="law")
        vertex.law = VertexDraws(span)
        warning = replay_outcome(vertex, loss_alone(curve)).warning
        warnings = [w for w in (warning, law.stop) if w is not None]
        return Outcome(min(warnings) if warnings else None, law.stop)

    return run


LOSS_ALONE_VARIANTS = {
    "the loss alone (the law)": run_loss_alone,
    "the loss alone, the warning from the local curvature (24 points)": law_with_vertex_warning(24),
}


VARIANTS = {
    "forecaster": CORPUS_METHODS["forecaster"],
    "integrated, 12 points": with_signal(lambda window: IntegratedRatio(12)),
    "integrated, 16 points": with_signal(lambda window: IntegratedRatio(16)),
    "slopes": with_signal(SlopesRatio),
    "quadratic, 16 points": with_signal(lambda window: QuadraticRatio(16)),
    **{f"warned, then patience {p}": warned_then_patience(p) for p in (2, 3, 5)},
    "forecaster, or stop on g_val·ḡ_train": or_gradient_stop("full"),
    "forecaster, or stop on g_val·P·ḡ_train": or_gradient_stop("pre"),
}
# Recorded since the training set's gradient statistics were added (corpus.py's train_noise).
NOISE_VARIANTS = {
    "forecaster, gap test replaced once N|G|²/tr Σ <= 1": gated_by_dataset_snr,
    "dataset SNR <= 1 (evidence-based) alone": run_dataset_snr,
}


def warning_conditions(curves) -> list[str]:
    """The share of validations where the default forecaster's P(basin) >= 0.5, and where it warns."""
    shares = {"U-runs, half the minimum to the minimum": [], "U-runs, after the minimum": [], "improving": []}
    for curve in curves:
        forecasts = BasinForecaster().replay(curve.x, curve.val, curve.train)
        for i, forecast in enumerate(forecasts):
            if forecast.p_basin is None:
                continue
            if curve.kind == "improving":
                where = "improving"
            elif i > curve.min_index:
                where = "U-runs, after the minimum"
            elif curve.x[i] >= curve.x[curve.min_index] / 2:
                where = "U-runs, half the minimum to the minimum"
            else:
                continue
            shares[where].append((forecast.p_basin >= 0.5, forecast.warning))
    lines = ["validations                                 P(basin) >= 0.5   warning"]
    for where, flags in shares.items():
        p, warned = np.mean(flags, axis=0) if flags else (math.nan, math.nan)
        lines.append(f"{where:43s} {p:6.0%} of {len(flags):4d}   {warned:6.0%}")
    return lines


def point_features(x: np.ndarray, val: np.ndarray, train: np.ndarray) -> dict[str, float]:
    """Features of the curve up to its last point (the training loss moved to the points, as the forecaster
    reads it)."""
    train = train_at_points(x, train)
    features = {}
    for w in (8, 16):
        u = np.log(x[-w:])
        log_val, log_train = np.log(np.maximum(val[-w:], 1e-12)), np.log(np.maximum(train[-w:], 1e-12))
        for name, y in (
            ("val", val[-w:]),
            ("train", train[-w:]),
            ("gap", val[-w:] - train[-w:]),
            ("log gap", log_val - log_train),
        ):
            value, se = slope(u, y)
            features[f"{name} slope z, {w}"] = value / se if se > 0 else 0.0
        for name, (v, t) in (("ratio", (val[-w:], train[-w:])), ("log ratio", (log_val, log_train))):
            train_slope = slope(u, t)[0]
            features[f"{name}, {w}"] = slope(u, v)[0] / train_slope if train_slope < 0 else 0.0
    noise = float(np.median(np.abs(np.diff(val)))) or 1e-12
    features["above the best / noise"] = float(val[-1] - val.min()) / noise
    features["validations since the best"] = float(len(val) - 1 - np.argmin(val))
    features["training / monitored loss"] = float(train[-1] / val[-1])
    return features


def labelled_points(curves) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features and labels (1: a warning now is in time) of every scored validation from the 16th on."""
    rows, labels = [], []
    for curve in curves:
        if curve.kind == "U" and not curve.target:
            continue  # a minimum too early to forecast
        x, val, train = (np.asarray(s, dtype=float) for s in (curve.x, curve.val, curve.train))
        for i in range(16, len(x)):
            if curve.kind == "U" and i > curve.min_index:
                break  # after the minimum a warning is late, neither right nor a false alarm
            in_time = curve.kind == "U" and x[i] >= x[curve.min_index] / 2
            rows.append(point_features(x[: i + 1], val[: i + 1], train[: i + 1]))
            labels.append(int(in_time))
    names = list(rows[0])
    matrix = np.clip(np.nan_to_num(np.array([[r[n] for n in names] for r in rows])), -50, 50)
    return matrix, np.array(labels), names


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    positive, negative = score[label == 1], score[label == 0]
    greater = (positive[:, None] > negative[None, :]).mean()
    return float(greater + 0.5 * (positive[:, None] == negative[None, :]).mean())


def logistic(matrix: np.ndarray, label: np.ndarray, steps: int = 3000, l2: float = 1e-2):
    """A standardised logistic regression by gradient descent; returns its scoring function."""
    mean, std = matrix.mean(0), matrix.std(0) + 1e-9
    design = np.hstack([(matrix - mean) / std, np.ones((len(matrix), 1))])
    w = np.zeros(design.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-design @ w))
        w -= 0.1 * (design.T @ (p - label) / len(label) + l2 * np.r_[w[:-1], 0.0])
    return lambda m: np.hstack([(m - mean) / std, np.ones((len(m), 1))]) @ w


def separability(splits: list[str]) -> list[str]:
    data = {split: labelled_points(load_corpus(split)) for split in splits}
    matrix, label, names = data["tuning"]
    score = logistic(matrix, label)
    lines = ["AUC of 'warn now' against 'do not' (0.5: chance; below 0.5: the feature points the other way)"]
    lines.append(f"{'feature':32s}" + "".join(f"{s:>13s}" for s in splits))
    for j, name in enumerate(names):
        lines.append(f"{name:32s}" + "".join(f"{auc(m[:, j], y):13.2f}" for m, y, _ in data.values()))
    fitted = "".join(f"{auc(score(m), y):13.2f}" for m, y, _ in data.values())
    lines.append(f"{'logistic, all (fitted: tuning)':32s}{fitted}")
    counts = "".join(f"{y.sum():>7d} / {len(y):4d}" for _, y, _ in data.values())
    lines.append(f"{'points (warn now / all)':32s}{counts}")
    return lines


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    splits = ("tuning", "held-out", "held-out-2", "held-out-3", "held-out-4")
    parser.add_argument("--corpus", choices=splits, default="tuning")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--separability", action="store_true", help="the AUC table on all three splits")
    parser.add_argument(
        "--loss-alone", action="store_true", help="the loss-alone variants instead (~3 min a split)"
    )
    args = parser.parse_args()
    if args.separability:
        print("\n".join(separability(["tuning", "held-out", "held-out-2"])))
        raise SystemExit
    if args.loss_alone:
        rows = evaluate_corpus(load_corpus(args.corpus), LOSS_ALONE_VARIANTS)
        print("\n".join(corpus_summary_table(rows, args.markdown)))
        raise SystemExit
    curves = load_corpus(args.corpus)
    print("\n".join(warning_conditions(curves)))
    print()
    variants = dict(VARIANTS)
    if all(c.train_noise is not None for c in curves):
        variants.update(NOISE_VARIANTS)
    rows = evaluate_corpus(curves, variants)
    print("\n".join(corpus_summary_table(rows, args.markdown)))
