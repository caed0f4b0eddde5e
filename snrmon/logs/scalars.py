"""Logs of scalars by step: TensorBoard runs, Lightning ``CSVLogger`` files and Hugging Face trainer states.

All three hold, per run, named scalars ("tags") each logged at some optimizer steps. They are read into a
:class:`Run` each and turned into the same table by :func:`runs_table`, so that one training logged to
several of them reads alike:

* a TensorBoard log directory (or event file): every directory holding event files is one run;
* a Lightning ``CSVLogger`` ``metrics.csv``: one row per logging call, a ``step`` column, and each metric's
  cells filled only on the rows of the calls that logged it (training and validation metrics on different
  rows, often at the same step);
* a Hugging Face ``trainer_state.json``: ``log_history``, a list of dicts with ``step`` and the values logged
  then (``loss`` is the training loss, ``eval_loss`` the evaluation loss, on separate entries).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from snrmon.logs.tables import LogError, Table

if TYPE_CHECKING:  # (tensorboard is imported where it reads, not with snrmon)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

N_KEYS = ("n_params", "N")  # hparams.yaml keys giving a run's parameter count
TAGS_SHOWN = 8  # tags named in a message about --tag; the rest are counted
VALIDATION_WORDS = ("val", "valid", "eval", "test", "holdout")  # tags of held-out losses
CHART_SERIES = "~"  # how the tags snrmon logs for TensorBoard's charts alone begin (~snr/...)
NOT_TAGS = ("step",)  # columns of a metrics.csv that say where a value was logged, not what


@dataclass
class Run:
    """One run's scalars: its name, its tags and, for a tag, its values by step (the last one logged at a
    step wins: a resumed run logs its steps again)."""

    name: str
    tags: set[str]
    values: Callable[[str], dict[int, float]]
    n: float | None = None  # the run's parameter count, from its hparams.yaml


def runs_table(
    runs: list[Run], tag: str | None, source: Path, tokens_per_step: float, n: float | None
) -> Table:
    """The values of scalar ``tag`` of every run as a table: ``group`` (the run's name), ``step``,
    ``D = step × tokens_per_step``, ``loss`` (the tag's values) and ``N`` (``n`` if given, else the runs'
    hparams.yaml value; no ``N`` column when no run has one). Step-0 rows (D = 0) are skipped. ``tag`` may be
    ``None`` when the runs log exactly one scalar."""
    available = sorted(set().union(*(run.tags for run in runs)))
    if tag is None:
        if len(available) != 1:
            raise LogError(f"choose the loss scalar with --tag; {suggest_tags(available)}")
        tag = available[0]
    if tag not in available:
        raise LogError(f"no scalar tag {tag!r} in {source}; {suggest_tags(available)}")

    table = Table({}, tag=tag)
    columns: dict[str, list] = {"group": [], "step": [], "loss": [], "N": []}
    missing_n, skipped, skipped_runs, used = [], 0, 0, 0
    for run in runs:
        if tag not in run.tags:
            table.notes.append(f"run {run.name!r} has no scalar {tag!r}; skipped")
            continue
        by_step = run.values(tag)
        steps = sorted(step for step in by_step if step > 0)
        skipped += len(by_step) - len(steps)
        skipped_runs += len(steps) < len(by_step)
        used += 1
        run_n = n if n is not None else run.n
        if run_n is None:
            missing_n.append(run.name)
        columns["group"] += [run.name] * len(steps)
        columns["step"] += steps
        columns["loss"] += [by_step[step] for step in steps]
        columns["N"] += [math.nan if run_n is None else run_n] * len(steps)
    if skipped:
        values = "1 value" if skipped == 1 else f"{skipped} values"
        runs_said = f"{skipped_runs} run{'s' if skipped_runs > 1 else ''}"
        table.notes.append(f"{values} at step 0 or below (D ≤ 0) skipped in {runs_said}")
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
        raise LogError(f"no logged values of {tag!r} after step 0 in {source}")
    return table


# --- TensorBoard ----------------------------------------------------------------------------------------


def tensorboard_runs(path: Path) -> list[Run]:
    """Every directory holding event files under ``path`` (or the one event file ``path``), read with
    TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS

    run_dirs = (
        [path] if path.is_file() else sorted({p.parent for p in path.rglob("*tfevents*") if p.is_file()})
    )
    if not run_dirs:
        logs = [p for p in sorted(path.rglob("*")) if p.name in ("metrics.csv", "trainer_state.json")][:3]
        hint = f"; give a log file instead, e.g. {', '.join(str(p) for p in logs)}" if logs else ""
        raise LogError(f"no TensorBoard event files under {path}{hint}")
    base = path.parent if path.is_file() else path
    runs = []
    for run_dir in run_dirs:
        accumulator = _loaded(str(run_dir), _files_as_they_are(run_dir))
        tensor_scalars = _tensor_scalar_tags(accumulator)

        def values(tag: str, accumulator=accumulator, tensor_scalars=tensor_scalars) -> dict[int, float]:
            if tag in tensor_scalars:
                return {event.step: _tensor_value(event.tensor_proto) for event in accumulator.Tensors(tag)}
            return {event.step: event.value for event in accumulator.Scalars(tag)}

        tags = set(accumulator.Tags().get(SCALARS, [])) | tensor_scalars
        runs.append(Run(_run_name(run_dir, base), tags, values, _hparams_n(run_dir, base)))
    # SNRMonitor copies each loss to a sub-run of its run, under ~snr/loss, only for TensorBoard's colours:
    # a run of chart series alone is no run of its own (unless nothing else was given).
    return [run for run in runs if not _charts_only(run)] or runs


@functools.lru_cache(maxsize=1024)  # (a directory of many runs is read whole, several times)
def _loaded(run_dir: str, files: tuple) -> EventAccumulator:
    """A run's event files, read once per process while ``files`` (their names, sizes and times) stay the
    same: a replay reads several tags of one directory, and reading thousands of files takes minutes."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={SCALARS: 0, TENSORS: 0})  # (0: every value)
    accumulator.Reload()
    return accumulator


def _tensor_scalar_tags(accumulator: EventAccumulator) -> set[str]:
    """Tags written as one-value tensors of TensorBoard's scalars plugin (``tf.summary.scalar`` in TF2,
    Keras): TensorBoard shows them as scalars, so they are read as scalars."""
    from tensorboard.backend.event_processing.event_accumulator import TENSORS

    return {
        tag
        for tag in accumulator.Tags().get(TENSORS, [])
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }


def _tensor_value(proto) -> float:
    from tensorboard.util import tensor_util

    return float(tensor_util.make_ndarray(proto).reshape(-1)[0])


def _files_as_they_are(run_dir: Path) -> tuple:
    files = [run_dir] if run_dir.is_file() else sorted(run_dir.glob("*tfevents*"))
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


def _charts_only(run: Run) -> bool:
    """Whether ``run`` holds only the series snrmon writes for TensorBoard's charts (tags under ``~``)."""
    return bool(run.tags) and all(tag.startswith(CHART_SERIES) for tag in run.tags)


# --- Lightning CSVLogger --------------------------------------------------------------------------------


def is_step_log(table: Table, written: dict[str, np.ndarray], name: str = "") -> bool:
    """Whether a CSV table is a log of metrics by step as Lightning's ``CSVLogger`` writes it: a numeric
    ``step`` column, no column of a table of runs (``group``, ``model``, ``run``, ``N``, ``D``), and rows that
    hold different metrics: two metric columns each filled on a row where the other is empty (a training
    metric and a validation metric, logged by separate calls), or, in a file named ``metrics.csv`` of numbers
    only, an ``epoch`` column beside ``step`` (Lightning logs it with every metric: a log of one metric, say
    two validations a step). A dense table of one curve is not one; it reads as before, row by row."""
    if "step" not in table or not table.is_numeric("step"):
        return False
    if any(name in table for name in ("group", "model", "run", "N", "D")):
        return False
    if name == "metrics.csv" and "epoch" in table and all(table.is_numeric(n) for n in table.names):
        return True
    filled = [written[name] for name in _tags(table)]
    return any((a & ~b).any() and (b & ~a).any() for i, a in enumerate(filled) for b in filled[i + 1 :])


def csv_run(table: Table, written: dict[str, np.ndarray], path: Path) -> Run:
    """The run of a ``CSVLogger`` ``metrics.csv`` read as ``table`` (``written``: each column's non-blank
    cells): every numeric column but ``step`` is a tag, with its values on the rows where it was written (a
    "nan" is a logged value, as in TensorBoard). The run's name is its directory's (``version_0``), its size
    from the ``hparams.yaml`` that ``CSVLogger`` writes beside the file."""
    steps = table["step"]
    unplaced = ~np.isfinite(steps)
    if unplaced.any():
        row = int(np.argmax(unplaced))
        raise LogError(f"{path}: no step on row {row + 1} after the header: each logged value needs its step")
    fractional = steps != np.round(steps)
    if fractional.any():
        row = int(np.argmax(fractional))
        raise LogError(f"{path}: step {steps[row]} on row {row + 1} after the header is not a whole number")

    def values(tag: str) -> dict[int, float]:
        logged = written[tag]
        return dict(zip(steps[logged].astype(int).tolist(), table[tag][logged].tolist(), strict=True))

    return Run(path.parent.resolve().name, set(_tags(table)), values, _hparams_n(path.parent, path.parent))


def _tags(table: Table) -> list[str]:
    return [name for name in table.names if name not in NOT_TAGS and table.is_numeric(name)]


# --- Hugging Face trainer_state.json --------------------------------------------------------------------


def is_json(path: Path) -> bool:
    """Whether the file holds a JSON object (its first non-blank character is ``{``), whatever its name, or
    a JSON list named ``*.json`` (read as JSON, to be refused as no trainer state, not as a CSV)."""
    with open(path, "rb") as handle:
        start = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 byte order mark, then blanks
    return start.startswith(b"{") or (start.startswith(b"[") and path.suffix.lower() == ".json")


def trainer_state_run(path: Path) -> Run:
    """The run of a Hugging Face ``trainer_state.json``: every number logged in ``log_history`` is a tag
    (``loss``: the training loss, averaged by the trainer over its logging interval; ``eval_loss``,
    ``learning_rate``, ``epoch``, ...), at the entry's ``step``."""
    try:
        state = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise LogError(f"cannot read {path} as JSON: {error}") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise LogError(
            f"{path} is JSON without a log_history list: snrmon reads Hugging Face's trainer_state.json"
        )
    series: dict[str, dict[int, float]] = {}
    for index, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise LogError(f"{path}: log_history[{index}] is not an object: {entry!r}")
        step = entry.get("step")
        if not _is_number(step) or not float(step).is_integer():
            raise LogError(f"{path}: log_history[{index}] has no whole-number step: {entry!r}")
        for key, value in entry.items():
            if key != "step" and _is_number(value, finite=False):  # texts, nested values: no scalars
                series.setdefault(key, {})[int(step)] = float(value)  # a resumed run: the last entry wins
    return Run(path.parent.resolve().name, set(series), lambda tag: series[tag])


def _is_number(value: object, finite: bool = True) -> bool:
    """A JSON number (not a boolean); with ``finite=False`` also NaN and infinities (a diverged loss)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and (math.isfinite(value) or not finite)


# --- names, model sizes, suggestions ------------------------------------------------------------------


def suggest_tags(tags: list[str]) -> str:
    """The tags worth trying as --tag, most likely first: loss tags (validation before training), then the
    others; at most ``TAGS_SHOWN`` named, the rest counted (a Lightning run may log dozens of scalars)."""
    if not tags:
        return "the runs log no scalars (their files hold no scalar values: empty, cut short or not a log)"

    def is_loss(tag: str) -> bool:  # by its last part: snr/forecast/val_loss/d_star is no loss
        return "loss" in tag.lower().rsplit("/", 1)[-1]

    def is_own(tag: str) -> bool:  # a series snrmon logs about a loss (snr/forecast/val_loss/train_loss)
        return "snr/forecast/" in tag or tag.startswith(CHART_SERIES)

    def rank(tag: str) -> tuple:
        words = re.split(r"[^a-z]+", tag.lower())
        is_validation = any(word.startswith(VALIDATION_WORDS) for word in words)
        return (is_own(tag), not is_loss(tag), not is_validation, tag)

    ordered = sorted(tags, key=rank)
    likely = [tag for tag in ordered if is_loss(tag) and not is_own(tag)]
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
