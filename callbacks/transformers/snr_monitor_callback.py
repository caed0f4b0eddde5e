r"""
SNR monitor callback for the Hugging Face Trainer
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Measures gradient signal |G|² and noise tr(Σ) in ``Trainer.train()`` with :class:`snrmon.GradientMeter`, the
same protocol as the Lightning ``SNRMonitor``; this module adds only the Trainer's seams.

"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.state import GradientState
from torch import Tensor, nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from snrmon.measure.meter import GradientMeter

IGNORE_INDEX = -100  # labels the Trainer and the models' losses leave out (transformers' convention)


class SNRMonitorCallback(TrainerCallback, ExportableState):
    r"""Log gradient signal, noise, noise scale and SNR of a ``Trainer`` run, every time it logs its loss.

    The microbatches of an optimizer step (``gradient_accumulation_steps`` >= 2, and/or the DDP ranks) give
    the small gradients, the gradient the optimizer applies the large one (``docs/theory.md``). The Trainer
    has no event after a backward, and it clips the gradient before ``on_pre_optimizer_step``, so the
    callback uses hooks, installed at ``on_train_begin`` and removed at ``on_train_end``:

    * the meter's tensor hooks on the parameters read each microbatch's gradient norms;
    * a forward hook on the model reads the microbatch from its keyword arguments: its size, and, when the
      Trainer passes ``num_items_in_batch`` (a model that accepts loss kwargs: the loss is summed over tokens
      and divided by the step's token count), its weight ``tokens / num_items_in_batch``;
    * it hooks the output loss; when a backward reaches it, it queues a callback on autograd's engine that
      runs after the whole backward, and after DDP's gradient all-reduce, which DDP queues in the same
      backward. That callback closes the microbatch and, on the step's last one (accelerate's
      ``GradientState().sync_gradients``, set by the Trainer), reads the applied gradient: before the Trainer
      clips it, and, under fp16, still scaled (the meter divides by the scale of ``optimizer.scaler``).

    At each training log (``logging_steps``), the values (``snr/signal``, ``snr/noise``, ``snr/noise_scale``
    in samples, or in tokens when the loss is token-weighted, ``snr/ratio``, each with ``_se``,
    ``snr/batch_size``, ``snr/skipped_steps``, per group ``snr/<group>/...``) are added to the ``logs`` the
    Trainer hands its callbacks and to the same entry of ``trainer.state.log_history``. The reporting
    integrations (``report_to``) run before the callbacks given as ``Trainer(callbacks=...)``: to have the
    values in TensorBoard, W&B or MLflow too, add the callback with
    :func:`~snrmon.callbacks.transformers.add_callbacks`, which puts it first (a warning says so otherwise).

    Not supported (a warning, and the run goes on unmeasured): one microbatch per step on one process,
    DataParallel (``n_gpu > 1``), DeepSpeed, FSDP, label smoothing or a ``compute_loss_func`` with token
    weighting (the loss's normalisation is not visible to the model's forward). The EMAs are saved in the
    checkpoint's ``TrainerState`` and go on after ``train(resume_from_checkpoint=...)``.

    Args:
        groups: also report per parameter group (as :class:`snrmon.GradientMeter`).
        dataset_size: N, the training set's size, for the finite-set correction (a shuffled, non-repeating
            sampler, as the Trainer's default), in the unit the batches are counted in: samples, or tokens
            when the Trainer passes ``num_items_in_batch`` (a causal LM; ``snr/batch_size`` shows the unit).
            ``dataset_snr`` scales with it. ``None``: independent draws.
        ema_decay: EMA factor β of signal and noise.
        prefix: of the logged keys.

    Raises:
        ValueError: a bad ``groups``, ``dataset_size`` or ``ema_decay`` (at ``on_train_begin``).

    Example::

        >>> from transformers import Trainer, TrainingArguments
        >>> from snrmon.callbacks.transformers import SNRMonitorCallback, add_callbacks
        >>> args = TrainingArguments("out", gradient_accumulation_steps=4, logging_steps=10)
        >>> trainer = Trainer(model=model, args=args, train_dataset=train)  # doctest: +SKIP
        >>> add_callbacks(trainer, SNRMonitorCallback())  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> trainer.state.log_history[-2]["snr/noise_scale"]  # doctest: +SKIP
    """

    def __init__(
        self,
        groups: int | dict[str, str] | None = None,
        dataset_size: float | None = None,
        ema_decay: float = 0.95,
        prefix: str = "snr/",
    ) -> None:
        self.groups, self.dataset_size, self.ema_decay, self.prefix = groups, dataset_size, ema_decay, prefix
        self.meter: GradientMeter | None = None
        self.latest: dict[str, float] = {}  # the values of the last training log, or of the end of training
        self.ahead_of_integrations = False  # set by add_callbacks
        self._handles: list[Any] = []
        self._token_scale = 1.0  # the Trainer's factor on a token-weighted loss (the ranks, see below)
        self._shifts_labels = False
        self._accepts_loss_kwargs = False
        self._steps = 0  # steps measured since the last log
        self._restored: dict[str, Any] = {}  # a saved meter state, to load into the next meter
        self._said_unit = False  # a dataset_size below one step's batch (another unit) is said once

    # -- the Trainer's events ----------------------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self._remove_hooks()
        why_not = _unsupported(args)
        if why_not is not None:
            self._say(f"SNRMonitorCallback: {why_not}: nothing is measured", state)
            return
        if args.report_to and not self.ahead_of_integrations:
            self._say(
                f"SNRMonitorCallback: its values reach trainer.state.log_history, but not report_to="
                f"{args.report_to}, whose callbacks read the logs first: add it with "
                "snrmon.callbacks.transformers.add_callbacks(trainer, ...) to put it ahead of them",
                state,
            )
        scaler = getattr(optimizer, "scaler", None)  # accelerate's optimizer holds the fp16 GradScaler
        self.meter = GradientMeter(model, self.groups, self.dataset_size, scaler, self.ema_decay)
        # A token-weighted loss, summed over tokens and divided by the step's token count, is multiplied by
        # the number of processes when that count is summed over them (average_tokens_across_devices):
        # then DDP's mean over ranks gives the token mean over all of them.
        average = getattr(args, "average_tokens_across_devices", False)
        self._token_scale = float(args.world_size) if average and args.world_size > 1 else 1.0
        self._shifts_labels = _loss_shifts_labels(model)
        self._accepts_loss_kwargs = _accepts_loss_kwargs(model)
        self._handles = [model.register_forward_hook(self._after_forward, with_kwargs=True)]
        self._steps = 0
        self._restore(state)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "loss" not in logs or self.meter is None or self._steps == 0:
            return  # (not a training log, or nothing measured since the last)
        self._steps = 0
        values = self.meter.compute()  # the one host sync, at log steps only
        values.pop("dropped_windows", None)  # (always 0 here: every measured step is applied)
        self.latest = {self.prefix + key: value for key, value in values.items()}
        batch = values.get("batch_size", 0.0)
        if self.dataset_size is not None and batch > self.dataset_size and not self._said_unit:
            self._said_unit = True  # (a step cannot draw more than the whole set: another unit)
            if state.is_world_process_zero:
                warnings.warn(
                    f"SNRMonitorCallback: dataset_size={self.dataset_size:g} is smaller than one step's "
                    f"batch ({batch:g}, snr/batch_size): give the training set's size in the batches' unit "
                    "(tokens for a model that counts num_items_in_batch); dataset_snr scales with it",
                    RuntimeWarning,
                    stacklevel=2,
                )
        logs.update(self.latest)
        # Trainer.log copied `logs` into log_history just before this event: that entry gets the values too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.latest)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Steps measured since the last training log (a run shorter than logging_steps has had none): their
        # values in `latest` too, as the Lightning monitor computes them at the end of fit.
        if self.meter is not None and self._steps > 0:
            values = self.meter.compute()
            values.pop("dropped_windows", None)
            self.latest = {self.prefix + key: value for key, value in values.items()}
        self._remove_hooks()

    # -- state across resume -----------------------------------------------------------------------------

    def state(self) -> dict:
        """What the checkpoint's ``TrainerState`` saves (JSON): the arguments, and the meter's EMAs."""
        args = {"groups": self.groups, "dataset_size": self.dataset_size, "ema_decay": self.ema_decay}
        return {"args": args | {"prefix": self.prefix}, "attributes": {"saved": self.saved}}

    @property
    def saved(self) -> dict[str, Any]:
        """The meter's state as plain lists (also what the Trainer sets back, by name, when
        ``restore_callback_states_from_checkpoint`` is on); ``{}`` before any measured step."""
        if self.meter is None:
            return self._restored
        state = self.meter.state_dict()
        if not state:
            return {}
        estimator = {k: v.tolist() if isinstance(v, Tensor) else v for k, v in state["estimator"].items()}
        return {"group_names": state["group_names"], "estimator": estimator}

    @saved.setter
    def saved(self, state: dict[str, Any]) -> None:
        self._restored = state
        if self.meter is not None:
            self._load(state)

    def _restore(self, state: TrainerState) -> None:
        """On a resume (a run that begins past step 0), load this callback's entry of the checkpoint's
        ``state.stateful_callbacks`` into the new meter; a run from step 0 starts fresh EMAs."""
        if state.global_step == 0:
            self._restored = {}
            return
        entries = (state.stateful_callbacks or {}).get(type(self).__name__, [])
        entries = entries if isinstance(entries, list) else [entries]
        for entry in entries:
            if entry.get("args", {}).get("prefix") == self.prefix:
                self._restored = entry.get("attributes", {}).get("saved") or {}
        self._load(self._restored)

    def _load(self, state: dict[str, Any]) -> None:
        if not state or self.meter is None:
            return
        # Back to tensors, all but the decay (scalar tensors were saved as numbers, the others as lists).
        estimator = {k: v if k == "ema_decay" else torch.tensor(v) for k, v in state["estimator"].items()}
        self.meter.load_state_dict({"group_names": state["group_names"], "estimator": estimator})

    # -- the hooks ---------------------------------------------------------------------------------------

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """A forward of the model: when it is a training microbatch, hook its loss to learn when the
        backward through it has finished."""
        if self.meter is None or not (module.training and torch.is_grad_enabled()):
            return
        try:
            outputs = _grad_outputs(output)
            if not outputs:
                return  # nothing to backpropagate
            size, weight = self._microbatch(args, kwargs)
            engine = torch.autograd.Variable._execution_engine
            queued = []  # once per backward, from the first output it reaches (the loss, or the logits)

            def after_backward() -> None:
                # DDP queues its all-reduce's completion when the backward reaches the first parameter,
                # after the outputs' hooks: queued from here, this runs after it, on the averaged gradient.
                engine.queue_callback(lambda: self._after_backward(size, weight))

            def backward_started(grad: Tensor) -> None:
                if not queued:
                    queued.append(True)
                    engine.queue_callback(after_backward)

            for tensor in outputs:
                tensor.register_hook(backward_started)
        except Exception as error:  # never break the training step
            self._fail(error)

    def _after_backward(self, size: float | Tensor, weight: float | Tensor | None) -> None:
        """The end of a microbatch's backward: record it; on the step's last, close the step."""
        if self.meter is None:
            return
        try:
            self.meter.after_backward(size, weight)
            if GradientState().sync_gradients:  # the Trainer's last microbatch of the step
                self.meter.before_step()  # .grad: averaged over ranks, not yet clipped
                self._steps += 1
        except Exception as error:  # raising here would end the user's backward
            self._fail(error)

    def _microbatch(self, args: tuple, kwargs: dict) -> tuple[float | Tensor, float | Tensor | None]:
        """The microbatch's size and weight: tokens and tokens / num_items_in_batch for a token-weighted
        loss (the tokens its loss sums over), else the samples and None (the Trainer's 1/K)."""
        items = kwargs.get("num_items_in_batch")
        if items is None and self._accepts_loss_kwargs and "labels" in kwargs:
            # The Trainer counts num_items_in_batch for such a model, and normalises the loss by it: here it
            # did so outside the forward (TRL's SFTTrainer, a compute_loss override).
            raise ValueError(
                "the loss is normalised by the step's num_items_in_batch outside the model's forward (TRL's "
                "SFTTrainer?): the weights of the microbatches cannot be known"
            )
        if items is None:
            return _rows(args, kwargs), None
        if "shift_labels" in kwargs:
            labels = kwargs["shift_labels"]
        elif "labels" in kwargs:
            labels = kwargs["labels"][..., 1:] if self._shifts_labels else kwargs["labels"]
        else:
            raise ValueError(
                "the Trainer passed num_items_in_batch but no labels to the model (label smoothing, or a "
                "compute_loss_func?): the weights of the microbatches cannot be known"
            )
        # A device tensor (no sync), in float64 as the estimator's sums (MPS has none).
        exact = torch.float32 if labels.device.type == "mps" else torch.float64
        tokens = labels.ne(IGNORE_INDEX).sum().to(exact)
        return tokens, tokens * self._token_scale / items

    # -- helpers -----------------------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        warnings.warn(
            f"SNRMonitorCallback: measuring failed ({type(error).__name__}: {error}); training goes on "
            "unmeasured",
            RuntimeWarning,
            stacklevel=2,
        )
        self._remove_hooks()

    def _say(self, message: str, state: TrainerState) -> None:
        if state.is_world_process_zero:
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.meter is not None:
            self._restored = self.saved  # what a later train() (or state()) goes on from
            self.meter.close()
            self.meter = None


def _unsupported(args: TrainingArguments) -> str | None:
    """Why this run cannot be measured, or None."""
    if args.gradient_accumulation_steps * args.world_size < 2:
        return (
            "one microbatch per step on one process has a single batch size, so no noise estimate is "
            "possible: set gradient_accumulation_steps >= 2 (or train on several processes)"
        )
    if args.n_gpu > 1:
        return "DataParallel (n_gpu > 1) splits each microbatch inside the forward: not supported; use DDP"
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        return "DeepSpeed and FSDP shard the gradients: not supported"
    return None


def _grad_outputs(output: Any) -> list[Tensor]:
    """The model's outputs that require a gradient: whichever of them the loss is computed from (the model's
    own loss, or the logits, log-probabilities, ... of a loss computed outside the forward)."""
    if isinstance(output, Mapping):
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        values = [output]
    return [v for v in values if isinstance(v, Tensor) and v.requires_grad]


def _accepts_loss_kwargs(model: nn.Module) -> bool:
    """Whether the Trainer passes ``num_items_in_batch`` to this model (its own test)."""
    accepts = getattr(model, "accepts_loss_kwargs", None)
    if accepts is not None:
        return bool(accepts)
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


def _rows(args: tuple, kwargs: dict) -> int:
    """Samples in a microbatch: the first dimension of its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("the model's forward got no tensor argument: the microbatch's size is unknown")


def _loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss shifts its labels (a causal LM: the first position of each row is never a
    target). Its own loss function decides, not the Trainer's count of ``num_items_in_batch``, which can
    differ (transformers 5.25 counts unshifted labels for a GPT-2 whose ``loss_type`` is unset): the
    weights are then the model's tokens over the Trainer's count, which need not sum to one."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # (another transformers layout: the plain labels)
        return False
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return getattr(model, "loss_function", None) is ForCausalLMLoss and not encoder_decoder
