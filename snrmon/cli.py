"""The ``snrmon`` command: fit a scaling law to a loss log, or compare every law on it.

    snrmon fit DATA --law shannon [--where EXPR] [--train-where EXPR] [--json] [--plot FILE]
    snrmon compare DATA [--where EXPR] [--train-where EXPR] [--json]

DATA is a CSV file (columns N, D, loss; optional bits, group, others) or a TensorBoard log directory. Bad
input ends with a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from snrmon.arguments import number
from snrmon.fitting import Fit, FitError, fit_law, r2_score, rmse
from snrmon.laws import LAWS, Law, get_law
from snrmon.logs import LogError, Table, read_table
from snrmon.plot import PlotError, Series, check_plot_target, plot_fit
from snrmon.where import WhereError, where

USAGE_ERROR = 2
JOINT_LAWS = ("shannon", "chinchilla", "kaplan")  # laws of N and D
BITS_LAWS = ("kumar", "qid")  # laws of N, D and bits
MAX_BASIN_SIZES = 30  # more distinct N than this: D* is reported on a grid over the range of N instead
BASIN_GRID = 9  # ... of this many log-spaced model sizes
BASIN_FAR = 10.0  # a basin this factor beyond the observed D (either side) is an untested extrapolation
MAX_CURVES = 12  # more distinct model sizes than this: the plot draws one curve per band of N

DESCRIPTION = """\
Fit scaling laws (docs/law.md, equations T6-T14) to observed losses.

DATA is either
  * a CSV file with a header row: columns N (parameters), D (training tokens) and loss; optional bits
    (for kumar, qid), group (one training run per value, for single-run laws) and any others, usable in
    --where / --train-where; or
  * a TensorBoard log directory (or one event file): every directory holding event files is one run
    (column group = its path). The scalar chosen with --tag becomes loss, D = step x --tokens-per-step
    (default 1: D then counts optimizer steps, not tokens), N comes from --N, else from the run's
    hparams.yaml (key n_params or N); without either, only single-run laws (shannon-run, power) apply.
    Step-0 values are skipped (D = 0).

Rows with a missing or non-finite value in a needed column are dropped and counted. Expressions for --where
and --train-where may use comparisons (< <= > >= == !=, chained), and, or, not, parentheses, numbers,
quoted strings and column names, e.g. "N <= 7e9 and D <= 1.8e11" or 'group == "small"'.
"""


class UsageError(ValueError):
    """A bad command line or unusable data; reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message + sys.exit
        # main() prints "snrmon: error: "; a subcommand's parser adds its name ("fit: ...").
        command = self.prog.split()[1:]
        raise UsageError(f"{command[-1]}: {message}" if command else message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        with one_blas_thread():
            return args.run(args)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except (UsageError, LogError, WhereError, FitError, PlotError) as error:
        print(f"snrmon: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into e.g. head, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # a bug: still no traceback for the user, but say where to look
        print(f"snrmon: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def one_blas_thread():
    """A context in which BLAS (numpy's and scipy's OpenBLAS) runs on one thread.

    The fits solve many small least-squares problems (8 constants by a few hundred or thousand rows; only the
    final polish sees every row): BLAS threads only add overhead there, and on a busy machine a great deal of
    it (a 20,000-row Shannon fit run at low priority beside other work took 2 s with one thread, 44 s with
    two; see docs/performance.md).
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def build_parser() -> argparse.ArgumentParser:
    data = _Parser(add_help=False)
    data.add_argument("data", metavar="DATA", help="a CSV file or a TensorBoard log directory")
    data.add_argument(
        "--where", metavar="EXPR", help="keep only the rows where EXPR holds (e.g. 'D >= 6.3e9')"
    )
    data.add_argument(
        "--train-where",
        metavar="EXPR",
        help="fit on the rows where EXPR holds, test on the rest (default: fit on all rows, no test)",
    )
    data.add_argument("--tag", help="TensorBoard: the scalar tag holding the loss (e.g. val/loss)")
    data.add_argument(
        "--tokens-per-step",
        type=number(float),
        default=1.0,
        metavar="X",
        help="TensorBoard: D = step x X (default 1: D in steps)",
    )
    data.add_argument("--N", type=number(float), metavar="X", help="TensorBoard: model size of every run")
    method = data.add_mutually_exclusive_group()
    method.add_argument(
        "--robust",
        dest="robust",
        action="store_true",
        default=True,
        help="Huber loss (delta 1e-3) on log-loss residuals (default; Hoffmann et al. 2022)",
    )
    method.add_argument(
        "--plain", dest="robust", action="store_false", help="ordinary least squares on the loss itself"
    )
    data.add_argument("--starts", type=number(int), default=256, help="starting points screened (256)")
    data.add_argument(
        "--refine", type=number(int), default=8, help="best screened starts optimised to the end (8)"
    )
    data.add_argument(
        "--seed",
        type=number(int, zero_allowed=True),
        default=0,
        help="seed of the start grid and bootstrap (0)",
    )
    data.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    data.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars of long fits on stderr (default: when stderr is a terminal, and not with --json)",
    )

    parser = _Parser(
        prog="snrmon", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
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
    fit.add_argument("--plot", metavar="FILE", help="write a PNG of the data and fitted curves")
    fit.set_defaults(run=run_fit)
    compare = commands.add_parser(
        "compare",
        parents=[data],
        help="fit every applicable law and rank them",
        description="Fit every law that DATA supports; rank them by test R² (train R² if no test split).\n"
        "kumar and qid need a bits column; single-run laws are fitted to each run.\n\n"
        + DESCRIPTION.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.set_defaults(run=run_compare)
    from snrmon.forecast.cli import add_parser as add_forecast  # here: other commands never load it

    add_forecast(commands)
    return parser




# --- Data: read, clean, filter, split -------------------------------------------------------------------


@dataclass
class Data:
    table: Table  # rows kept (after dropping missing values and --where)
    train: np.ndarray  # bool per row
    has_test: bool
    dropped_rows: int
    source: str


def read(args: argparse.Namespace) -> Table:
    """Read DATA as the options say; notes made while reading go to stderr."""
    table = read_table(args.data, tag=args.tag, tokens_per_step=args.tokens_per_step, n=args.N)
    for note in table.notes:
        print(f"snrmon: note: {note}", file=sys.stderr)
    return table


def load(args: argparse.Namespace, table: Table, needed: list[str]) -> Data:
    """Check the ``needed`` columns of ``table``, drop missing values, apply --where and --train-where."""
    missing = [name for name in needed if name not in table]
    if missing:
        hint = ""
        if "N" in missing and "group" in table and "step" in table:
            hint = "; give --N or n_params in hparams.yaml, or use a single-run law (shannon-run, power)"
        raise UsageError(
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} in {args.data} "
            f"(columns: {', '.join(table.names)}){hint}"
        )
    for name in needed:
        if not table.is_numeric(name):
            example = next(v for v in table[name] if not _is_number(v))
            raise UsageError(f"column {name} of {args.data} is not numeric (e.g. {example!r})")
    table, dropped = table.dropna(needed)
    if not len(table):
        raise UsageError(f"no rows left in {args.data} after dropping {dropped} rows with missing values")
    if args.where:
        table = table.select(_mask(table, args.where, "--where"))
        if not len(table):
            raise UsageError(f"--where {args.where!r} keeps no rows")
    bad = {name: int((table[name] <= 0).sum()) for name in needed}
    if any(bad.values()):
        rows = int(np.any([table[name] <= 0 for name in needed], axis=0).sum())
        which = ", ".join(f"{name} in {count}" for name, count in bad.items() if count)
        raise UsageError(
            f"{rows} row{'s' if rows > 1 else ''} with non-positive values ({which}); "
            f"{', '.join(needed)} must be > 0 (drop them with --where)"
        )
    if args.train_where is None:
        return Data(table, np.ones(len(table), dtype=bool), False, dropped, args.data)
    train = _mask(table, args.train_where, "--train-where")
    if not train.any():
        raise UsageError(f"--train-where {args.train_where!r} matches no rows: nothing to fit")
    if train.all():
        raise UsageError(f"--train-where {args.train_where!r} matches every row: no rows left to test")
    return Data(table, train, True, dropped, args.data)


def _mask(table: Table, expression: str, option: str) -> np.ndarray:
    try:
        return where(table, expression)
    except WhereError as error:
        raise UsageError(f"{option}: {error}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# --- Fitting a law to the data --------------------------------------------------------------------------


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
        return np.array([_key(v) if table.is_numeric("group") else str(v) for v in values], dtype=object)
    if "N" in table and table.is_numeric("N"):
        return np.array([_key(v) for v in table["N"]], dtype=object)
    return np.array(["all"] * len(table), dtype=object)


def group_rows(keys: np.ndarray) -> dict[str, np.ndarray]:
    """The row indices of each distinct key, keys in order of first appearance; one sort, so that many
    runs cost no more than a few (comparing every row with every key would grow as rows x runs)."""
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1])
    return {unique[i]: groups[i] for i in np.argsort(first)}


def _key(value: float) -> str:
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
            label = _run_label(run, data)
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
    result.warnings = warnings + _basin_warnings(result, data)
    return result


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
                f"{law.name}: every training row has N = {_num(float(values[0]))}; one model size cannot "
                f"determine how the loss scales with N. Fit the run with a single-run law: --law {single}"
            )
        raise FitError(
            f"{law.name}: every training row has {name} = {_num(float(values[0]))}; one value cannot "
            f"determine how the loss depends on {name}. Fit a law without it (e.g. --law chinchilla)"
        )


def _check_runs(law: Law, run_rows: dict[str, np.ndarray], data: Data) -> None:
    """Fail fast, before any fit, on runs a single-run law cannot fit."""
    unfitted = [_run_label(run, data) for run, rows in run_rows.items() if not data.train[rows].any()]
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
            f"{_run_label(short[0], data)}); add a group column naming each run, or fit a law of N and D"
        )


def _fit_options(args: argparse.Namespace, bootstrap: int) -> dict:
    return {
        "robust": args.robust,
        "starts": args.starts,
        "refine": args.refine,
        "bootstrap": bootstrap,
        "seed": args.seed,
        "progress": show_progress(args),
    }


def show_progress(args: argparse.Namespace) -> bool:
    """--progress / --no-progress; by default bars only for a person watching: stderr is a terminal and
    the output is not --json."""
    if args.progress is not None:
        return args.progress
    return not args.json and sys.stderr.isatty()


def warn(warnings: list[str]) -> None:
    """Each warning as one line on stderr, apart from the report on stdout."""
    for warning in warnings:
        print(f"snrmon: warning: {warning}", file=sys.stderr)


def _rows(columns: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[mask] for name, values in columns.items()}


def _basins(law: Law, fits: dict[str, Fit], table: Table) -> tuple[dict[str, float] | None, bool]:
    """D* (T10) per N for a law of N and D, per run for a single-run law; None for laws without a basin.

    With more than ``MAX_BASIN_SIZES`` distinct N (e.g. continuous model sizes), D* is given on a grid of
    ``BASIN_GRID`` log-spaced model sizes over the range of N instead; the flag says so.
    """
    if not hasattr(law, "d_star"):
        return None, False
    if law.single_run:
        return {run: float(law.d_star(fit.theta)) for run, fit in fits.items()}, False
    sizes = np.unique(table["N"])
    sampled = len(sizes) > MAX_BASIN_SIZES
    if sampled:
        sizes = np.unique([float(f"{n:.3g}") for n in np.geomspace(sizes[0], sizes[-1], BASIN_GRID)])
    return {_key(n): float(law.d_star(fits[""].theta, float(n))) for n in sizes}, sampled


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
            where = f"run {_run_label(key, data)}" if result.law.single_run else f"N = {_num(float(key))}"
            far.append(f"{where} (D* = {_num(d_star)}; observed D {_num(low)} to {_num(high)})")
    if not far:
        return []
    listed = "; ".join(far[:3]) + (f"; and {len(far) - 3} more" if len(far) > 3 else "")
    return [
        f"{result.law.name}: basin D* more than {BASIN_FAR:g}x outside the observed D for {listed}: an "
        "extrapolation the data do not test"
    ]


# --- fit ------------------------------------------------------------------------------------------------


def run_fit(args: argparse.Namespace) -> int:
    law = get_law(args.law)
    if args.plot:  # before reading and fitting: a bad path or a missing matplotlib fails at once
        check_plot_target(args.plot)
    data = load(args, read(args), [*law.inputs, "loss"])
    result = fit_data(law, data, **_fit_options(args, bootstrap=args.bootstrap))
    warn(result.warnings)
    if args.plot:
        in_steps = "step" in data.table and args.tokens_per_step == 1.0  # TensorBoard, no --tokens-per-step
        x_label = "D (optimizer steps)" if in_steps else "D (tokens)"
        plot_fit(args.plot, plot_series(result, data), _title(law, data), x_label)
    if args.json:
        print(json.dumps(_clean(fit_document(result, data)), indent=2))
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


def _clean(value):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


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
            lines.append(f"run {_run_label(run, data)}: {train} train rows, {len(rows) - train} test rows")
        lines += _constants_table(law, fit, indent="  " if run else "") + [""]
    scores = result.scores
    score_rows = [["", "R²", "RMSE", "rows"], ["train", _num(scores["r2_train"]), _num(scores["rmse_train"])]]
    score_rows[1].append(str(scores["n_train"]))
    if data.has_test:
        score_rows.append(["test", _num(scores["r2_test"]), _num(scores["rmse_test"]), str(scores["n_test"])])
    lines += _aligned(score_rows)
    if result.d_star is not None:
        lines += ["", "basin D* (the loss-minimising D, T10; none: the loss keeps falling)"]
        if result.d_star_sampled:
            sizes = data.table["N"]
            lines[-1] += (
                f"\nat {len(result.d_star)} model sizes over the range of N ({_num(float(sizes.min()))} to "
                f"{_num(float(sizes.max()))}; the data have {len(np.unique(sizes)):,} distinct N)"
            )
        label = "run" if law.single_run else "N"
        lines += _aligned(
            [[label, "D*"]]
            + [
                [_run_label(k, data) if law.single_run else _num(float(k)), _basin(v)]
                for k, v in result.d_star.items()
            ]
        )
    return "\n".join(lines)


def _constants_table(law: Law, fit: Fit, indent: str) -> list[str]:
    rows = [["constant", "value", "95% interval", "unit", "meaning"]]
    for param, value in zip(law.params, fit.theta, strict=True):
        interval = fit.params_ci.get(param.name)
        shown = f"[{_num(interval[0])}, {_num(interval[1])}]" if interval else "-"
        rows.append([param.name, _num(value), shown, param.unit, param.meaning])
    return [indent + line for line in _aligned(rows)]


def _run_label(run: str, data: Data) -> str:
    return run if "group" in data.table else f"N={_num(float(run))}" if run != "all" else run


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def _basin(value: float) -> str:
    return _num(value) if math.isfinite(value) else "none"


def plot_series(result: Result, data: Data) -> list[Series]:
    """One curve per N (per N and bits for laws of bits; per run for single-run laws)."""
    law, table = result.law, data.table
    series = []
    if law.single_run:
        for run, fit in result.fits.items():
            rows = result.run_rows[run]
            d_star = result.d_star.get(run, np.inf) if result.d_star else np.inf
            order = float(np.median(table["N"][rows])) if "N" in table else len(series)
            series.append(_series(_run_label(run, data), rows, data, fit, {}, d_star, order))
        return series
    fit = result.fits[""]
    keys = [name for name in ("N", "bits") if name in law.inputs]
    combos = np.unique(np.stack([table[k] for k in keys], axis=1), axis=0)
    if len(combos) > MAX_CURVES:
        return _banded_series(result, data)
    for combo in combos:
        fixed = dict(zip(keys, combo, strict=True))
        rows = np.all([table[k] == v for k, v in fixed.items()], axis=0)
        label = ", ".join(f"{k}={_num(float(v))}" for k, v in fixed.items())
        d_star = result.d_star.get(_key(fixed["N"]), np.inf) if result.d_star else np.inf
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


# --- compare --------------------------------------------------------------------------------------------


def applicable_laws(table: Table) -> list[Law]:
    """Laws of N and D given an N column, laws of bits given a bits column too, single-run laws always."""
    names = [*JOINT_LAWS] if "N" in table else []
    names += [*BITS_LAWS] if "N" in table and "bits" in table else []
    names += [name for name, law in LAWS.items() if law.single_run]
    return [get_law(name) for name in names]


def run_compare(args: argparse.Namespace) -> int:
    table = read(args)
    laws = applicable_laws(table)
    needed = sorted({name for law in laws for name in law.inputs}, key=["N", "D", "bits"].index) + ["loss"]
    data = load(args, table, needed)
    entries = []
    for law in laws:
        entry = {
            "law": law.name,
            "equation": law.equation,
            "formula": law.formula,
            "single_run": law.single_run,
        }
        try:
            result = fit_data(law, data, **_fit_options(args, bootstrap=0))
        except FitError as error:
            entry.update(
                n_constants=len(law.params),
                error=str(error),
                basin_found=None,
                d_star=None,
                d_star_sampled=None,
                params=None,
                warnings=[],
                **dict.fromkeys(("r2_train", "rmse_train", "r2_test", "rmse_test", "n_train", "n_test")),
            )
            entries.append(entry)
            continue
        runs = len(result.fits)
        finite = [v for v in (result.d_star or {}).values() if math.isfinite(v)]
        entry.update(
            n_constants=len(law.params) * runs,
            runs=runs if law.single_run else None,
            error=None,
            **result.scores,
            basin_found=None if result.d_star is None else bool(finite),
            n_basins=None if result.d_star is None else len(finite),
            d_star=result.d_star,
            d_star_sampled=result.d_star_sampled,
            params=fit_document(result, data)["params"],
            dropped_rows=data.dropped_rows,
            warnings=result.warnings,
        )
        warn(result.warnings)
        entries.append(entry)
    score = "r2_test" if data.has_test else "r2_train"
    entries.sort(key=lambda e: (e["error"] is not None, -_finite_or(e.get(score), -math.inf)))
    for rank, entry in enumerate(entries, start=1):
        entry["rank"] = rank
    if args.json:
        print(json.dumps(_clean(entries), indent=2))
    else:
        print(compare_report(entries, data, score))
    return 0


def _finite_or(value, default: float) -> float:
    return value if value is not None and math.isfinite(value) else default


def compare_report(entries: list[dict], data: Data, score: str) -> str:
    """The ranked table of ``snrmon compare``."""
    rows = [["rank", "law", "equation", "constants", "R² train", "R² test", "RMSE test", "basin"]]
    for e in entries:
        constants = str(e["n_constants"])
        if e.get("runs"):
            constants += f" ({e['n_constants'] // e['runs']}/run x {e['runs']})"
        basin = "n/a" if e["basin_found"] is None else "no"
        if e["basin_found"]:
            basin = f"yes ({e['n_basins']} of {len(e['d_star'])})"
        if e["error"] is not None:
            basin = "failed"
        rows.append(
            [str(e["rank"]), e["law"], e["equation"], constants]
            + [_num(e[k]) for k in ("r2_train", "r2_test", "rmse_test")]
            + [basin]
        )
    split = (
        f"{int(data.train.sum())} train / {int((~data.train).sum())} test rows"
        if data.has_test
        else (f"{len(data.table)} rows, no test split")
    )
    lines = [f"{data.source}: {split}; ranked by {score.replace('r2_', 'R² ')}", ""] + _aligned(rows)
    failures = [f"  {e['error']}" for e in entries if e["error"] is not None]
    if failures:
        lines += ["", "failed:"] + failures
    if "N" not in data.table:
        lines += [
            "",
            "laws of N and D skipped: no N column (TensorBoard: give --N or n_params in hparams.yaml)",
        ]
    if data.dropped_rows:
        lines += ["", f"{data.dropped_rows} rows with missing values dropped"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
