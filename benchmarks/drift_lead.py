"""Does the validation loss's second-order drift per step tell where it turns? (issue 13; docs/forecast.md,
"The second-order term, measured")

Theory §5 names the candidate: the first- and second-order terms of the expected loss change per step, the
gain −η g_val·u against the cost η²/2 · (uᵀH u + tr(P H P Σ)/B) of the step's curvature and sampling noise.
``python benchmarks/corpus.py --drift`` records them at every validation of the replayed window
(``corpus.Drift``); this replays them, with the noise term read two ways: as recorded (the long-run
diffusion of the steps' noise, at the momentum's effective rate) and as the next step's share of it given the
optimizer's state ((1 − β1)² = 0.01 for Adam and SGD with momentum 0.9 alike):

1. as physics: does the predicted drift T (their sum) follow the observed slope of the validation loss, and
   does its sum over the window (trapezoid rule) give the observed change?
2. as rules: the first validation where T > 0 (a step is predicted to hurt), or the noise alone outweighs
   the gain, at two consecutive validations; scored as the corpus evaluation scores a warning;
3. as features: the AUC of T/|gain| for "warn now" against "do not", on the points of the separability table.

    python benchmarks/drift_lead.py [--corpus tuning]   # seconds
"""

from __future__ import annotations

import argparse

import numpy as np
from eval_record import CorpusCurve, load_corpus
from forecast_variants import auc


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values))


NOISE_READINGS = {"long-run noise (as recorded)": 1.0, "the next step's noise": (1 - 0.9) ** 2}


def terms(curve: CorpusCurve, noise_scale: float = 1.0) -> dict[str, np.ndarray]:
    """The recorded terms over the window (the noise term times ``noise_scale``), the predicted drift T, the
    observed slope (central differences, at the inner points), the predicted and the observed change over
    the window, and rho, the second-order cost over the first-order gain (NaN where the gain is no gain)."""
    n = len(curve.drift_noise)
    x, val = np.asarray(curve.x[:n]), np.asarray(curve.val[:n])
    gain, curvature = np.asarray(curve.drift_first[:n]), np.asarray(curve.drift_curvature[:n])
    noise = noise_scale * np.asarray(curve.drift_noise[:n])
    drift = gain + curvature + noise
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(gain < 0, (curvature + noise) / -gain, np.nan)
    return {
        "x": x,
        "gain": gain,  # −η g_val·u: negative while a step helps held-out data
        "noise": noise,
        "T": drift,
        "observed": (val[2:] - val[:-2]) / (x[2:] - x[:-2]),
        "predicted change": float(np.sum((drift[1:] + drift[:-1]) / 2 * np.diff(x))),
        "observed change": float(val[-1] - val[0]),
        "rho": rho,
    }


def first_at(condition: np.ndarray, persist: int = 2) -> int | None:
    """The first index where ``condition`` has held at ``persist`` consecutive validations."""
    streak = 0
    for i, holds in enumerate(condition):
        streak = streak + 1 if holds else 0
        if streak >= persist:
            return i
    return None


def physics(curves: list[CorpusCurve], noise_scale: float) -> list[str]:
    lines = [
        "1. The predicted drift per step T against the observed slope of the validation loss",
        f"{'family':12s} {'runs':>4s} {'Spearman':>9s} {'sign right':>11s} {'rho, first 10':>14s} "
        f"{'predicted / observed change':>28s} {'T > 0 before the minimum (U) / improving':>42s}",
    ]
    for family in dict.fromkeys(c.family for c in curves):
        mine = [c for c in curves if c.family == family]
        spearman, agree, early_rho, change, before, improving = [], [], [], [], [], []
        for c in mine:
            t = terms(c, noise_scale)
            predicted = t["T"][1:-1]
            spearman.append(np.corrcoef(ranks(predicted), ranks(t["observed"]))[0, 1])
            agree.append(np.mean(np.sign(predicted) == np.sign(t["observed"])))
            early_rho.append(np.nanmedian(t["rho"][:10]) if np.isfinite(t["rho"][:10]).any() else np.nan)
            change.append(t["predicted change"] / t["observed change"])
            if c.kind == "U":
                before += list(t["T"][: c.min_index] > 0)
            else:
                improving += list(t["T"] > 0)
        shares = f"{np.mean(before):.0%}" if before else "-"
        shares += f" / {np.mean(improving):.0%}" if improving else " / -"
        lines.append(
            f"{family:12s} {len(mine):4d} {np.median(spearman):9.2f} {np.median(agree):11.0%} "
            f"{np.nanmedian(early_rho):14.2f} {np.median(change):15.2f} "
            f"[{min(change):.2f}, {max(change):.2f}] {shares:>30s}"
        )
    return lines


RULES = {
    "T > 0 (a step is predicted to hurt)": lambda t: t["T"] > 0,
    "noise alone outweighs the gain": lambda t: t["noise"] > -t["gain"],
    "the gain itself turns (first order hurts)": lambda t: t["gain"] > 0,
}


def rules(curves: list[CorpusCurve], noise_scale: float) -> list[str]:
    lines = [
        "2. As warnings (the condition at 2 consecutive validations)",
        f"{'rule':44s} {'in time':>8s} {'fired before half the minimum':>30s} "
        f"{'median first − minimum':>23s} {'false alarms':>13s}",
    ]
    targets = [c for c in curves if c.target]
    improving = [c for c in curves if c.kind == "improving"]
    for name, condition in RULES.items():
        fired = {c.name: first_at(condition(terms(c, noise_scale))) for c in curves}
        x_at = {c.name: c.x[fired[c.name]] if fired[c.name] is not None else None for c in curves}
        in_time = sum(
            x_at[c.name] is not None and c.x[c.min_index] / 2 <= x_at[c.name] <= c.x[c.min_index]
            for c in targets
        )
        early = sum(x_at[c.name] is not None and x_at[c.name] < c.x[c.min_index] / 2 for c in targets)
        lead = [fired[c.name] - c.min_index for c in targets if fired[c.name] is not None]
        alarms = sum(fired[c.name] is not None for c in improving)
        lines.append(
            f"{name:44s} {in_time:>3d} / {len(targets):<2d} {early:>22d} / {len(targets):<5d} "
            f"{np.median(lead) if lead else float('nan'):>+20.1f}   {alarms:>6d} / {len(improving)}"
        )
    return lines


def features(curves: list[CorpusCurve], noise_scale: float) -> list[str]:
    """AUC on the points of forecast_variants.labelled_points: each validation from the 16th on of the
    improving-there runs and of the target U-runs up to their minimum; positive from half the minimum on."""
    scores: dict[str, list[float]] = {"T / |gain|": [], "noise / |gain|": [], "the gain's sign": []}
    labels = []
    for c in curves:
        if c.kind == "U" and not c.target:
            continue
        t = terms(c, noise_scale)
        for i in range(16, len(t["x"])):
            if c.kind == "U" and i > c.min_index:
                break
            labels.append(int(c.kind == "U" and t["x"][i] >= c.x[c.min_index] / 2))
            scores["T / |gain|"].append(t["T"][i] / abs(t["gain"][i]))
            scores["noise / |gain|"].append(t["noise"][i] / abs(t["gain"][i]))
            scores["the gain's sign"].append(float(t["gain"][i] > 0))
    label = np.asarray(labels)
    lines = [f"3. AUC of 'warn now' ({label.sum()} points) against 'do not' ({len(label) - label.sum()})"]
    lines += [f"{name:20s} {auc(np.asarray(values), label):.2f}" for name, values in scores.items()]
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus", default="tuning", choices=("tuning", "held-out", "held-out-2", "held-out-3", "held-out-4")
    )
    args = parser.parse_args()
    curves = [c for c in load_corpus(args.corpus) if c.drift_noise]
    if not curves:
        raise SystemExit(f"no drift terms recorded for {args.corpus} (python benchmarks/corpus.py --drift)")
    print(f"{len(curves)} {args.corpus} runs with the drift terms")
    for reading, scale in NOISE_READINGS.items():
        print(f"\n=== {reading}\n")
        print("\n\n".join("\n".join(part(curves, scale)) for part in (physics, rules, features)))
