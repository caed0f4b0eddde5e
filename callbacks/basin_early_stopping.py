r"""
Basin early stopping
^^^^^^^^^^^^^^^^^^^^

Forecast where a monitored loss turns up (the basin of the Shannon law, T9-T10) and warn, or stop, before
training goes far past it. The forecaster is framework-free (:class:`snrmon.forecast.BasinForecaster`); this
module is its Lightning adapter.

"""

from __future__ import annotations

import logging
import math
import numbers
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from snrmon.callbacks._figures import Publisher
from snrmon.callbacks.snr_monitor import SNRMonitor
from snrmon.forecast import BasinForecaster, Forecast
from snrmon.forecast.display import as_metric, projection_as_metric
from snrmon.forecast.forecaster import CONFIDENCE, HORIZON, MIN_POINTS
from snrmon.forecast.watch import BasinWatch

log = logging.getLogger(__name__)
FIGURE_SECONDS = 30.0  # between two figures of forecasts that change no state


class BasinEarlyStopping(Callback):
    r"""Forecast the basin of a monitored loss and stop training once it is reached, or about to be.

    At every check (each validation, or every ``check_every_n_steps`` optimizer steps) the monitored value and
    the mean training loss since the previous check (taken from what ``training_step`` returns) are fed to a
    :class:`~snrmon.forecast.BasinForecaster`. It forecasts the basin D* with a band and decides:

    * **warning**: the basin is probably within ``horizon`` times the training done so far, or entered. A
      rank-zero warning names it (and a text entry on TensorBoard, W&B or MLflow records it, with a figure),
      repeated only when the state changes;
    * **stop**: the same with probability ``confidence``, and the monitored curve no longer falls
      significantly. Then ``trainer.should_stop`` is set (agreed across ranks: one rank deciding is enough,
      as in Lightning's ``EarlyStopping``), and the reason is said in an info line and a text entry
      ``snr/forecast/<monitor>/stop``.

    Logged each check: ``snr/forecast/<monitor>/d_star``, ``d_star_low``, ``d_star_high``, ``steps_to_basin``
    and ``p_basin`` (finite values only). The defaults were chosen by a benchmark of real runs and checked
    on runs recorded after they were fixed (docs/forecast.md, which also says where they fall short);
    ``BasinEarlyStopping(monitor="val_loss")`` is the intended use.

    Args:
        monitor: the logged metric to forecast, e.g. ``"val_loss"``.
        mode: ``"min"`` (default): lower is better, a loss; ``"max"``: higher is better, e.g. an accuracy,
            whose basin is where it peaks (the forecaster is fed the mirrored curve; messages quote the
            metric's own values).
        horizon: warn when the basin is forecast within ``horizon`` × the steps done so far, or entered.
        confidence: the probability of that needed to stop training.
        min_points: checks needed before the first forecast (no warning and no stop before).
        check_every_n_steps: check every n optimizer steps (for metrics logged during training, e.g. a probe)
            instead of after each validation. ``None``: after each validation. A check adds a point only when
            the metric has changed since the last one, and waits for a metric not logged yet (after a
            resume); one still missing after a validation or at the end is an error (``strict``) or a warning.
        verbose: log each forecast at INFO level (rank zero).
        prior: a fit of earlier runs (the path or dict of ``snrmon fit --json``, law ``shannon`` or
            ``shannon-run``): when it gives every constant of this run (``shannon`` needs ``n_params``), it
            forecasts D* from the first check and refits the family's law to this run from the fourth;
            else it only starts the law fit (a warning says so). See :func:`snrmon.forecast.load_prior`.
        n_params: this run's parameter count, to carry a ``shannon`` prior of other model sizes over to it.
        tokens_per_step: tokens per optimizer step (across ranks and accumulation), the unit of a prior's D;
            the forecast itself is in steps.
        strict: raise when ``monitor`` is not among the logged metrics at a check (else warn and skip).
        gradient_evidence: with an :class:`~snrmon.callbacks.SNRMonitor` among the trainer's callbacks that
            measures the training set's SNR (``dataset_snr`` = N|G|²/tr Σ, for a finite training set it
            announces), feed each new measurement to the forecaster: once it has been at most 1 at two
            consecutive measurements, the training set's gradient is no larger than its own sampling noise,
            which stands in for a widening generalization gap as the warning's evidence of memorisation
            (docs/forecast.md, "The training set's gradient"). ``False``: the curves alone. The monitor's
            estimate is brought up to date (and logged) at each check, one host sync, whatever its
            ``log_every_n_steps`` and the order of the callbacks.

    Raises:
        RuntimeError: at a check, if ``monitor`` was never logged (``strict``); the message lists the metrics
            that exist. With ``check_every_n_steps``: after a validation, or at the end of training, if it
            is still missing (without validation, a warning comes after the first whole epoch).
        RuntimeError: at fit start, if the checks follow validations and validation is off
            (``limit_val_batches=0`` or no ``validation_step``): no check would ever run (``strict``; else a
            warning).
        ValueError: a `monitor` that is not a non-empty string; invalid ``mode``, ``horizon`` (finite, at
            least 0), ``confidence``, ``min_points`` (a whole number, at least 10), ``n_params`` or
            ``check_every_n_steps``; ``tokens_per_step`` not a positive number; a flag (``verbose``,
            ``strict``, ``gradient_evidence``) not a bool.

    Attributes:
        stopping_reason: why training was stopped (``None`` while it was not).
        stopped_step: the global step at which it was stopped (0 while it was not).
        forecaster: the forecaster, whose ``history`` holds every forecast.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.callbacks import ModelCheckpoint
        >>> from snrmon.callbacks import BasinEarlyStopping
        >>> # Stopping happens a little after the basin: keep the best weights with a checkpoint.
        >>> best = ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=1)
        >>> trainer = Trainer(callbacks=[BasinEarlyStopping(monitor="val_loss"), best])
        >>> # after trainer.fit(...): the model at the basin is best.best_model_path
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "min",
        horizon: float = HORIZON,
        confidence: float = CONFIDENCE,
        min_points: int = MIN_POINTS,
        check_every_n_steps: int | None = None,
        verbose: bool = False,
        prior: dict | str | None = None,
        n_params: float | None = None,
        tokens_per_step: float = 1.0,
        strict: bool = True,
        gradient_evidence: bool = True,
    ) -> None:
        super().__init__()
        if check_every_n_steps is not None and (
            isinstance(check_every_n_steps, bool)
            or not isinstance(check_every_n_steps, numbers.Integral)
            or check_every_n_steps < 1
        ):
            raise ValueError(
                f"check_every_n_steps must be a positive integer or None, got {check_every_n_steps!r}"
            )
        for name, flag in (
            ("verbose", verbose),
            ("strict", strict),
            ("gradient_evidence", gradient_evidence),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.monitor, self.mode = monitor, mode
        self.check_every_n_steps = None if check_every_n_steps is None else int(check_every_n_steps)
        self.verbose, self.strict = verbose, strict
        self.gradient_evidence = gradient_evidence
        self._snr_monitor: SNRMonitor | None = None  # found at fit start (gradient_evidence)
        self._fed_steps: int | None = None  # the monitor's measured steps at the last value fed
        self._fed_snr = False  # a training-set SNR was fed in this fit
        # The forecaster, the mirroring of mode="max", and the wording of what a forecast means: shared with
        # the Hugging Face callback (snrmon.forecast.watch).
        self.watch = BasinWatch(
            monitor, mode, horizon, confidence, min_points, prior, n_params, tokens_per_step
        )
        self.stopping_reason: str | None = None
        self.stopped_step = 0
        self._drawn_step, self._drawn_at = -1, -math.inf  # the step and time of the last figure
        replay = ["--metric", monitor] + (["--mode", "max"] if self.watch.sign < 0 else [])  # snrmon forecast
        self._publisher = Publisher("BasinEarlyStopping", replay)  # figures and text to the loggers
        self._seen_metric = False  # the monitored metric has been logged in this fit (periodic checks)
        self._going_on, self._first_epoch = False, None  # (the fit's first epoch: periodic checks' warning)
        # A validation has run in this fit (checks after each validation); None: none will, said at fit start.
        self._validated: bool | None = False
        self._train_sum: torch.Tensor | None = None  # training loss summed on its device: no sync per step
        self._train_count = 0
        self._restored = False  # state loaded from a checkpoint for the coming (or this) fit
        self._ended_at_step = -1  # the global step at the end of the last fit
        self._last_metric: torch.Tensor | None = None  # the logged value of the last check after a validation

    @property
    def forecaster(self) -> BasinForecaster:
        return self.watch.forecaster

    @property
    def state_key(self) -> str:
        # "min" keeps the key of checkpoints written before `mode` existed.
        if self.mode == "min":
            return self._generate_state_key(monitor=self.monitor)
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # -- collecting the training loss ------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.forecaster.prior_note:
            rank_zero_warn(f"BasinEarlyStopping: {self.forecaster.prior_note}")
        self._seen_metric = self._validated = False  # (a callback may serve several fits)
        # A fit that goes on from a checkpoint (state loaded before this hook) or where this callback's last
        # fit ended (the same Trainer fitted again) keeps the curve; any other fit is a new run.
        going_on = self._restored or trainer.global_step != 0 and trainer.global_step == self._ended_at_step
        if not going_on:
            self.watch.reset()
            self.stopping_reason, self.stopped_step = None, 0
            self._train_sum, self._train_count, self._last_metric = None, 0, None
            self._drawn_step, self._drawn_at = -1, -math.inf
        self._restored = False
        monitors = [c for c in trainer.callbacks if isinstance(c, SNRMonitor) and self.gradient_evidence]
        self._snr_monitor, self._fed_steps = (monitors[0] if monitors else None), None
        if len(monitors) > 1:
            rank_zero_info(
                f"BasinEarlyStopping: {len(monitors)} SNRMonitors: the training-set SNR of the first (prefix "
                f"'{monitors[0].prefix}') is its evidence of memorisation, the others' are not read"
            )
        self._fed_snr = False  # a training-set SNR was fed in this fit
        self._publisher.start_fit()
        self._check_validation_runs(trainer, pl_module)
        self._going_on, self._first_epoch = going_on, None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Periodic checks without validation: a metric not logged in the fit's first whole epoch is likely
        # misnamed. Said then, as a warning (a metric logged every k steps, k beyond an epoch, is not), so
        # that a typo does not wait for the error at the end of training. The first epoch is known only
        # here: a checkpoint's epoch is restored after on_fit_start, and a fit that goes on may start in
        # the middle of one.
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if self.check_every_n_steps is None or self._seen_metric or self._should_skip(trainer):
            return
        if self._first_epoch is None:
            self._first_epoch = trainer.current_epoch + (1 if self._going_on else 0)
            return
        validates = trainer.limit_val_batches != 0 and is_overridden("validation_step", pl_module)
        missing = self.monitor not in trainer.callback_metrics
        if not validates and missing and trainer.current_epoch == self._first_epoch + 1:
            names = ", ".join(f"`{k}`" for k in trainer.callback_metrics) or "(none yet)"
            rank_zero_warn(
                f"BasinEarlyStopping(check_every_n_steps={self.check_every_n_steps}): `{self.monitor}` was "
                f"not logged in a whole epoch; the logged metrics: {names}. Misnamed? (It is an error at the "
                "end of training if it never is.)",
                category=RuntimeWarning,
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning restores callbacks for validate and test too (ckpt_path=): a checkpoint loaded there is
        # no fit to go on from, and what this callback held (a finished fit's curve and stop) comes back.
        if stage != "fit" and self._restored:
            self.load_state_dict(self._before_restore)
            self._restored = False

    def _check_validation_runs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks after each validation need validations: without them the callback would never check, and
        never say so (Lightning's EarlyStopping fails on its missing metric instead)."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if self.check_every_n_steps is not None or self._should_skip(trainer):
            return
        if trainer.limit_val_batches == 0:
            why = "limit_val_batches=0 turns validation off"
        elif not is_overridden("validation_step", pl_module):
            why = "the model has no validation_step"
        else:
            return
        message = (
            f"BasinEarlyStopping checks `{self.monitor}` after each validation, but {why}: it would never "
            "check. Enable validation, or pass check_every_n_steps= for a metric logged while training"
        )
        if self.strict:
            raise RuntimeError(message)
        rank_zero_warn(message, category=RuntimeWarning)
        self._validated = None  # said: not again at the end

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach().float()
            if pl_module.automatic_optimization:  # Lightning hands over loss / accumulate_grad_batches
                loss = loss * trainer.accumulate_grad_batches
            # A non-finite batch loss (one bad batch) is left out of the mean, on the device (no sync): else
            # the interval's mean is NaN, and the forecaster loses the ratio for a window of checks.
            finite = torch.isfinite(loss)
            loss, counted = torch.where(finite, loss, 0.0), finite.float()
            if self._train_sum is None:
                self._train_sum, self._train_count = loss, counted
            else:
                self._train_sum, self._train_count = self._train_sum + loss, self._train_count + counted
        n = self.check_every_n_steps
        if n is not None and trainer.global_step % n == 0 and not self._should_skip(trainer):
            self._check(trainer, periodic=True)

    def _check_logged(self, trainer: pl.Trainer) -> None:
        # Periodic checks wait for a metric not logged yet (e.g. after a resume, until the next validation);
        # one still missing after a validation, or by the end of training, is misnamed or never logged.
        if self.check_every_n_steps is None or self._seen_metric or self._should_skip(trainer):
            return
        if self.monitor not in trainer.callback_metrics:
            self._missing(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ended_at_step = trainer.global_step
        forecast_made = any(f.d_star is not None for f in self.forecaster.history)
        if self.forecaster.points.x and not forecast_made:
            rank_zero_info(
                f"BasinEarlyStopping: the fit ended after {len(self.forecaster.points.x)} checks of "
                f"`{self.monitor}`, before the first forecast ({self.forecaster.min_points} points needed): "
                "no warning or stop could come"
            )
        elif self._snr_monitor is not None and not self._fed_snr and forecast_made:
            rank_zero_info(
                "BasinEarlyStopping: the SNRMonitor gave no training-set SNR in this fit (`dataset_snr` "
                "needs two batch sizes a step, from gradient accumulation or several devices, and a finite "
                "training set it announces): the forecast used the curves alone"
            )
        self._restored = False  # (strategies that restore after setup load the state after on_fit_start)
        self._check_logged(trainer)
        if self.check_every_n_steps is None and self._validated is False and not self._should_skip(trainer):
            # e.g. no validation data loader, or check_val_every_n_epoch beyond max_epochs
            rank_zero_warn(
                f"BasinEarlyStopping: no validation ran during this fit: `{self.monitor}` was never checked",
                category=RuntimeWarning,
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_every_n_steps is None and not self._should_skip(trainer):
            self._validated = True
            self._check(trainer)
        self._check_logged(trainer)

    @staticmethod
    def _should_skip(trainer: pl.Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or bool(trainer.fast_dev_run)

    def _mean_train_loss(self, trainer: pl.Trainer) -> float | None:
        """The training loss since the last check, averaged over the steps and across ranks: every rank then
        forecasts from the same curve (and a rank's small shard adds less noise). NaN, hence None, when a
        ``training_step`` returned no loss; every rank joins the reduction either way."""
        device = trainer.strategy.root_device
        if self._train_sum is None:
            local = torch.tensor(math.nan, device=device)
        else:  # (no finite batch loss in the interval: 0/0, NaN)
            local = (self._train_sum / self._train_count).to(device)
        self._train_sum, self._train_count = None, 0
        value = float(trainer.strategy.reduce(local, reduce_op="mean").item())
        return value if math.isfinite(value) else None

    def _dataset_snr(self, trainer: pl.Trainer) -> float | None:
        """The SNRMonitor's training-set SNR, brought up to date at this check, when it has measured steps
        since the value last fed (the same estimate read at two checks is one measurement, not two); None
        otherwise. Every rank reads the same value: the monitor's estimates are reduced across ranks."""
        monitor = self._snr_monitor
        if monitor is None:
            return None
        monitor.refresh(trainer, trainer.lightning_module)  # (not only as of its last logging step)
        if not monitor.latest or monitor.latest_steps == self._fed_steps:
            return None
        self._fed_steps = monitor.latest_steps
        value = monitor.latest.get(f"{monitor.prefix}/dataset_snr")
        self._fed_snr |= value is not None
        return None if value is None else float(value)

    # -- one check ---------------------------------------------------------------------------------------

    def _missing(self, trainer: pl.Trainer) -> None:
        names = ", ".join(f"`{k}`" for k in trainer.callback_metrics) or "(none yet)"
        message = (
            f"BasinEarlyStopping is conditioned on metric `{self.monitor}`, which is not available. Pass "
            f"`monitor=` one of the logged metrics: {names}"
        )
        if self.strict:
            raise RuntimeError(message)
        rank_zero_warn(message, category=RuntimeWarning)

    def _check(self, trainer: pl.Trainer, periodic: bool = False) -> None:
        # Under DDP every rank must join every collective of a check (the agreement below, the training
        # loss's reduction, the stop decision), whatever its own data says: a rank that returned early would
        # leave the others waiting forever. So the early returns depend only on what every rank shares (the
        # global step and the points added so far, which every rank adds alike), and a rank's own view of
        # the metric enters through a collective.
        metrics = trainer.callback_metrics
        present = self.monitor in metrics
        if not present and not periodic:
            self._missing(trainer)
            return
        self._seen_metric |= present
        x = float(trainer.global_step)
        if not self.watch.is_new_step(x):
            return  # no new training since the last check (e.g. two validations at the same step)
        value = float(metrics[self.monitor].squeeze().float().item()) if present else math.nan
        mirrored = self.watch.sign * value
        if periodic:
            # A point only when the metric has been logged again since the last check (a validation metric
            # checked every step repeats its stale value). A per-rank metric can repeat on one rank by chance
            # while it changed on another: one rank with a new value makes it a point on every rank.
            previous = self.forecaster.points.loss[-1] if self.forecaster.points.loss else None
            new = present and mirrored != previous
        else:
            # After a validation that did not log the metric (logged every few epochs), Lightning still holds
            # the last value, the same tensor: not a new point. (A value that repeats but was logged again is
            # a new tensor, and a point.)
            logged = metrics[self.monitor]
            new = logged is not self._last_metric
            self._last_metric = logged
        if not trainer.strategy.reduce_boolean_decision(new, all=False):
            return
        forecast = self.watch.update(x, value, self._mean_train_loss(trainer), self._dataset_snr(trainer))
        note = self.watch.nonfinite_note(value, int(x))
        if note is not None:
            rank_zero_warn(f"BasinEarlyStopping: {note}", category=RuntimeWarning)
        if not math.isfinite(value):
            log.debug("BasinEarlyStopping: %s is %s at step %d: skipped", self.monitor, value, int(x))
        elif forecast.d_star is None:
            log.debug("BasinEarlyStopping: no forecast at step %d (%s)", int(x), forecast.note)
        self._say_nonpositive(value, int(x))
        self._log(trainer, forecast)
        self._announce(trainer, forecast)
        if forecast.d_star is not None:
            self._draw(trainer, every=FIGURE_SECONDS)
        departure = self.watch.departure_note(forecast)
        if departure is not None:
            rank_zero_warn(f"BasinEarlyStopping: {departure}")
        self._decide_stop(trainer, forecast)

    def _decide_stop(self, trainer: pl.Trainer, forecast: Forecast) -> None:
        """One rank deciding to stop is enough (as in Lightning's EarlyStopping); every rank then holds the
        deciding rank's reason, not its own (which may read "improving")."""
        local = torch.tensor([float(bool(forecast.stop))], device=trainer.strategy.root_device)
        decisions = trainer.strategy.all_gather(local).reshape(-1).tolist()  # one per rank, on every rank
        if not any(decisions):
            return
        deciding = decisions.index(1.0)  # the lowest deciding rank: the same on every rank
        # (None: not this rank's decision, replaced by the deciding rank's)
        reason = self.watch.stop_reason(forecast) if forecast.stop else None
        reason = trainer.strategy.broadcast(reason, src=deciding)
        if trainer.should_stop:
            return  # stopped already (another callback)
        trainer.should_stop = True
        self.stopped_step = trainer.global_step
        self.stopping_reason = reason
        said = f"BasinEarlyStopping: stopping at step {self.stopped_step}: {self.stopping_reason}"
        rank_zero_info(said)
        # (its own tag: a warning's text may have the same step, and MLflow names a text by tag and step)
        self._publisher.text(trainer, f"snr/forecast/{self.monitor}/stop", said, self.stopped_step)
        self._draw(trainer)

    def _say_nonpositive(self, value: float, step: int) -> None:
        """The loss-only forecast (no training loss from training_step) skips values <= 0; said once, with
        the reason, instead of a forecaster that never forecasts."""
        note = self.watch.nonpositive_note(value, step, "training_step returns no training loss")
        if note is not None:
            rank_zero_warn(
                f"BasinEarlyStopping: {note}. Return the training loss from training_step (the ratio "
                "forecast takes any sign), or monitor a positive loss",
                category=RuntimeWarning,
            )

    def _log(self, trainer: pl.Trainer, forecast: Forecast) -> None:
        values = self.watch.metrics(forecast)  # (with the training-loss mean it was fed, across ranks)
        if values and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
        if self.verbose:
            rank_zero_info(f"BasinEarlyStopping: step {trainer.global_step}: {self.watch.describe(forecast)}")

    def _announce(self, trainer: pl.Trainer, forecast: Forecast) -> None:
        announcement = self.watch.announcement(forecast)
        if announcement is None:
            return
        text = f"BasinEarlyStopping: {announcement}"
        rank_zero_warn(text)
        self._publisher.text(trainer, f"snr/forecast/{self.monitor}", text, trainer.global_step)
        self._draw(trainer)

    def _draw(self, trainer: pl.Trainer, every: float = 0.0) -> None:
        """The forecast so far as a logged figure (curve, the curve ahead with its band and the basin,
        the forecast D* over time, warning, stop): at each change of state and at the stop, and at the other
        forecasts when ``every`` seconds have passed since the last figure (a figure costs about 0.3 s on a
        2-core CPU: nothing at validation time, much at ``check_every_n_steps=1``)."""
        if trainer.global_step == self._drawn_step or time.monotonic() - self._drawn_at < every:
            return  # (a change of state and the stop at one check: one figure)
        self._drawn_step, self._drawn_at = trainer.global_step, time.monotonic()
        tag = f"snr/forecast/{self.monitor}/figure"
        self._publisher.figure(trainer, tag, self._figure, trainer.global_step)

    def _figure(self) -> Any:
        """The forecast figure (a matplotlib ``Figure``), or None without matplotlib."""
        try:
            from snrmon.forecast.plot import forecast_figure

            sign = self.watch.sign
            history = [as_metric(f, sign) for f in self.forecaster.history]  # the metric's own values
            projection = projection_as_metric(self.forecaster.projection, sign)
            return forecast_figure(history, self.monitor, projection=projection)
        except ImportError:  # matplotlib is optional (the plot extra)
            log.debug("BasinEarlyStopping: no matplotlib, no forecast figure")
            return None

    # -- checkpointing -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # The training loss since the last check goes too: a resume mid-interval then feeds the next check
        # the mean over the whole interval, as without the interruption.
        train_sum = None if self._train_sum is None else float(self._train_sum)
        return self.watch.state_dict() | {
            "stopping_reason": self.stopping_reason,
            "stopped_step": self.stopped_step,
            "train_sum": train_sum,
            "train_count": float(self._train_count),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        needed = ("forecaster", "announced", "stopping_reason", "stopped_step")
        missing = [key for key in needed if key not in state_dict]
        forecaster = state_dict.get("forecaster")
        if isinstance(forecaster, dict):
            needed = ("points", "history", "theta", "searched_at", "streaks")
            missing += [f"forecaster's {key}" for key in needed if key not in forecaster]
        if missing:  # refused before anything is changed: a half-loaded state would be no state at all
            raise ValueError(f"not a BasinEarlyStopping state: it lacks {', '.join(missing)}")
        self._before_restore = self.state_dict()  # (put back if this load was only to validate or test)
        self.watch.load_state_dict(state_dict)
        self.stopping_reason = state_dict["stopping_reason"]
        self.stopped_step = state_dict["stopped_step"]
        train_sum = state_dict.get("train_sum")  # (absent from checkpoints of snrmon <= 0.1)
        self._train_sum = None if train_sum is None else torch.tensor(train_sum)
        self._train_count = torch.tensor(float(state_dict.get("train_count", 0)))
        self._restored = True
