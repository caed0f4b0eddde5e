"""Does a family prior forecast the basin of a model size it has never seen? (issue 7; docs/forecast.md)

The Shannon law (T6–T8) fitted to runs of several model sizes carries over to a new size N (T10: the
cross-term places its basin, D* ∝ 1/N where it dominates). This replays each shipped Pythia LAMBADA curve
(8 sizes, 15 checkpoints from step 3000) through the forecaster behind ``BasinEarlyStopping`` with a prior
fitted to the *other* sizes only (``snrmon fit --law shannon`` on them, default settings), as a user would
start a new run from ``snrmon fit --json`` of earlier ones; and, as a harder test, with a prior fitted to the
smaller sizes only (a larger model forecast from smaller ones; from 410m on, which has two smaller sizes).

    python benchmarks/prior_eval.py             # the tables of docs/forecast.md (~30 s)

Printed: the basin each prior places alone (before any point of the run), then the per-run table and the
summary of forecast_eval.py for the forecaster with the prior, without it (the law from the loss alone) and
patience early stopping.
"""

from __future__ import annotations

import csv
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_record import PYTHIA, PYTHIA_FIRST_STEP, pythia_curves  # noqa: E402
from eval_replay import run_forecaster, run_patience  # noqa: E402
from eval_score import Row, evaluate, summary  # noqa: E402
from eval_tables import _cell  # noqa: E402

TOKENS_PER_STEP = 2_097_152  # Pythia: 1024 sequences of 2048 tokens per step


def pythia_rows() -> dict[str, np.ndarray]:
    """The Pythia rows from step 3000 on: model name (as the curves call it), N, D and loss."""
    columns: dict[str, list] = {"model": [], "N": [], "D": [], "loss": []}
    with open(PYTHIA) as handle:
        for row in csv.DictReader(handle):
            if float(row["D"]) / TOKENS_PER_STEP >= PYTHIA_FIRST_STEP:
                columns["model"].append(
                    f"pythia/{row['model'].removeprefix('pythia-').removesuffix('-deduped')}"
                )
                for name in ("N", "D", "loss"):
                    columns[name].append(float(row[name]))
    return {name: np.asarray(values) for name, values in columns.items()}


def family_prior(rows: dict[str, np.ndarray], models: list[str]) -> dict:
    """``snrmon fit --json --law shannon`` of the given models' rows, as the forecaster reads it."""
    from snrmon.laws import fit_law, get_law

    keep = np.isin(rows["model"], models)
    fit = fit_law(
        get_law("shannon"), {"N": rows["N"][keep], "D": rows["D"][keep]}, rows["loss"][keep], seed=0
    )
    return {"law": "shannon", "params": fit.params}


def main() -> None:
    from snrmon.forecast import BasinForecaster

    rows = pythia_rows()
    curves = pythia_curves()
    sizes = {c.name: float(rows["N"][rows["model"] == c.name][0]) for c in curves}
    order = sorted(sizes, key=sizes.get)
    began = time.perf_counter()
    priors = {
        "leave one size out": {name: family_prior(rows, [m for m in order if m != name]) for name in order},
        "smaller sizes only": {name: family_prior(rows, order[:i]) for i, name in enumerate(order) if i >= 2},
    }
    print(f"priors fitted in {time.perf_counter() - began:.0f} s\n")

    print("The basin each prior places alone (steps), against the curve's observed minimum:\n")
    print("| run | kind | minimum at | " + " | ".join(f"D* ({title})" for title in priors) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in priors) + " |")
    for curve in curves:
        cells = []
        for chosen in priors.values():
            if curve.name not in chosen:
                cells.append("–")
                continue
            forecaster = BasinForecaster(
                prior=chosen[curve.name], n_params=sizes[curve.name], tokens_per_x=TOKENS_PER_STEP
            )
            cells.append(f"{forecaster.update(curve.x[0], curve.val[0]).d_star:.3g}")
        minimum = curve.x[int(np.argmin(curve.val))]
        print(f"| {curve.name} | {curve.kind} | {minimum:.3g} | " + " | ".join(cells) + " |")

    for title, chosen in priors.items():

        def with_prior(curve, chosen=chosen):
            return run_forecaster(
                curve, prior=chosen[curve.name], n_params=sizes[curve.name], tokens_per_x=TOKENS_PER_STEP
            )

        methods = {
            "forecaster + prior": with_prior,
            "forecaster, no prior": lambda curve: run_forecaster(curve),
            "patience 3": lambda curve: run_patience(curve, 3),
            "patience 5": lambda curve: run_patience(curve, 5),
        }
        print(f"\n### Prior: {title}\n")
        print(table(evaluate([c for c in curves if c.name in chosen], methods)))


def table(rows: list[Row]) -> str:
    """Per run: the first warning and the stop of each method (forecast_eval's cells), then the summary."""
    methods = list(dict.fromkeys(r.method for r in rows))
    lines = [
        "| run | kind | minimum at | " + " | ".join(methods) + " |",
        "| --- | --- | --- |" + " --- |" * len(methods),
    ]
    for curve in dict.fromkeys(r.curve for r in rows):
        mine = {r.method: r for r in rows if r.curve == curve}
        first = mine[methods[0]]
        lines.append(
            f"| {curve} | {first.kind} | {first.x_min:.4g} | "
            + " | ".join(_cell(mine[m]) for m in methods)
            + " |"
        )
    lines += [
        "",
        "| method | warned at or before the minimum (U) | stopped (U) | loss at the stop within 1% (U) "
        "| best kept within 1% (U) | median validations past the minimum (U) | false alarms (improving) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    with warnings.catch_warnings():  # means over an empty set of U-shaped runs: NaN, shown as "–"
        warnings.simplefilter("ignore", RuntimeWarning)
        stats = summary(rows)
    for method, m in stats.items():
        if not m["n_u"]:  # no U-shaped run in the set: only the false alarms say anything
            lines.append(f"| {method} | – | – | – | – | – | {m['false_alarms']} of {m['n_improving']} |")
            continue
        past = "–" if np.isnan(m["median_past_min"]) else f"{m['median_past_min']:.1f}"
        lines.append(
            f"| {method} | {m['warned_in_time']:.0%} of {m['n_u']} | {m['stopped']:.0%} | "
            f"{m['within_1pct']:.0%} | {m['kept_within_1pct']:.0%} | {past} | "
            f"{m['false_alarms']} of {m['n_improving']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
