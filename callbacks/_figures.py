"""Publish a matplotlib figure and a text to every logger of the trainer that takes them.

* TensorBoard (a logger whose ``experiment`` is a ``SummaryWriter``, as ``TensorBoardLogger``'s is):
  ``add_figure`` and ``add_text`` at the step, TensorBoard's own slider over steps.
* W&B (``WandbLogger``): ``log_image`` (a ``wandb.Image``) and ``log_text`` (a one-row table, step and text),
  Lightning's calls, which record the step as ``trainer/global_step`` beside W&B's own step.
* MLflow (``MLFlowLogger``): artifacts of the run, one file per step so that none overwrites another:
  ``<tag>/step_00000120.png`` (``MlflowClient.log_figure``) and ``<tag>/step_00000120.txt`` (``log_text``).

Other loggers (``CSVLogger``, ...) take neither: once per fit, at the first figure or text, one rank-zero info
line names them and the command that draws the figure from their log (``snrmon forecast ... --plot``).
Publishing happens on rank zero only. A logger that fails to take one (a tracking server down) is warned about
once per fit and skipped: a figure is never worth a crashed training run.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


def _kind(logger: Logger) -> str | None:
    """How the logger takes a figure and a text: "wandb", "mlflow", "tensorboard", or None (it does not)."""
    if isinstance(logger, WandbLogger):
        return "wandb"
    if isinstance(logger, MLFlowLogger):
        return "mlflow"
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_figure") and hasattr(experiment, "add_text"):  # a SummaryWriter
        return "tensorboard"
    return None


def _artifact(tag: str, step: int, suffix: str) -> str:
    return f"{tag}/step_{step:08d}{suffix}"  # zero-padded: the artifact browser lists them in step order


class Publisher:
    """Sends one owner's figures and texts to the trainer's loggers (see the module's docstring).

    Args:
        owner: the name that starts the info line, e.g. ``"BasinEarlyStopping"``.
        replay: the arguments of ``snrmon forecast`` after the log's path that redraw the figure, e.g.
            ``["--metric", "val_loss"]``.
    """

    def __init__(self, owner: str, replay: list[str]) -> None:
        self.owner, self.replay = owner, replay
        self._said: set[str] = set()  # what was said in this fit: the info line, a logger that failed

    def start_fit(self) -> None:
        """A new fit: the info line and the failures are said again."""
        self._said.clear()

    def figure(self, trainer: pl.Trainer, tag: str, draw: Callable[[], Any], step: int) -> None:
        """Draws the figure (``draw()``, a matplotlib ``Figure`` or ``None`` when there is none) only when a
        logger takes it, and hands it to each such logger."""
        loggers = self._loggers(trainer)
        if not loggers or (figure := draw()) is None:
            return
        for logger, kind in loggers:
            with self._guard(logger):
                if kind == "tensorboard":
                    logger.experiment.add_figure(tag, figure, step)
                elif kind == "wandb":
                    logger.log_image(key=tag, images=[figure], step=step)
                else:
                    logger.experiment.log_figure(logger.run_id, figure, _artifact(tag, step, ".png"))

    def text(self, trainer: pl.Trainer, tag: str, text: str, step: int) -> None:
        for logger, kind in self._loggers(trainer):
            with self._guard(logger):
                if kind == "tensorboard":
                    logger.experiment.add_text(tag, text, step)
                elif kind == "wandb":
                    logger.log_text(key=tag, columns=["step", "text"], data=[[step, text]], step=step)
                else:
                    logger.experiment.log_text(logger.run_id, text, _artifact(tag, step, ".txt"))

    def _loggers(self, trainer: pl.Trainer) -> list[tuple[Logger, str]]:
        """The loggers that take figures and texts, with their kind, on rank zero (none elsewhere); says
        once per fit which loggers do not."""
        if not trainer.is_global_zero:
            return []
        kinds = []
        for logger in trainer.loggers:
            with self._guard(logger):  # `experiment` may raise (a tracking server gone since the fit began)
                kinds.append((logger, _kind(logger)))
        others = [logger for logger, kind in kinds if kind is None]
        if others and "others" not in self._said:
            self._said.add("others")
            names = ", ".join(type(logger).__name__ for logger in others)
            take = "takes" if len(others) == 1 else "take"
            command = shlex.join(["snrmon", "forecast", _log_path(others[0]), *self.replay])
            rank_zero_info(
                f"{self.owner}: {names} {take} no figures or text (TensorBoard, W&B and MLflow do): the "
                f"forecast figure of this run is drawn by `{command} --plot forecast.png`"
            )
        return [(logger, kind) for logger, kind in kinds if kind is not None]

    @contextmanager
    def _guard(self, logger: Logger) -> Iterator[None]:
        """A logger that fails to take a figure or text is warned about once per fit, and skipped."""
        try:
            yield
        except Exception as error:
            name = type(logger).__name__
            if name not in self._said:
                self._said.add(name)
                rank_zero_warn(f"{self.owner}: {name} failed to take a figure or text: {error!r}")


def _log_path(logger: Logger) -> str:
    """The log ``snrmon forecast`` reads: a CSVLogger's metrics.csv, else the logger's directory."""
    if isinstance(logger, CSVLogger):
        return os.path.join(logger.log_dir, "metrics.csv")
    return getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or "RUN_LOG"
