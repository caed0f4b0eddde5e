"""Loss logs as small column tables: read from a CSV file or a log of scalars by step (a TensorBoard log
directory, a Lightning ``CSVLogger`` metrics.csv, a Hugging Face trainer_state.json), select rows.

A :class:`Table` is a dict of equal-length numpy columns: numeric columns as float arrays (missing cells are
NaN), any other column (model names, run names) as a string array. The scaling laws read the columns ``N``
(parameters), ``D`` (tokens) and ``bits``; the observed loss is the column ``loss``. A log of scalars gives
the values of one of its scalars (``Table.tag``) as ``loss`` (see :mod:`snrmon.logs.scalars`).

Rows are selected with :func:`snrmon.logs.where.where`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MISSING = {"", "nan", "na", "n/a", "null", "none"}  # cells read as NaN in numeric columns (case-insensitive)


class LogError(ValueError):
    """Unreadable or unusable input; the message says what to fix."""


@dataclass
class Table:
    """Named, equal-length columns (float arrays or string arrays) and notes made while reading them."""

    columns: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    tag: str | None = None  # read from a log of scalars: the scalar whose values are the column loss

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

    def first_non_number(self, name: str) -> tuple[int, str] | None:
        """The first cell of column ``name`` that is not a number (nor a missing value), with its row index
        (0 = the first row after the header); None for a numeric column. What makes a column text."""
        if self.is_numeric(name):
            return None
        for row, cell in enumerate(self.columns[name].tolist()):  # tolist: plain str, not numpy's str_
            if cell.strip().lower() not in MISSING and not _is_number(cell):
                return row, cell
        return None

    def select(self, mask: np.ndarray) -> Table:
        """The rows where ``mask`` is true (or the rows at the given indices)."""
        return Table(
            {name: values[mask] for name, values in self.columns.items()}, list(self.notes), self.tag
        )

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
    """Read ``path``, its format told from the file: a TensorBoard log directory or event file, a Hugging
    Face trainer_state.json (a JSON object with ``log_history``), a Lightning ``CSVLogger`` metrics.csv (a
    ``step`` column and metrics on different rows), each a log of scalars read as its scalar ``tag`` (see
    :func:`snrmon.logs.scalars.runs_table`); else a CSV table, as it is (``tag`` unused)."""
    # Imported here: the readers of logs of scalars build on Table, defined above.
    from snrmon.logs import scalars

    path = Path(path)
    if not path.exists():
        raise LogError(f"no such file or directory: {path}")
    if path.is_dir() and not any(path.rglob("*tfevents*")):
        # A directory of one log file, e.g. a CSVLogger's version_0 or a Hugging Face checkpoint: that file.
        logs = [path / name for name in ("metrics.csv", "trainer_state.json") if (path / name).is_file()]
        path = logs[0] if len(logs) == 1 else path
    if path.is_dir() or "tfevents" in path.name:
        runs = scalars.tensorboard_runs(path)
    elif scalars.is_json(path):
        runs = [scalars.trainer_state_run(path)]
    else:
        table, written = _read_csv(path)
        if not scalars.is_step_log(table, written, path.name):
            return table
        runs = [scalars.csv_run(table, written, path)]
    return scalars.runs_table(runs, tag, path, tokens_per_step, n)


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
    from snrmon.logs import scalars

    path = Path(path)
    return scalars.runs_table(scalars.tensorboard_runs(path), tag, path, tokens_per_step, n)


def read_csv(path: str | Path) -> Table:
    """Read a CSV file with a header row. Columns whose every non-empty cell is a number become floats."""
    return _read_csv(Path(path))[0]


def _read_csv(path: Path) -> tuple[Table, dict[str, np.ndarray]]:
    """The table of a CSV file, and each column's written cells (not blank): in a log, a blank cell is a
    value not logged on that row, and a "nan" cell a logged NaN (a diverged loss), though both read as NaN."""
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
    cells_of = zip(header, zip(*body, strict=True), strict=True)
    columns = {name: [cell.strip() for cell in cells] for name, cells in cells_of}
    written = {name: np.array([cell != "" for cell in cells]) for name, cells in columns.items()}
    return Table({name: _column(cells) for name, cells in columns.items()}), written


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


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
