r"""
Basin early stopping callback for the Hugging Face Trainer
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Forecast where the evaluation loss turns up and stop ``Trainer.train()`` there, with the forecaster and
defaults of the Lightning ``BasinEarlyStopping`` (both drive :class:`snrmon.forecast.watch.BasinWatch`).

"""

from __future__ import annotations

import math
import warnings
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from snrmon.forecast.forecaster import CONFIDENCE, HORIZON, MIN_POINTS, BasinForecaster
from snrmon.forecast.watch import BasinWatch

log = logging.get_logger(__name__)


class BasinEarlyStoppingCallback(TrainerCallback, ExportableState):
    r"""Forecast the basin of an evaluation metric and stop training once it is reached, or about to be.

    At every evaluation, the metric (``eval_loss`` by default) and the mean of the training losses the Trainer
    logged since the previous evaluation are fed to the forecaster of ``BasinEarlyStopping``. It forecasts the
    basin D* (in optimizer steps) with a band and decides:

    * **warning**: the basin is probably within ``horizon`` times the training done so far, or entered (a
      warning on the main process, repeated only when the state changes);
    * **stop**: the same with probability ``confidence``, and the metric no longer falls significantly. Then
      ``control.should_training_stop`` is set. Every process forecasts from the same logged values (the
      Trainer gathers both the training and the evaluation loss), so all decide alike.

    The check runs in ``on_log`` of the evaluation's log, before ``on_evaluate``: the forecast's values
    (``snr/forecast/<monitor>/d_star``, ``d_star_low``, ``d_star_high``, ``steps_to_basin``, ``p_basin`` and
    the ``train_loss`` it was fed) join that log, in ``trainer.state.log_history`` and, when the callback is
    added with :func:`~snrmon.callbacks.transformers.add_callbacks`, in what the reporting integrations
    (``report_to``) send. For the training loss at every check, log at least as often as you evaluate
    (``logging_steps`` <= ``eval_steps``): a check with none since the previous one forecasts from the
    metric alone.

    Its state (the points, forecasts, stop) is saved in the checkpoint's ``TrainerState``
    (``stateful_callbacks``) and restored on ``train(resume_from_checkpoint=...)``, whether or not
    ``restore_callback_states_from_checkpoint`` is set (when it is, the Trainer replaces the callback by a new
    instance: read the state from ``trainer.callback_handler``, not from the object you passed).

    Args:
        monitor: the evaluation metric, as the Trainer logs it (``eval_`` and the name).
        mode: ``"min"`` (a loss) or ``"max"`` (higher is better, e.g. ``eval_accuracy``).
        horizon, confidence, min_points, prior, n_params, tokens_per_step: as for the Lightning
            ``BasinEarlyStopping`` (the same defaults).
        verbose: log each forecast at INFO level (the main process).
        strict: raise at the first evaluation without ``monitor``. By default it warns once and the run goes
            on without forecasts, as the Trainer's own ``EarlyStoppingCallback`` does: the Trainer has no
            sanity check, and the first evaluation may come hours into a run.
        gradient_evidence: with an ``SNRMonitorCallback`` that logs the training set's SNR (``dataset_snr``),
            feed the latest value logged since the previous check to the forecaster: as for the Lightning
            ``BasinEarlyStopping``, at most 1 at two consecutive values is the warning's evidence of
            memorisation. ``False``: the curves alone.

    Raises:
        ValueError: an invalid ``mode``, ``horizon``, ``confidence`` or ``min_points``.
        RuntimeError: at train start, when evaluation is off (``eval_strategy="no"``: it would never check,
            and the Trainer's ``EarlyStoppingCallback`` refuses it too); with ``strict``, see above.

    Attributes:
        stopping_reason: why training was stopped (``None`` while it was not).
        stopped_step: the global step at which it was stopped (0 while it was not).
        forecaster: the forecaster, whose ``history`` holds every forecast.

    Example::

        >>> from transformers import Trainer, TrainingArguments
        >>> from snrmon.callbacks.transformers import BasinEarlyStoppingCallback, add_callbacks
        >>> args = TrainingArguments("out", eval_strategy="steps", eval_steps=50, logging_steps=50)
        >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)  # doctest: +SKIP
        >>> add_callbacks(trainer, BasinEarlyStoppingCallback())  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        monitor: str = "eval_loss",
        mode: str = "min",
        horizon: float = HORIZON,
        confidence: float = CONFIDENCE,
        min_points: int = MIN_POINTS,
        verbose: bool = False,
        prior: dict | str | None = None,
        n_params: float | None = None,
        tokens_per_step: float = 1.0,
        strict: bool = False,
        gradient_evidence: bool = True,
    ) -> None:
        self.init_args = {
            "monitor": monitor,
            "mode": mode,
            "horizon": horizon,
            "confidence": confidence,
            "min_points": min_points,
            "verbose": verbose,
            "prior": prior,
            "n_params": n_params,
            "tokens_per_step": tokens_per_step,
            "strict": strict,
            "gradient_evidence": gradient_evidence,
        }
        self.gradient_evidence = gradient_evidence
        self.monitor, self.mode, self.verbose, self.strict = monitor, mode, verbose, strict
        self.watch = BasinWatch(
            monitor, mode, horizon, confidence, min_points, prior, n_params, tokens_per_step
        )
        self.stopping_reason: str | None = None
        self.stopped_step = 0
        self.ahead_of_integrations = False  # set by add_callbacks
        # The training losses logged since the last check: Σ loss × steps it covers, and those steps.
        self._train_sum, self._train_steps, self._train_logged_at = 0.0, 0, 0
        self._training = False
        self._seen_metric = self._said_nonfinite = self._said_no_train = self._said_missing = False

    @property
    def forecaster(self) -> BasinForecaster:
        return self.watch.forecaster

    # -- the Trainer's events ----------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._restore(state)
        self._training, self._seen_metric, self._said_nonfinite = True, False, False
        self._said_no_train = self._said_missing = False
        # The Trainer's next logged loss covers the steps from here (on a resume, those since the checkpoint).
        self._train_logged_at = state.global_step
        if self.forecaster.prior_note:
            self._warn(f"BasinEarlyStoppingCallback: {self.forecaster.prior_note}", state)
        if args.eval_strategy == "no":
            message = (
                f"BasinEarlyStoppingCallback checks `{self.monitor}` at each evaluation, but "
                "eval_strategy='no' turns evaluation off: it would never check. Set eval_strategy='steps' "
                "(and eval_steps)"
            )
            raise RuntimeError(message)
        if args.report_to and not self.ahead_of_integrations:
            self._warn(
                "BasinEarlyStoppingCallback: its forecasts reach trainer.state.log_history, but not "
                f"report_to={args.report_to}, whose callbacks read the logs first: add it with "
                "snrmon.callbacks.transformers.add_callbacks(trainer, ...) to put it ahead of them",
                state,
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if not self._training or logs is None:
            return control
        if "loss" in logs:  # a training log: the mean loss over the steps since the previous one
            steps = state.global_step - self._train_logged_at
            if steps > 0 and math.isfinite(logs["loss"]):
                self._train_sum += logs["loss"] * steps
                self._train_steps += steps
            self._train_logged_at = state.global_step
        if self.monitor in logs:
            self._seen_metric = True
            self._check(state, control, logs)
        return control

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        missing = metrics is not None and self.monitor not in metrics and not self._seen_metric
        if self._training and missing and not (self._said_missing and not self.strict):
            self._said_missing = True  # (once a fit, not at every evaluation)
            names = ", ".join(f"`{k}`" for k in metrics) or "(none)"
            message = (
                f"BasinEarlyStoppingCallback is conditioned on metric `{self.monitor}`, which the evaluation "
                f"did not give. Pass `monitor=` one of its metrics: {names}"
            )
            if self.strict:
                raise RuntimeError(message)
            self._warn(message, state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._training = False

    # -- one check ---------------------------------------------------------------------------------------

    def _check(self, state: TrainerState, control: TrainerControl, logs: dict[str, float]) -> None:
        step = state.global_step
        if not self.watch.is_new_step(step):
            return  # no new training since the last check
        value = float(logs[self.monitor])
        if not math.isfinite(value) and not self._said_nonfinite:
            self._said_nonfinite = True  # (the forecaster skips such a point; said once, not at every one)
            self._warn(
                f"BasinEarlyStoppingCallback: `{self.monitor}` is {value} at step {step}: such points are "
                "skipped, no forecast comes from them",
                state,
            )
        train = self._train_sum / self._train_steps if self._train_steps else None
        if train is None and not self._said_no_train:
            self._said_no_train = True  # (once: whatever the strategies, shares or epochs that caused it)
            self._warn(
                f"BasinEarlyStoppingCallback: no training loss was logged since the previous check (step "
                f"{step}): the training loss reaches it at the Trainer's training logs only, and a check "
                "without one forecasts from the monitored loss alone (the weaker law). Log at least as often "
                "as you evaluate (logging_steps <= eval_steps)",
                state,
            )
        self._train_sum, self._train_steps = 0.0, 0
        forecast = self.watch.update(step, value, train, self._dataset_snr(state))
        values = self.watch.metrics(forecast)
        logs.update(values)
        # Trainer.log copied `logs` into log_history just before this event: that entry gets the values too.
        if state.log_history and state.log_history[-1].get("step") == step:
            state.log_history[-1].update(values)
        note = self.watch.nonpositive_note(value, step, "no training loss was logged since the last check")
        if note is not None:
            self._warn(
                f"BasinEarlyStoppingCallback: {note}. Log the training loss at least as often as "
                "you evaluate (logging_steps <= eval_steps), or monitor a positive loss",
                state,
            )
        if self.verbose and state.is_world_process_zero:
            log.info(f"BasinEarlyStoppingCallback: step {step}: {self.watch.describe(forecast)}")
        announcement = self.watch.announcement(forecast)
        if announcement is not None:
            self._warn(f"BasinEarlyStoppingCallback: {announcement}", state, RuntimeWarning)
        departure = self.watch.departure_note(forecast)
        if departure is not None:
            self._warn(f"BasinEarlyStoppingCallback: {departure}", state)
        if forecast.stop and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_step = step
            self.stopping_reason = self.watch.stop_reason(forecast)
            if state.is_world_process_zero:
                log.warning(f"BasinEarlyStoppingCallback: stopping at step {step}: {self.stopping_reason}")

    def _dataset_snr(self, state: TrainerState) -> float | None:
        """The training set's SNR an ``SNRMonitorCallback`` logged since the previous check (the latest), or
        None. Read from ``log_history``, where that callback adds its values to each training log whatever
        the callbacks' order: by the evaluation's check they are there."""
        if not self.gradient_evidence:
            return None
        previous = self.forecaster.points.x[-1] if self.forecaster.points.x else -math.inf
        for entry in reversed(state.log_history):
            if entry.get("step", -math.inf) <= previous:
                break
            # The total's key (per-group keys have one more level), not what this callback logs itself.
            keys = [k for k in entry if k.endswith("dataset_snr") and not k.startswith("snr/forecast/")]
            if keys:
                return float(entry[min(keys, key=lambda k: k.count("/"))])
        return None

    def _warn(self, message: str, state: TrainerState, category: type[Warning] = UserWarning) -> None:
        if state.is_world_process_zero:
            warnings.warn(message, category, stacklevel=3)

    # -- state across resume -----------------------------------------------------------------------------

    def state(self) -> dict:
        """What the checkpoint's ``TrainerState`` saves (JSON): the arguments, and the state in ``saved``."""
        return {"args": dict(self.init_args), "attributes": {"saved": self.saved}}

    @property
    def saved(self) -> dict[str, Any]:
        """The state to carry across a resume (also what the Trainer sets back, by name, when
        ``restore_callback_states_from_checkpoint`` is on)."""
        return self.watch.state_dict() | {
            "stopping_reason": self.stopping_reason,
            "stopped_step": self.stopped_step,
            "train_sum": self._train_sum,
            "train_steps": self._train_steps,
        }

    @saved.setter
    def saved(self, state: dict[str, Any]) -> None:
        self.watch.load_state_dict(state)
        self.stopping_reason = state["stopping_reason"]
        self.stopped_step = state["stopped_step"]
        self._train_sum, self._train_steps = state["train_sum"], state["train_steps"]

    def _restore(self, state: TrainerState) -> None:
        """Load this callback's entry of ``state.stateful_callbacks``: the checkpoint's on a resume, else what
        the Trainer took from this callback when it began (loading it changes nothing)."""
        entries = (state.stateful_callbacks or {}).get(type(self).__name__, [])
        entries = entries if isinstance(entries, list) else [entries]
        for entry in entries:
            args = entry.get("args", {})
            if args.get("monitor") == self.monitor and args.get("mode") == self.mode:
                self.saved = entry["attributes"]["saved"]
                return
