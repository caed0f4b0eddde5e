"""SNRMonitor: gradient signal, noise, noise scale and SNR of a Lightning run, live (theory T1–T5)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

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
        except MisconfigurationException:
            raise
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
            ``True``, each measured step also runs ``training_step`` on the first half of the batch (with
            the RNG state restored, and its ``self.log`` calls muted) to get one: about half a forward and
            backward extra per measured step. Off by default: the monitor then warns once and logs nothing.
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
        self._disabled = False
        self._measuring = False
        self._backwards = 0  # small gradients added in the current step, on this rank
        self._batch: Any = None
        self._batch_idx = 0
        self._warned_single_batch = False

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise MisconfigurationException(
                f"SNRMonitor supports single-device and DDP training; {type(trainer.strategy).__name__}"
                " shards gradients across ranks, which this monitor does not reduce yet."
            )
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "SNRMonitor needs automatic optimization (it reads Lightning's accumulation scaling)."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        if not named:
            self._disable("the model has no trainable parameters")
            return
        names, parameters = zip(*named, strict=True)
        self._group_names, membership = group_parameters(list(names), self.groups)
        self._taps = GradientTaps(list(parameters), membership)
        self._estimator = GradientNoiseEstimator(
            len(self._group_names), self.ema_decay, device=parameters[0].device
        )
        if self._pending_state is not None:
            self._load_estimator(self._pending_state)
            self._pending_state = None
        if trainer.is_global_zero:
            self._add_tensorboard_layout(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._taps is not None:
            self._taps.detach()

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

    # ------------------------------------------------------------------ per optimizer step
    @_never_crash
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._measuring:
            return
        try:
            self._finish_step(trainer, pl_module, optimizer)
        finally:
            self._backwards = 0
            self._batch = None
            if (trainer.global_step + 1) % self.every_n_steps != 0:
                self._taps.detach()

    def _finish_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._backwards * trainer.world_size == 1:
            if self.split_batch:
                self._add_half_batch(trainer, pl_module)
            else:
                self._warn_single_batch()
                self._estimator.discard_step()
                return
        # Lightning unscales fp16 gradients before this hook, except for optimizers that unscale in
        # their own step (fused Adam): those still hold scaled gradients here.
        scale = self._loss_scale(trainer) if _optimizer_handles_unscaling(optimizer) else 1.0
        applied = self._taps.accumulated_sq_norms(scale)
        distributed = trainer.world_size > 1
        reduce = functools.partial(trainer.strategy.reduce, reduce_op="sum") if distributed else None
        self._estimator.step(applied, all_reduce=reduce)
        if trainer._logger_connector.should_update_logs:
            self._log(trainer, pl_module)

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
        if updates == 0:
            return  # no estimate yet
        self.latest = dict(zip(names, numbers, strict=True))
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(self.latest, step=step)
        if self.prog_bar and self.latest["snr/ratio"] == self.latest["snr/ratio"]:  # not NaN
            pl_module.log("snr/ratio", self.latest["snr/ratio"], prog_bar=True, logger=False)

    def _add_tensorboard_layout(self, trainer: Trainer) -> None:
        """Group the SNR charts in TensorBoard's Custom Scalars tab."""
        charts = {
            "signal |G|²": ["Multiline", [r"snr/(.*/)?signal$"]],
            "noise tr(Σ)": ["Multiline", [r"snr/(.*/)?noise$"]],
            "noise scale B_simple": ["Multiline", [r"snr/(.*/)?noise_scale$"]],
            "SNR at batch size": ["Multiline", [r"snr/(.*/)?ratio$"]],
            "uncertainty": ["Multiline", [r"snr/.*_se$"]],
        }
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars({"snrmon": charts})

    # ------------------------------------------------------------------ failure and state
    def _disable(self, reason: str) -> None:
        self._disabled = True
        if self._taps is not None:
            self._taps.detach()
        rank_zero_warn(f"SNRMonitor disabled itself, training continues: {reason}")

    def state_dict(self) -> dict[str, Any]:
        if self._estimator is None:
            return dict(self._pending_state or {})
        return {"group_names": self._group_names, "estimator": self._estimator.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._estimator is None:
            self._pending_state = state_dict  # restored before on_fit_start builds the estimator
        else:
            self._load_estimator(state_dict)

    def _load_estimator(self, state: dict[str, Any]) -> None:
        if not state:
            return
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
