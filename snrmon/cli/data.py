"""What ``snrmon fit`` and ``snrmon compare`` share: the DATA argument with its options, and reading, cleaning
and splitting the table they name (missing values dropped, --where applied, --train-where split)."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from snrmon.cli.arguments import Parser, UsageError, number
from snrmon.forecast.curve import LARGEST
from snrmon.laws.study import Data
from snrmon.logs import Table, WhereError, read_table, where

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
    Step-0 values are skipped (D = 0); or
  * a Lightning CSVLogger metrics.csv (a step column, metrics on different rows) or a Hugging Face
    trainer_state.json (its log_history), told from the file: one run each, read as a TensorBoard run is
    (--tag names the scalar; N from the hparams.yaml beside metrics.csv, or --N).

Rows with a missing or non-finite value in a needed column are dropped and counted. Expressions for --where
and --train-where may use comparisons (< <= > >= == !=, chained), and, or, not, parentheses, numbers,
quoted strings and column names, e.g. "N <= 7e9 and D <= 1.8e11" or 'group == "small"'.
"""


def data_parser() -> argparse.ArgumentParser:
    """The options of DATA, a parent parser of fit and compare."""
    data = Parser(add_help=False)
    data.add_argument(
        "data",
        metavar="DATA",
        help="a CSV file, a TensorBoard log directory, a Lightning metrics.csv or a trainer_state.json",
    )
    data.add_argument(
        "--where", metavar="EXPR", help="keep only the rows where EXPR holds (e.g. 'D >= 6.3e9')"
    )
    data.add_argument(
        "--train-where",
        metavar="EXPR",
        help="fit on the rows where EXPR holds, test on the rest (default: fit on all rows, no test)",
    )
    data.add_argument(
        "--tag", help="a log of scalars: the scalar holding the loss (e.g. val/loss, eval_loss)"
    )
    data.add_argument(
        "--tokens-per-step",
        type=number(float),
        default=1.0,
        metavar="X",
        help="a log of scalars: D = step x X (default 1: D in steps)",
    )
    data.add_argument(
        "--N", type=number(float), metavar="X", help="a log of scalars: model size of every run"
    )
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

    return data


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
            row, example = table.first_non_number(name)
            raise UsageError(
                f"column {name} of {args.data} is not numeric (e.g. {example!r} in row {row + 1} after the "
                "header)"
            )
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
    # (the fits square values; a law's constants are bounded far below LARGEST anyway: 1e30)
    huge = {name: float(table[name].max()) for name in needed if table[name].max() > LARGEST}
    if huge:
        which = ", ".join(f"{name} up to {value:.3g}" for name, value in huge.items())
        raise UsageError(
            f"values too large to fit in {args.data} ({which}): their squares overflow double precision; "
            f"rescale the column (at most {LARGEST:.0e})"
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


def fit_options(args: argparse.Namespace, bootstrap: int) -> dict:
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
