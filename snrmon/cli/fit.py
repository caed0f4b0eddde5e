"""``snrmon fit``: fit one law to DATA and print its constants with intervals, its scores and its basins."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from snrmon.cli.arguments import file_name, number
from snrmon.cli.data import DESCRIPTION, fit_options, load, read
from snrmon.cli.render import aligned, format_number, json_safe, warn
from snrmon.laws import LAWS, Fit, Law, get_law
from snrmon.laws.plot import Series, check_plot_target, plot_fit
from snrmon.laws.study import Data, Result, fit_data, run_key, run_label

MAX_CURVES = 12  # more distinct model sizes than this: the plot draws one curve per band of N


def add_parser(commands, data: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``fit`` on the ``snrmon`` command's subparsers; ``data``: the parent parser of DATA."""
    fit = commands.add_parser(
        "fit",
        parents=[data],
        help="fit one law; print its constants, scores and basins",
        description="Fit one law to DATA: constants with 95% bootstrap intervals, R², RMSE, basin D* per N."
        "\n\n" + DESCRIPTION.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("--law", required=True, choices=list(LAWS), help="the law to fit")
    fit.add_argument(
        "--bootstrap",
        type=number(int, zero_allowed=True),
        default=100,
        metavar="N",
        help="bootstrap resamples (100; 0: none)",
    )
    fit.add_argument(
        "--plot", type=file_name, metavar="FILE", help="write a PNG of the data and fitted curves"
    )
    fit.set_defaults(run=run)
    return fit


def run(args: argparse.Namespace) -> int:
    law = get_law(args.law)
    if args.plot:  # before reading and fitting: a bad path or a missing matplotlib fails at once
        check_plot_target(args.plot)
    data = load(args, read(args), [*law.inputs, "loss"])
    result = fit_data(law, data, **fit_options(args, bootstrap=args.bootstrap))
    warn(result.warnings)
    if args.plot:
        in_steps = "step" in data.table and args.tokens_per_step == 1.0  # TensorBoard, no --tokens-per-step
        x_label = "D (optimizer steps)" if in_steps else "D (tokens)"
        plot_fit(args.plot, plot_series(result, data), _title(law, data), x_label)
    if args.json:
        print(json.dumps(json_safe(fit_document(result, data)), indent=2))
    else:
        print(fit_report(result, data, args))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


def fit_document(result: Result, data: Data) -> dict:
    """The JSON object of ``snrmon fit --json``."""
    law = result.law
    if law.single_run:
        params = {run: fit.params for run, fit in result.fits.items()}
        params_ci = {run: _ci(fit) for run, fit in result.fits.items()}
    else:
        params, params_ci = result.fits[""].params, _ci(result.fits[""])
    return {
        "law": law.name,
        "equation": law.equation,
        "formula": law.formula,
        "params": params,
        "params_ci": params_ci,
        **result.scores,
        "d_star": result.d_star,
        "d_star_sampled": result.d_star_sampled,
        "dropped_rows": data.dropped_rows,
        "warnings": result.warnings,
    }


def _ci(fit: Fit) -> dict[str, list[float]]:
    return {name: [low, high] for name, (low, high) in fit.params_ci.items()}


def fit_report(result: Result, data: Data, args: argparse.Namespace) -> str:
    """The readable report of ``snrmon fit``: constants with units and intervals, scores, basins."""
    law = result.law
    method = "Huber loss (delta 1e-3) on log L" if args.robust else "least squares on L"
    lines = [
        f"{law.name} ({law.equation}): L = {law.formula}",
        f"fitted by {method}; {args.starts} starts ({args.refine} refined), {args.bootstrap} bootstrap "
        f"resamples, seed {args.seed}",
        f"data: {data.source}, {len(data.table)} rows ({result.scores['n_train']} train, "
        f"{result.scores['n_test'] if data.has_test else 0} test); "
        f"{data.dropped_rows} rows with missing values dropped",
        "",
    ]
    for run, fit in result.fits.items():
        if run:
            rows = result.run_rows[run]
            train = int(data.train[rows].sum())
            lines.append(f"run {run_label(run, data)}: {train} train rows, {len(rows) - train} test rows")
        lines += _constants_table(law, fit, indent="  " if run else "") + [""]
    scores = result.scores
    score_rows = [
        ["", "R²", "RMSE", "rows"],
        ["train", format_number(scores["r2_train"]), format_number(scores["rmse_train"])],
    ]
    score_rows[1].append(str(scores["n_train"]))
    if data.has_test:
        score_rows.append(
            [
                "test",
                format_number(scores["r2_test"]),
                format_number(scores["rmse_test"]),
                str(scores["n_test"]),
            ]
        )
    lines += aligned(score_rows)
    if result.d_star is not None:
        lines += ["", "basin D* (the loss-minimising D, T10; \"none\" where the loss keeps falling)"]
        if result.d_star_sampled:
            sizes = data.table["N"]
            lines[-1] += (
                f"\nat {len(result.d_star)} model sizes over the range of N "
                f"({format_number(float(sizes.min()))} to {format_number(float(sizes.max()))}; "
                f"the data have {len(np.unique(sizes)):,} distinct N)"
            )
        label = "run" if law.single_run else "N"
        lines += aligned(
            [[label, "D*"]]
            + [
                [run_label(k, data) if law.single_run else format_number(float(k)), _basin(v)]
                for k, v in result.d_star.items()
            ]
        )
        if law.single_run and not all(math.isfinite(v) for v in result.d_star.values()):
            lines += [
                "none: the law fitted to the whole curve keeps falling (or the loss is flat, as warned).",
                "`snrmon forecast` on the same logs reads the recent trend instead (with the training",
                "loss: how much of each training gain still reaches held-out data), so it can forecast a",
                "basin this fit does not show (docs/forecast.md).",
            ]
    return "\n".join(lines)


def _constants_table(law: Law, fit: Fit, indent: str) -> list[str]:
    rows = [["constant", "value", "95% interval", "unit", "meaning"]]
    for param, value in zip(law.params, fit.theta, strict=True):
        interval = fit.params_ci.get(param.name)
        shown = f"[{format_number(interval[0])}, {format_number(interval[1])}]" if interval else "-"
        rows.append([param.name, format_number(value), shown, param.unit, param.meaning])
    return [indent + line for line in aligned(rows)]


def _basin(value: float) -> str:
    return format_number(value) if math.isfinite(value) else "none"


def plot_series(result: Result, data: Data) -> list[Series]:
    """One curve per N (per N and bits for laws of bits; per run for single-run laws)."""
    law, table = result.law, data.table
    series = []
    if law.single_run:
        for run, fit in result.fits.items():
            rows = result.run_rows[run]
            d_star = result.d_star.get(run, np.inf) if result.d_star else np.inf
            order = float(np.median(table["N"][rows])) if "N" in table else len(series)
            series.append(_series(run_label(run, data), rows, data, fit, {}, d_star, order))
        return series
    fit = result.fits[""]
    keys = [name for name in ("N", "bits") if name in law.inputs]
    combos = np.unique(np.stack([table[k] for k in keys], axis=1), axis=0)
    if len(combos) > MAX_CURVES:
        return _banded_series(result, data)
    for combo in combos:
        fixed = dict(zip(keys, combo, strict=True))
        rows = np.all([table[k] == v for k, v in fixed.items()], axis=0)
        label = ", ".join(f"{k}={format_number(float(v))}" for k, v in fixed.items())
        d_star = result.d_star.get(run_key(fixed["N"]), np.inf) if result.d_star else np.inf
        series.append(_series(label, rows, data, fit, fixed, d_star, float(fixed["N"])))
    return series


def _banded_series(result: Result, data: Data) -> list[Series]:
    """Many distinct model sizes (continuous N): one curve per band of N holding an equal share of the
    rows, drawn at the band's geometric-mean N (and median bits)."""
    law, table, fit = result.law, data.table, result.fits[""]
    log_n = np.log(table["N"])
    edges = np.quantile(log_n, np.linspace(0, 1, MAX_CURVES // 2 + 1))
    band = np.clip(np.searchsorted(edges, log_n, side="right") - 1, 0, len(edges) - 2)
    series = []
    for index in np.unique(band):
        rows = band == index
        fixed = {"N": float(np.exp(log_n[rows].mean()))}
        if "bits" in law.inputs:
            fixed["bits"] = float(np.median(table["bits"][rows]))
        low, high = np.exp(log_n[rows].min()), np.exp(log_n[rows].max())
        label = f"N {low:.2g} to {high:.2g} (curve at {fixed['N']:.2g})"
        d_star = float(law.d_star(fit.theta, fixed["N"])) if result.d_star is not None else np.inf
        series.append(_series(label, rows, data, fit, fixed, d_star, fixed["N"]))
    return series


def _series(label: str, rows: np.ndarray, data: Data, fit: Fit, fixed: dict, d_star: float, order: float):
    def predict(d: np.ndarray) -> np.ndarray:
        return fit.predict({"D": d, **{k: np.full(len(d), v) for k, v in fixed.items()}})

    table = data.table
    return Series(label, table["D"][rows], table["loss"][rows], ~data.train[rows], predict, d_star, order)


def _title(law: Law, data: Data) -> str:
    return f"{law.name} ({law.equation}) fitted to {Path(data.source).name}"
