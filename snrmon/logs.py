"""Loss logs as small column tables: read from a CSV file or a TensorBoard log directory, select rows.

A :class:`Table` is a dict of equal-length numpy columns: numeric columns as float arrays (missing cells are
NaN), any other column (model names, run names) as a string array. The scaling laws read the columns ``N``
(parameters), ``D`` (tokens) and ``bits``; the observed loss is the column ``loss``.

:func:`where` selects rows with a small, safe expression language (comparisons, ``and``/``or``/``not``,
numbers, strings and column names), parsed with :mod:`ast` and never evaluated as Python.
"""

from __future__ import annotations

import ast
import csv
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MISSING = {"", "nan", "na", "n/a", "null", "none"}  # cells read as NaN in numeric columns (case-insensitive)
N_KEYS = ("n_params", "N")  # hparams.yaml keys giving a run's parameter count


class LogError(ValueError):
    """Unreadable or unusable input; the message says what to fix."""


@dataclass
class Table:
    """Named, equal-length columns (float arrays or string arrays) and notes made while reading them."""

    columns: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    def is_numeric(self, name: str) -> bool:
        return self.columns[name].dtype.kind == "f"

    def select(self, mask: np.ndarray) -> Table:
        """The rows where ``mask`` is true (or the rows at the given indices)."""
        return Table({name: values[mask] for name, values in self.columns.items()}, list(self.notes))

    def dropna(self, names: list[str] | None = None) -> tuple[Table, int]:
        """Drop the rows with a missing or non-finite value in ``names`` (default: every numeric column).

        Returns the remaining table and the number of rows dropped.
        """
        names = [n for n in (names if names is not None else self.names) if n in self and self.is_numeric(n)]
        keep = np.ones(len(self), dtype=bool)
        for name in names:
            keep &= np.isfinite(self.columns[name])
        return self.select(keep), int((~keep).sum())


def read_table(
    path: str | Path, tag: str | None = None, tokens_per_step: float = 1.0, n: float | None = None
) -> Table:
    """Read ``path``: a TensorBoard log directory or event file (see :func:`read_tensorboard`), else a CSV."""
    path = Path(path)
    if not path.exists():
        raise LogError(f"no such file or directory: {path}")
    if path.is_dir() or "tfevents" in path.name:
        return read_tensorboard(path, tag, tokens_per_step=tokens_per_step, n=n)
    return read_csv(path)


def read_csv(path: str | Path) -> Table:
    """Read a CSV file with a header row. Columns whose every non-empty cell is a number become floats."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LogError(f"cannot read {path} as CSV: {error}") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise LogError(f"{path} is empty")
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header) or "" in header:
        raise LogError(f"{path}: the header row needs distinct, non-empty column names (got {rows[0]})")
    body = rows[1:]
    if not body:
        raise LogError(f"{path} has a header but no rows")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise LogError(f"{path}, line {line}: {len(row)} cells for {len(header)} columns")
    columns = zip(header, zip(*body, strict=True), strict=True)
    return Table({name: _column([cell.strip() for cell in cells]) for name, cells in columns})


def _column(cells: list[str]) -> np.ndarray:
    values = []
    for cell in cells:
        if cell.lower() in MISSING:
            values.append(math.nan)
            continue
        try:
            values.append(float(cell))
        except ValueError:
            return np.array(cells, dtype=str)
    return np.array(values, dtype=float)


def read_tensorboard(
    path: str | Path, tag: str | None, tokens_per_step: float = 1.0, n: float | None = None
) -> Table:
    """Read one scalar of every run under a TensorBoard log directory (TensorBoard's own event reader).

    Every directory holding event files is one run (column ``group``: its path under ``path``). The scalar
    ``tag`` becomes ``loss``; ``D = step × tokens_per_step`` (with the default 1, ``D`` counts steps);
    ``N`` is ``n`` if given, else the run's ``hparams.yaml`` value of ``n_params`` or ``N`` (searched from
    the run directory up to ``path``), else the table has no ``N`` column (single-run data). Step-0 rows
    (D = 0) are skipped. ``tag`` may be ``None`` when the runs log exactly one scalar.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    root = Path(path)
    run_dirs = (
        [root] if root.is_file() else sorted({p.parent for p in root.rglob("*tfevents*") if p.is_file()})
    )
    if not run_dirs:
        raise LogError(f"no TensorBoard event files under {root}")
    base = root.parent if root.is_file() else root
    scalars = {}
    for run_dir in run_dirs:
        accumulator = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
        accumulator.Reload()
        scalars[run_dir] = (accumulator, set(accumulator.Tags().get(SCALARS, [])))
    available = sorted(set().union(*(tags for _, tags in scalars.values())))
    if tag is None:
        if len(available) != 1:
            raise LogError(
                f"choose the loss scalar with --tag; available tags: {', '.join(available) or 'none'}"
            )
        tag = available[0]
    if tag not in available:
        raise LogError(f"no scalar tag {tag!r} in {root}; available tags: {', '.join(available) or 'none'}")

    table = Table({})
    columns: dict[str, list] = {"group": [], "step": [], "loss": [], "N": []}
    missing_n, step_zero, used = [], 0, 0
    for run_dir, (accumulator, tags) in scalars.items():
        name = _run_name(run_dir, base)
        if tag not in tags:
            table.notes.append(f"run {name!r} has no scalar {tag!r}; skipped")
            continue
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}  # a resumed run: last wins
        steps = sorted(step for step in by_step if step > 0)
        step_zero += len(steps) < len(by_step)
        used += 1
        run_n = n if n is not None else _hparams_n(run_dir, base)
        if run_n is None:
            missing_n.append(name)
        columns["group"] += [name] * len(steps)
        columns["step"] += steps
        columns["loss"] += [by_step[step] for step in steps]
        columns["N"] += [math.nan if run_n is None else run_n] * len(steps)
    if step_zero:
        table.notes.append(f"step 0 (D = 0) skipped in {step_zero} run{'s' if step_zero > 1 else ''}")
    if missing_n and len(missing_n) < used:
        raise LogError(
            f"no model size for run(s) {', '.join(missing_n)}: give --N or put n_params in their hparams.yaml"
        )
    step = np.array(columns["step"], dtype=float)
    table.columns = {
        "group": np.array(columns["group"], dtype=str),
        "step": step,
        "D": step * tokens_per_step,
        "loss": np.array(columns["loss"], dtype=float),
    }
    if not missing_n:
        table.columns["N"] = np.array(columns["N"], dtype=float)
    if not len(table):
        raise LogError(f"no logged values of {tag!r} after step 0 in {root}")
    return table


def _run_name(run_dir: Path, base: Path) -> str:
    if run_dir.is_file():  # a single event file: the run is its directory
        return run_dir.parent.resolve().name
    relative = run_dir.relative_to(base).as_posix() if run_dir != base else ""
    return relative or run_dir.resolve().name


def _hparams_n(run_dir: Path, base: Path) -> float | None:
    """``n_params`` (or ``N``) from the nearest hparams.yaml between ``run_dir`` and ``base``."""
    for directory in [run_dir, *run_dir.parents]:
        hparams = directory / "hparams.yaml"
        if hparams.is_file():
            for line in hparams.read_text(encoding="utf-8", errors="replace").splitlines():
                match = re.match(r"^([A-Za-z_]+)\s*:\s*['\"]?([-+0-9.eE]+)['\"]?\s*(#.*)?$", line)
                if match and match.group(1) in N_KEYS:
                    try:
                        return float(match.group(2))
                    except ValueError:
                        continue
        if directory == base or base not in directory.parents:
            break
    return None


# --- Row selection: a safe expression language ----------------------------------------------------------

COMPARISONS: dict[type, Callable] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
FORBIDDEN = {
    ast.Call: "function calls",
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.BinOp: "arithmetic",
    ast.Lambda: "lambda",
    ast.IfExp: "if-expressions",
    ast.In: "'in'",
    ast.NotIn: "'not in'",
    ast.Is: "'is'",
    ast.IsNot: "'is not'",
}
ALLOWED = "comparisons (< <= > >= == !=), and, or, not, parentheses, numbers, quoted strings, column names"


class WhereError(ValueError):
    """An expression outside the allowed language, or one that does not fit the table's columns."""


def where(table: Table, expression: str) -> np.ndarray:
    """The boolean row mask of ``expression`` over ``table``'s columns, e.g. ``"N <= 7e9 and D > 1e9"``.

    Allowed: comparisons ``< <= > >= == !=`` (chained too: ``1e9 < D <= 1e11``), ``and``, ``or``, ``not``,
    parentheses, numeric literals, quoted string literals (``group == "a"``) and column names. Anything else
    (calls, attributes, arithmetic, ...) raises :class:`WhereError`; nothing is evaluated as Python.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise WhereError(f"invalid expression {expression!r}; allowed: {ALLOWED}") from None
    mask = _condition(tree.body, table, expression)
    return np.broadcast_to(np.asarray(mask, dtype=bool), (len(table),)).copy()


def _condition(node: ast.AST, table: Table, expression: str) -> np.ndarray:
    if isinstance(node, ast.BoolOp):
        masks = [_condition(value, table, expression) for value in node.values]
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        return combine.reduce(masks)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_condition(node.operand, table, expression)
    if isinstance(node, ast.Compare):
        mask = np.ones(len(table), dtype=bool)
        left = _value(node.left, table, expression)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if type(op) not in COMPARISONS:
                _reject(op, expression)
            right = _value(right_node, table, expression)
            mask &= _compare(op, left, right, expression)
            left = right
        return mask
    if isinstance(node, (ast.Name, ast.Constant)):
        raise WhereError(f"{expression!r} is not a condition: compare a column, e.g. 'D <= 1e11'")
    _reject(node, expression)


def _value(node: ast.AST, table: Table, expression: str) -> np.ndarray | float | str:
    if isinstance(node, ast.Name):
        if node.id not in table:
            raise WhereError(
                f"unknown column {node.id!r} in {expression!r}; columns: {', '.join(table.names)}"
            )
        return table[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
        if not isinstance(node.value, bool):
            return float(node.value) if not isinstance(node.value, str) else node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if isinstance(operand, ast.Constant) and type(operand.value) in (int, float):
            return -float(operand.value) if isinstance(node.op, ast.USub) else float(operand.value)
    if isinstance(node, (ast.Compare, ast.BoolOp)) or (
        isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
    ):
        raise WhereError(f"a condition cannot be compared again in {expression!r}; use and/or")
    _reject(node, expression)


def _compare(op: ast.cmpop, left, right, expression: str) -> np.ndarray:
    left_text, right_text = _is_text(left), _is_text(right)
    if left_text != right_text:
        raise WhereError(f"{expression!r} compares text with a number")
    if left_text and not isinstance(op, (ast.Eq, ast.NotEq)):
        raise WhereError(f"text can only be compared with == or != in {expression!r}")
    with np.errstate(invalid="ignore"):
        return np.asarray(COMPARISONS[type(op)](left, right), dtype=bool)


def _is_text(value) -> bool:
    return isinstance(value, str) or (isinstance(value, np.ndarray) and value.dtype.kind in "US")


def _reject(node: ast.AST, expression: str):
    what = FORBIDDEN.get(type(node), type(node).__name__)
    if isinstance(node, ast.Constant):
        what = f"the literal {node.value!r}"
    raise WhereError(f"{what} not allowed in {expression!r}; allowed: {ALLOWED}")
