"""Each loss in its own colour in TensorBoard: the losses a run logs, copied to sub-runs of the run.

TensorBoard colours lines by run, never by tag, on its Custom Scalars charts as on its Time Series cards
(TensorBoard 2.21's page gives a line ``tag (run)`` its run's colour), so a run's training and validation
losses share one colour and differ only by marker. Curves meant to be told apart go to separate runs: that is
TensorBoard's convention (Keras's TensorBoard callback writes the sub-runs ``logs/train`` and
``logs/validation``, each with the tag ``epoch_loss``). So for each TensorBoard logger, every value Lightning
logs under a tag with "loss" in its name is also written to the sub-run ``<log_dir>/<tag>``, under the one
tag ``~snr/loss`` (``~`` sorts it last) and at the step Lightning logs it at. The layout's loss chart and the
Time Series card ``~snr/loss`` then draw one colour per loss, the legend naming the sub-run, e.g.
``~snr/loss (version_0/val_loss)``.

The values are those Lightning logs, when it logs them (:func:`log_loss_runs`, which ``SNRMonitor`` calls at
the three hooks right before Lightning logs): the step values at a training logging step, the training epoch
values (``train_loss_epoch``) at the end of an epoch, the validation values at the end of a validation. So a
sub-run holds exactly the points of its tag in the run, no value twice. Not copied: what Lightning logs at
other moments (values the module logs in its own ``on_train_epoch_end``, which runs after the callbacks';
``on_step`` values of ``validation_step``) or outside ``fit``, and what is written to a logger directly.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from snrmon.callbacks._lightning import logged_now, logging_step, should_log, step_of_last_batch, window_ends

LOSS_TAG = "~snr/loss"  # the tag every sub-run holds its loss under
HOOKS = ("on_train_batch_end", "on_train_epoch_end", "on_validation_end")

# Per TensorBoard logger, its sub-runs by loss tag; None after a failed write (no more tries in that fit).
_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _LossRun:
    writer: object  # a SummaryWriter on the sub-run's folder
    folder: str  # that folder, relative to the run's
    step: int | None = None  # the last step written: with several monitors on a trainer, each value once


def is_loss(tag: str) -> bool:
    """Whether logged ``tag`` is a loss: "loss" in its name, in any case (``val_loss``, ``Loss/val``)."""
    return "loss" in tag.lower()


def sub_run(tag: str) -> str:
    """The sub-run, a path relative to the run's folder, that loss ``tag`` is copied to: the tag, its slashes
    as folders (``loss/val``), any character but a letter, digit, ``.``, ``-`` or ``_`` replaced by ``_``
    (a second tag with the same sub-run in a fit gets ``_2`` after it)."""
    parts = [re.sub(r"[^\w.\-]", "_", part) for part in tag.split("/")]
    return "/".join(part for part in parts if part.strip(".")) or "_"  # no "", "." or "..": stays below


def _free(folder: str, taken: set[str]) -> str:
    """``folder``, or ``folder_2``, ``folder_3``, ... if another loss tag has it (``val loss`` and
    ``val_loss`` name the same sub-run): two losses in one sub-run would be drawn as one zig-zag line."""
    name, n = folder, 1
    while name in taken:
        n += 1
        name = f"{folder}_{n}"
    return name


def log_loss_runs(trainer: Trainer, hook: str) -> None:
    """Copy the losses Lightning logs right after ``hook`` (one of :data:`HOOKS`, called from that hook on
    every rank) to their sub-runs, for the trainer's TensorBoard loggers, on global rank zero. Their floats
    are the ones Lightning's logging makes of the same tensors right after; at other training steps, nothing
    is read."""
    if hook not in HOOKS:
        raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
    loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    if not loggers or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
        return
    if hook == "on_train_batch_end" and not (window_ends(trainer) and should_log(trainer)):
        return  # Lightning logs no step values after this batch
    losses = {tag: value for tag, value in logged_now(trainer).items() if is_loss(tag)}  # every rank
    if not losses or not trainer.is_global_zero:
        return
    # Lightning logs epoch values at the step of the epoch's last batch, after counting that batch.
    step = step_of_last_batch(trainer) if hook == "on_train_epoch_end" else logging_step(trainer)
    values = {tag: float(value) for tag, value in losses.items()}
    for logger in loggers:
        if _RUNS.get(logger, {}) is None:
            continue  # a write failed in this fit
        try:
            _write(logger, values, step)
        except Exception as error:  # a copy for the charts never stops a training run
            _close(logger)
            _RUNS[logger] = None
            rank_zero_warn(
                f"snrmon: the losses' TensorBoard sub-runs under {logger.log_dir} are not written further "
                f"({type(error).__name__}: {error}); the run's own loss curves are not affected"
            )


def _write(logger: TensorBoardLogger, values: dict[str, float], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter  # as TensorBoardLogger writes

    runs = _RUNS.setdefault(logger, {})
    for tag, value in values.items():
        if tag not in runs:
            folder = _free(sub_run(tag), {run.folder for run in runs.values()})
            runs[tag] = _LossRun(SummaryWriter(os.path.join(logger.log_dir, folder)), folder)
        run = runs[tag]
        if run.step != step:
            run.writer.add_scalar(LOSS_TAG, value, step)
            run.writer.flush()  # as TensorBoardLogger flushes at each logging call
            run.step = step


def close_loss_runs(trainer: Trainer) -> None:
    """Close the sub-runs' writers of the trainer's TensorBoard loggers (at the end of a fit): a later fit
    with the same logger opens new ones."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _close(logger)
            _RUNS.pop(logger, None)


def _close(logger: TensorBoardLogger) -> None:
    for run in (_RUNS.get(logger) or {}).values():
        run.writer.close()
