"""Loss logs as small column tables: read from a CSV file or a TensorBoard log directory, select rows.

A :class:`Table` is a dict of equal-length numpy columns: numeric columns as float arrays (missing cells are
NaN), any other column (model names, run names) as a string array. The scaling laws read the columns ``N``
(parameters), ``D`` (tokens) and ``bits``; the observed loss is the column ``loss``.

Rows are selected with :func:`snrmon.logs.where.where`.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MISSING = {"", "nan", "na", "n/a", "null", "none"}  # cells read as NaN in numeric columns (case-insensitive)
N_KEYS = ("n_params", "N")  # hparams.yaml keys giving a run's parameter count
TAGS_SHOWN = 8  # tags named in a message about --tag; the rest are counted
VALIDATION_WORDS = ("val", "valid", "eval", "test", "holdout")  # tags of held-out losses


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
            raise LogError(f"choose the loss scalar with --tag; {suggest_tags(available)}")
        tag = available[0]
    if tag not in available:
        raise LogError(f"no scalar tag {tag!r} in {root}; {suggest_tags(available)}")

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


def suggest_tags(tags: list[str]) -> str:
    """The tags worth trying as --tag, most likely first: loss tags (validation before training), then the
    others; at most ``TAGS_SHOWN`` named, the rest counted (a Lightning run may log dozens of scalars)."""
    if not tags:
        return "the runs log no scalars"

    def rank(tag: str) -> tuple:
        words = re.split(r"[^a-z]+", tag.lower())
        is_loss = any("loss" in word for word in words)
        is_validation = any(word.startswith(VALIDATION_WORDS) for word in words)
        return (not is_loss, not is_validation, tag)

    ordered = sorted(tags, key=rank)
    likely = [tag for tag in ordered if "loss" in tag.lower()]
    shown = (likely or ordered)[:TAGS_SHOWN]
    rest = len(tags) - len(shown)
    text = f"{'likely loss tags' if likely else 'available tags'}: {', '.join(shown)}"
    if rest:
        others = [tag for tag in ordered if tag not in shown][:3]
        text += f" ({rest} other tag{'s' if rest > 1 else ''}, e.g. {', '.join(others)})"
    return text


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
