"""SNRMonitor: gradient signal, noise, noise scale and SNR of a Lightning run, live (theory T1–T5)."""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from snrmon.callbacks.tensorboard_layout import add_snr_layout
from snrmon.estimator import GradientNoiseEstimator
from snrmon.groups import TOTAL, group_parameters
from snrmon.taps import GradientTaps


def _never_crash(hook: Callable) -> Callable:
    """A monitor failure disables the monitor with a warning; it never stops the training run."""

    @functools.wraps(hook)
    def guarded(self: SNRMonitor, *args: Any, **kwargs: Any) -> None:
        if self._disabled:
            return
        try:
            hook(self, *args, **kwargs)
            if self._taps is not None and self._taps.error is not None:
                raise self._taps.error
        except Exception as error:
            self._disable(f"{type(error).__name__} in {hook.__name__}: {error}")

    return guarded


class SNRMonitor(Callback):
    r"""Measure the gradient signal |G|², noise tr(Σ), noise scale B_simple and SNR while training.

    Each optimizer step yields *small* gradients (one per microbatch under ``accumulate_grad_batches``,
    and one per DDP rank before all-reduce) and the applied gradient; their squared norms give unbiased
    per-step estimates of signal and noise (T2, T3, weighted form in ``docs/theory.md``), which are
    smoothed separately with bias-corrected EMAs. The noise scale (T4) and SNR (T5) are ratios of the
    smoothed values. Everything stays on the training device until a logging step.

    Logged on ``log_every_n_steps`` through every configured logger, and kept in :attr:`latest`:
    ``snr/signal``, ``snr/noise``, ``snr/noise_scale`` (in samples), ``snr/ratio`` (SNR at the current
    batch size), each with a ``_se`` standard error, ``snr/batch_size``, ``snr/skipped_steps`` (steps with
    non-finite gradients), and per group ``snr/<group>/...``.

    Args:
        every_n_steps: measure on every n-th optimizer step; on other steps no hook is installed.
        ema_decay: EMA factor β for signal and noise; the window is about (1 + β) / (1 − β) steps.
        groups: also report per parameter group: an ``int`` depth groups by the first components of
            parameter names (``2``: ``"blocks.0"``), a dict maps group names to regexes.
        batch_size_fn: the number of samples the training loss of a batch is a mean over (a Python number
            or a device tensor, e.g. the count of non-padding tokens for a per-token loss). Defaults to
            the batch's leading dimension.
        split_batch: with one device and no gradient accumulation there is no second batch size. If
            ``True``, each measured step also runs ``training_step`` on the first half of the batch (RNG
            state and buffers restored, ``self.log`` muted) to get one: about half a forward and backward
            extra per measured step. Off by default: the monitor then warns once and logs nothing.
        prog_bar: show ``snr/ratio`` in the progress bar.

    Example::

        trainer = Trainer(accumulate_grad_batches=4, callbacks=[SNRMonitor(groups=2)])
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        ema_decay: float = 0.95,
        groups: int | dict[str, str] | None = None,
        batch_size_fn: Callable[[Any], int | float | Tensor] | None = None,
        split_batch: bool = False,
        prog_bar: bool = True,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.every_n_steps = every_n_steps
        self.ema_decay = ema_decay
        self.groups = groups
        self.batch_size_fn = batch_size_fn or extract_batch_size
        self.split_batch = split_batch
        self.prog_bar = prog_bar
        self.latest: dict[str, float] = {}

        self._estimator: GradientNoiseEstimator | None = None
        self._taps: GradientTaps | None = None
        self._group_names: list[str] = []
        self._pending_state: dict[str, Any] | None = None
        self._warned_single_batch = False
        self._rank = 0
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        self._disabled = False
        self._measuring = False
        self._backwards = 0  # small gradients added in the current step, on this rank
        self._last_backward = False  # whether the step's latest microbatch ran a backward
        self._reduced = False  # whether this rank joined the step's all-reduce
        self._batch: Any = None
        self._batch_idx = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, groups=self.groups)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        sharded = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, sharded):
            raise MisconfigurationException(
                f"SNRMonitor supports single-device and DDP training, not {type(strategy).__name__}: sharded"
                " or XLA gradients need a reduction of squared norms that this monitor does not do yet."
            )
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "SNRMonitor needs automatic optimization (it reads Lightning's accumulation scaling)."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_fit_state()
        self._rank = trainer.global_rank
        self._estimator = self._taps = None
        self._watch_trainable_parameters(pl_module)
        if self._estimator is not None and self._pending_state is not None:
            self._load_estimator(self._pending_state)
        self._pending_state = None
        if trainer.is_global_zero:
            add_snr_layout(trainer)

    @_never_crash
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A fine-tuning schedule (e.g. BackboneFinetuning) may unfreeze parameters between epochs.
        self._watch_trainable_parameters(pl_module)

    def _watch_trainable_parameters(self, pl_module: LightningModule) -> None:
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        if self._taps is not None and [p for _, p in named] == self._taps.parameters:
            return
        if not named:
            self._disable("the model has no trainable parameters")
            return
        if self._taps is not None:
            self._taps.detach()
        names, parameters = zip(*named, strict=True)
        group_names, membership = group_parameters(list(names), self.groups)
        self._taps = GradientTaps(list(parameters), membership)
        if self._estimator is None or group_names != self._group_names:
            if self._estimator is not None:
                rank_zero_warn(
                    f"SNRMonitor: the trainable groups changed to {group_names}; the EMAs restart."
                )
            self._group_names = group_names
            self._estimator = GradientNoiseEstimator(len(group_names), self.ema_decay, parameters[0].device)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._taps is not None:
            self._taps.detach()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)  # never leave hooks on the user's model

    # ------------------------------------------------------------------ per microbatch
    @_never_crash
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._backwards == 0:  # first microbatch of an optimizer step
            self._measuring = trainer.global_step % self.every_n_steps == 0
            if self._measuring:
                self._taps.attach()
        if self._measuring:
            self._taps.start_backward()
            self._batch, self._batch_idx = batch, batch_idx
            self._last_backward = False

    @_never_crash
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._measuring:
            return
        # Lightning divides each microbatch loss by `accumulate_grad_batches`, and DDP averages ranks:
        # the hooks saw scale·g_k/K, and g_k enters the applied gradient with weight 1/(K·world_size).
        accumulation = trainer.accumulate_grad_batches
        size = self.batch_size_fn(self._batch)
        sq_norms = self._taps.backward_sq_norms(self._loss_scale(trainer)) * accumulation**2
        self._estimator.add_small(sq_norms, size)
        self._estimator.add_applied(size, weight=1.0 / (accumulation * trainer.world_size))
        self._backwards += 1
        self._last_backward = True

    # ------------------------------------------------------------------ per optimizer step
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        measured = trainer.global_step % self.every_n_steps == 0
        distributed = trainer.world_size > 1
        try:
            if self._disabled:
                if distributed and measured and self._estimator is not None:
                    self._skip_step_on_all_ranks()
                return
            if self._measuring:
                self._finish_step(trainer, pl_module, optimizer)
            if trainer._logger_connector.should_update_logs:
                self._log(trainer, pl_module)
        except Exception as error:
            if distributed and measured and not self._reduced:
                self._skip_step_on_all_ranks()  # the other ranks are waiting in the all-reduce
            self._disable(f"{type(error).__name__} in on_before_optimizer_step: {error}")
        finally:
            self._backwards, self._batch, self._reduced = 0, None, False
            if self._taps is not None and (trainer.global_step + 1) % self.every_n_steps != 0:
                self._taps.detach()

    def _finish_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._backwards * trainer.world_size == 1:
            if self.split_batch:
                self._add_half_batch(trainer, pl_module)
            else:
                # One microbatch on one device: nothing to compare it with (at an epoch's ragged end
                # under accumulation this is expected and silent).
                if trainer.accumulate_grad_batches == 1:
                    self._warn_single_batch()
                self._estimator.discard_step()
                return
        # Lightning unscales fp16 gradients before this hook, except for optimizers that unscale in their
        # own step (fused Adam) and for steps whose last microbatch skipped its backward (returned None).
        unscaled = not getattr(optimizer, "_step_supports_amp_scaling", False) and self._last_backward
        applied = self._taps.accumulated_sq_norms(1.0 if unscaled else self._loss_scale(trainer))
        self._estimator.step(applied, all_reduce=_sum_over_ranks if trainer.world_size > 1 else None)
        self._reduced = True

    def _skip_step_on_all_ranks(self) -> None:
        """A rank whose monitor failed still joins each measured step's all-reduce, with non-finite values:
        no rank waits for it, and every rank skips the step alike (counted in ``snr/skipped_steps``)."""
        estimator = self._estimator
        nan = torch.full((estimator.num_groups,), math.nan, device=estimator.device)
        estimator.discard_step()
        estimator.add_small(nan, 1.0)
        estimator.step(nan, all_reduce=_sum_over_ranks)

    def _add_half_batch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The split-batch fallback: one extra small gradient from the first half of the batch."""
        full_size = extract_batch_size(self._batch)
        if full_size < 2:
            return
        half = apply_to_collection(self._batch, Tensor, lambda t: t[: full_size // 2])
        scale = self._loss_scale(trainer)
        device = pl_module.device
        rng_devices = [device] if device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=rng_devices),
            _muted_logging(pl_module),
            _restored_buffers(pl_module),
            trainer.precision_plugin.train_step_context(),
        ):
            output = pl_module.training_step(half, self._batch_idx)
            loss = output["loss"] if isinstance(output, dict) else output
            self._taps.start_backward()
            # autograd.grad leaves `.grad` untouched; the tensor hooks still see the gradient.
            torch.autograd.grad(loss * scale, self._taps.parameters, allow_unused=True)
        self._estimator.add_small(self._taps.backward_sq_norms(scale), self.batch_size_fn(half))

    def _warn_single_batch(self) -> None:
        if not self._warned_single_batch:
            self._warned_single_batch = True
            rank_zero_warn(
                "SNRMonitor: one device and `accumulate_grad_batches=1` give a single batch size per step,"
                " so signal and noise cannot be separated and nothing is logged. Use gradient accumulation,"
                " several devices, or `SNRMonitor(split_batch=True)` (about half a forward/backward extra"
                " per measured step; raise `every_n_steps` to spend less)."
            )

    @staticmethod
    def _loss_scale(trainer: Trainer) -> Tensor | float:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None)  # a device tensor: get_scale() would sync
        return 1.0 if scale is None else scale

    # ------------------------------------------------------------------ logging
    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        values = self._estimator.compute()
        names, tensors = [], []
        for index, group in enumerate(self._group_names):
            prefix = "snr/" if group == TOTAL else f"snr/{group}/"
            for key, value in values.items():
                names.append(prefix + key)
                tensors.append(value[index])
        names += ["snr/batch_size", "snr/skipped_steps"]
        tensors += [self._estimator.batch_size, self._estimator.skipped, self._estimator.updates]
        *numbers, updates = torch.stack([t.to(torch.float64) for t in tensors]).tolist()  # the one host sync
        latest = dict(zip(names, numbers, strict=True))
        if updates == 0:  # no estimate yet: only say if steps were skipped
            latest = {"snr/skipped_steps": latest["snr/skipped_steps"]} if latest["snr/skipped_steps"] else {}
            if not latest:
                return
        self.latest = latest
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(self.latest, step=step)
        if self.prog_bar and self.latest.get("snr/ratio", math.nan) == self.latest.get("snr/ratio"):
            pl_module.log("snr/ratio", self.latest["snr/ratio"], prog_bar=True, logger=False)

    # ------------------------------------------------------------------ failure and state
    def _disable(self, reason: str) -> None:
        self._disabled = True
        if self._taps is not None:
            self._taps.detach()
        # Every rank says it: under DDP the failing rank may not be rank zero.
        warnings.warn(
            f"SNRMonitor disabled itself on rank {self._rank}, training continues: {reason}", stacklevel=2
        )

    def state_dict(self) -> dict[str, Any]:
        if self._estimator is None or self._pending_state is not None:
            return dict(self._pending_state or {})
        return {"group_names": self._group_names, "estimator": self._estimator.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict  # Lightning restores callbacks before on_fit_start, which applies it

    def _load_estimator(self, state: dict[str, Any]) -> None:
        if not state:
            return
        saved_decay = state["estimator"]["ema_decay"]
        if saved_decay != self.ema_decay:
            rank_zero_warn(
                f"SNRMonitor: the checkpoint was smoothed with ema_decay={saved_decay}, this run uses"
                f" {self.ema_decay}; the bias correction of the restored EMAs is approximate."
            )
        if state.get("group_names") != self._group_names:
            rank_zero_warn(
                f"SNRMonitor: the checkpoint's groups {state.get('group_names')} differ from this run's"
                f" {self._group_names}; the EMAs start afresh."
            )
            return
        self._estimator.load_state_dict(state["estimator"])


@contextlib.contextmanager
def _muted_logging(pl_module: LightningModule) -> Iterator[None]:
    """Let the split-batch fallback call `training_step` without its `self.log` calls reaching the logs."""
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


@contextlib.contextmanager
def _restored_buffers(pl_module: LightningModule) -> Iterator[None]:
    """Keep the split-batch fallback's extra forward out of buffers such as BatchNorm's running statistics."""
    saved = [buffer.clone() for buffer in pl_module.buffers()]
    try:
        yield
    finally:
        for buffer, value in zip(pl_module.buffers(), saved, strict=True):
            buffer.copy_(value)


def _sum_over_ranks(tensor: Tensor) -> Tensor:
    """Sum over DDP ranks in place. A plain all-reduce: Lightning's ``strategy.reduce`` adds a barrier, which
    would block the host on every measured step."""
    torch.distributed.all_reduce(tensor)
    return tensor
