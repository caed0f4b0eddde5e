"""The fit-and-score study behind ``snrmon fit`` and ``snrmon compare``: fit a law to the training rows of a
table (one fit for a law of N and D, one per run for a single-run law), score it on training and held-out
rows, and find its basins (T10). No argument parsing and no printing here: the command line does those.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np

from snrmon.laws.equations import LAWS, Law, get_law
from snrmon.laws.fitting import Fit, FitError, fit_law, r2_score, rmse
from snrmon.logs import Table

JOINT_LAWS = ("shannon", "chinchilla", "kaplan")  # laws of N and D


BITS_LAWS = ("kumar", "qid")  # laws of N, D and bits


MAX_BASIN_SIZES = 30  # more distinct N than this: D* is reported on a grid over the range of N instead


BASIN_GRID = 9  # ... of this many log-spaced model sizes


BASIN_FAR = 10.0  # a basin this factor beyond the observed D (either side) is an untested extrapolation


@dataclass
class Data:
    table: Table  # rows kept (after dropping missing values and --where)
    train: np.ndarray  # bool per row
    has_test: bool
    dropped_rows: int
    source: str


@dataclass
class Result:
    """A law fitted to the training rows (one fit, or one per run for single-run laws), scored on all rows."""

    law: Law
    fits: dict[str, Fit]  # run -> fit; the single key "" for a law of N and D
    predicted: np.ndarray  # per row of the data
    scores: dict[str, float | int | None]
    d_star: dict[str, float] | None  # N (or run) -> D*; None: the law has no basin
    run_rows: dict[str, np.ndarray] | None = None  # run -> its row indices (single-run laws)
    d_star_sampled: bool = False  # d_star is on a grid over the range of N, not at every distinct N
    warnings: list[str] = field(default_factory=list)  # reasons to distrust the fit, one sentence each


def run_keys(table: Table) -> np.ndarray:
    """The run of each row for single-run laws: its ``group`` value, else its ``N``, else one run."""
    if "group" in table:
        values = table["group"]
        return np.array([run_key(v) if table.is_numeric("group") else str(v) for v in values], dtype=object)
    if "N" in table and table.is_numeric("N"):
        return np.array([run_key(v) for v in table["N"]], dtype=object)
    return np.array(["all"] * len(table), dtype=object)


def group_rows(keys: np.ndarray) -> dict[str, np.ndarray]:
    """The row indices of each distinct key, keys in order of first appearance; one sort, so that many
    runs cost no more than a few (comparing every row with every key would grow as rows x runs)."""
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1])
    return {unique[i]: groups[i] for i in np.argsort(first)}


def run_key(value: float) -> str:
    """A number as a JSON key: integers without a decimal point, others in shortest round-trip form."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e18 else repr(value)


def fit_data(
    law: Law,
    data: Data,
    *,
    robust: bool,
    starts: int,
    refine: int,
    bootstrap: int,
    seed: int,
    progress: bool = False,
) -> Result:
    """Fit ``law`` to the training rows of ``data`` and score it on the training and held-out rows.


    Raises FitError before fitting when the training rows cannot determine the law (one model size for a law
    of N and D; too few rows per run for a single-run law). ``progress``: bars on stderr while fitting.
    """
    table, train = data.table, data.train
    columns = {name: table[name] for name in law.inputs}
    options = {"robust": robust, "starts": starts, "refine": refine, "bootstrap": bootstrap, "seed": seed}
    predicted = np.full(len(table), np.nan)
    fits: dict[str, Fit] = {}
    run_rows = None
    warnings = []
    if not law.single_run:
        _check_sizes_vary(law, table, train)
        fit = fit_law(
            law,
            _rows(columns, train),
            table["loss"][train],
            **options,
            progress=law.name if progress else None,
        )
        fits[""] = fit
        predicted = fit.predict(columns)
        warnings += [f"{law.name}: {warning}" for warning in fit.warnings]
    else:
        run_rows = group_rows(run_keys(table))
        _check_runs(law, run_rows, data)
        runs = run_rows.items()
        if progress and len(run_rows) > 1:  # one bar over the runs, not one per run
            from tqdm import tqdm

            runs = tqdm(runs, desc=law.name, unit="run", file=sys.stderr, leave=False)
        for run, rows in runs:
            fitted = rows[train[rows]]
            label = run_label(run, data)
            try:
                fit = fit_law(
                    law, _rows(columns, fitted), table["loss"][fitted], **options,
                    progress=law.name if progress and len(run_rows) == 1 else None,
                )  # fmt: skip
            except FitError as error:
                raise FitError(
                    f"{law.name}, run {label}: {str(error).removeprefix(law.name + ': ')}"
                ) from None
            fits[run] = fit
            predicted[rows] = fit.predict(_rows(columns, rows))
            warnings += [f"{law.name}, run {label}: {warning}" for warning in fit.warnings]
    loss = table["loss"]
    test = ~train
    scores = {
        "r2_train": r2_score(loss[train], predicted[train]),
        "rmse_train": rmse(loss[train], predicted[train]),
        "r2_test": r2_score(loss[test], predicted[test]) if data.has_test else None,
        "rmse_test": rmse(loss[test], predicted[test]) if data.has_test else None,
        "n_train": int(train.sum()),
        "n_test": int(test.sum()),
    }
    d_star, sampled = _basins(law, fits, table)
    result = Result(law, fits, predicted, scores, d_star, run_rows, sampled)
    result.warnings = warnings + _flat_runs(result, data) + _basin_warnings(result, data)
    return result


def _flat_runs(result: Result, data: Data) -> list[str]:
    """Runs of a single-run law whose loss is the same at every row: every D minimises it, so no basin is
    read from them (D* none), and a warning says so. The law fits any such curve, with a basin anywhere."""
    if result.d_star is None or not result.law.single_run:
        return []
    flat = []
    for run, rows in result.run_rows.items():
        loss = data.table["loss"][rows]
        if run in result.d_star and np.ptp(loss) <= 1e-9 * np.abs(loss).max():
            result.d_star[run] = math.inf
            flat.append(run_label(run, data))
    if not flat:
        return []
    runs = f"run{'s' if len(flat) > 1 else ''} {', '.join(flat)}"
    return [f"{result.law.name}: the loss of {runs} is the same at every row: no basin (D* none)"]


def _check_sizes_vary(law: Law, table: Table, train: np.ndarray) -> None:
    """A law of N and D learns how the loss scales with N (α) from several model sizes; from one, any α fits
    equally well and its interval is meaningless. Likewise a law of bits needs several bit widths."""
    for name in law.inputs:
        values = np.unique(table[name][train]) if name != "D" else ()
        if len(values) != 1:
            continue
        if name == "N":
            single = "shannon-run" if law.name == "shannon" else "power or --law shannon-run"
            raise FitError(
                f"{law.name}: every training row has N = {_short(float(values[0]))}; one model size cannot "
                f"determine how the loss scales with N. Fit the run with a single-run law: --law {single}"
            )
        raise FitError(
            f"{law.name}: every training row has {name} = {_short(float(values[0]))}; one value cannot "
            f"determine how the loss depends on {name}. Fit a law without it (e.g. --law chinchilla)"
        )


def _check_runs(law: Law, run_rows: dict[str, np.ndarray], data: Data) -> None:
    """Fail fast, before any fit, on runs a single-run law cannot fit."""
    unfitted = [run_label(run, data) for run, rows in run_rows.items() if not data.train[rows].any()]
    if unfitted:
        raise FitError(
            f"{law.name}: no training rows in run {', '.join(unfitted)}; a single-run law cannot "
            "predict a run it was not fitted to"
        )
    constants = len(law.params)
    short = [run for run, rows in run_rows.items() if data.train[rows].sum() < constants]
    if short and "group" not in data.table and "N" in data.table:
        # Without a group column every distinct N is a run: continuous N values make one-row runs.
        raise FitError(
            f"{law.name}: without a group column each distinct N is one run, and {len(short):,} of "
            f"{len(run_rows):,} runs have fewer than {constants} training rows (e.g. "
            f"{run_label(short[0], data)}); add a group column naming each run, or fit a law of N and D"
        )


def _rows(columns: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[mask] for name, values in columns.items()}


def _basins(law: Law, fits: dict[str, Fit], table: Table) -> tuple[dict[str, float] | None, bool]:
    """D* (T10) per N for a law of N and D, per run for a single-run law; None for laws without a basin.


    With more than ``MAX_BASIN_SIZES`` distinct N (e.g. continuous model sizes), D* is given on a grid of
    ``BASIN_GRID`` log-spaced model sizes over the range of N instead; the flag says so.
    """
    if not law.has_basin:
        return None, False
    if law.single_run:
        return {run: float(law.d_star(fit.theta)) for run, fit in fits.items()}, False
    sizes = np.unique(table["N"])
    sampled = len(sizes) > MAX_BASIN_SIZES
    if sampled:
        sizes = np.unique([float(f"{n:.3g}") for n in np.geomspace(sizes[0], sizes[-1], BASIN_GRID)])
    return {run_key(n): float(law.d_star(fits[""].theta, float(n))) for n in sizes}, sampled


def _basin_warnings(result: Result, data: Data) -> list[str]:
    """One warning naming the basins that lie far outside the observed D of their run (of all rows for a
    law of N and D): the data say nothing about the curve there."""
    if result.d_star is None:
        return []
    far = []
    for key, d_star in result.d_star.items():
        rows = result.run_rows[key] if result.law.single_run else slice(None)
        observed = data.table["D"][rows]
        low, high = float(observed.min()), float(observed.max())
        if math.isfinite(d_star) and not low / BASIN_FAR <= d_star <= high * BASIN_FAR:
            where = f"run {run_label(key, data)}" if result.law.single_run else f"N = {_short(float(key))}"
            far.append(f"{where} (D* = {_short(d_star)}; observed D {_short(low)} to {_short(high)})")
    if not far:
        return []
    listed = "; ".join(far[:3]) + (f"; and {len(far) - 3} more" if len(far) > 3 else "")
    return [
        f"{result.law.name}: basin D* more than {BASIN_FAR:g}x outside the observed D for {listed}: an "
        "extrapolation the data do not test"
    ]


def applicable_laws(table: Table) -> list[Law]:
    """Laws of N and D given an N column, laws of bits given a bits column too, single-run laws always."""
    names = [*JOINT_LAWS] if "N" in table else []
    names += [*BITS_LAWS] if "N" in table and "bits" in table else []
    names += [name for name, law in LAWS.items() if law.single_run]
    return [get_law(name) for name in names]


def run_label(run: str, data: Data) -> str:
    return run if "group" in data.table else f"N={_short(float(run))}" if run != "all" else run


def _short(value: float) -> str:
    return f"{value:.4g}"
