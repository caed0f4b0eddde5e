"""SNRMonitor: gradient signal, noise, noise scale and SNR of a Lightning run, live (theory T1–T5)."""

from __future__ import annotations

import contextlib
import functools
import math
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parameter import is_lazy

from snrmon.callbacks._lightning import (
    ddp_comm_hooks,
    logging_step,
    loss_scale,
    should_log,
    tensor_parallel_size,
    unscales_in_step,
    window_ends,
)
from snrmon.callbacks.tensorboard_layout import add_snr_layout, log_bands
from snrmon.measure.estimator import GradientNoiseEstimator
from snrmon.measure.groups import TOTAL, check_groups, group_parameters
from snrmon.measure.sampling import Population, training_population
from snrmon.measure.taps import GradientTaps, ShardedGradientTaps


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

    When the microbatches of a step are disjoint draws from a finite training set of N samples (a shuffled
    map-style dataset, ``DistributedSampler`` shards), T2 alone would estimate |G|² − S²/N; the monitor reads
    N off the training dataloader (or ``dataset_size``) and reports the training-set |G|² the optimizer
    descends, plus ``signal_beyond_chance`` (|G|² − S²/N) and ``dataset_snr`` (N|G|²/S²). One info line at
    the start says which case the run is in.

    Logged on ``log_every_n_steps`` through every configured logger, and kept in :attr:`latest`:
    ``snr/signal``, ``snr/noise``, ``snr/noise_scale`` (in samples), ``snr/ratio`` (SNR at the current
    batch size), each with a ``_se`` standard error, ``snr/batch_size``, ``snr/skipped_steps`` (steps with
    non-finite gradients), ``snr/dropped_windows`` (accumulation windows the optimizer never applied), with a
    finite training set ``snr/signal_beyond_chance``, ``snr/dataset_snr`` (with ``_se``) and
    ``snr/dataset_size``, and per group ``snr/<group>/...``.

    Args:
        every_n_steps: measure on every n-th optimizer step; on other steps no hook is installed.
        ema_decay: EMA factor β for signal and noise; the window is about (1 + β) / (1 − β) steps.
        groups: also report per parameter group: an ``int`` depth groups by the first components of
            parameter names (``2``: ``"blocks.0"``), a dict maps group names to regexes.
        batch_size_fn: the number of samples the training loss of a batch is a mean over (a Python number
            or a device tensor, e.g. the count of non-padding tokens for a per-token loss). Defaults to
            the leading dimension of the batch's first tensor that has one.
        split_batch: with one device and no gradient accumulation there is no second batch size. If
            ``True``, each measured step also runs ``training_step`` on the first half of the batch (torch,
            Python and NumPy random states and buffers restored, ``self.log`` muted) to get one: about half a
            forward and backward extra per measured step. Off by default: the monitor then warns once, logs
            nothing and installs no hook.
        dataset_size: N, the number of samples (in the unit ``batch_size_fn`` counts) the training batches
            are drawn from without replacement, or ``math.inf`` for independent draws; ``None`` reads it off
            the training dataloader (map-style dataset with a ``RandomSampler`` without replacement,
            ``SequentialSampler``, ``SubsetRandomSampler`` or ``DistributedSampler``, and the default
            ``batch_size_fn``; no correction for iterable datasets, sampling with replacement, datasets that
            yield whole batches, a custom ``batch_size_fn``, or samplers it cannot read).
        prefix: the first component of every logged name (``"snr"``): give two monitors on one trainer
            different prefixes.
        prog_bar: show ``<prefix>/ratio`` in the progress bar.

    Raises:
        MisconfigurationException: at setup, for a sharded or XLA strategy, manual optimization, or
            ``split_batch=True`` on a module that holds torchmetrics metrics (their updates inside the extra
            ``training_step`` could not be undone). Two monitors with the same ``prefix`` share a
            ``state_key``, which Lightning refuses when the ``Trainer`` is made.

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
        dataset_size: int | None = None,
        prefix: str = "snr",
        prog_bar: bool = True,
    ):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be a number in [0, 1), got {ema_decay!r}")
        check_groups(groups)
        numeric = isinstance(dataset_size, (int, float)) and not isinstance(dataset_size, bool)
        if dataset_size is not None and not numeric:
            raise TypeError(f"dataset_size must be a number (or None), got {dataset_size!r}")
        whole = dataset_size is None or dataset_size == math.inf or float(dataset_size).is_integer()
        if not whole or (dataset_size is not None and not dataset_size > 1):
            raise ValueError(f"dataset_size must be a whole number > 1, math.inf or None: {dataset_size!r}")
        if not isinstance(prefix, str) or not prefix.strip("/ "):
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.every_n_steps = every_n_steps
        self.ema_decay = ema_decay
        self.groups = groups
        self.batch_size_fn = batch_size_fn or count_samples
        self.split_batch = split_batch
        self.dataset_size = dataset_size
        self.prefix = prefix.strip("/ ")
        self.prog_bar = prog_bar
        self.latest: dict[str, float] = {}

        self._estimator: GradientNoiseEstimator | None = None
        self._taps: GradientTaps | None = None
        self._group_names: list[str] = []
        self._pending_state: dict[str, Any] | None = None
        self._warned: set[str] = set()
        self._rank = 0
        self._sharded = False  # FSDP2, known at setup
        self._ended_at_step = -1  # global step at the end of this monitor's last fit
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        self._disabled = False
        self._measuring = False  # whether the current accumulation window is measured
        self._backwards = 0  # small gradients added in the current window, on this rank
        self._window_size: float | Tensor = 0.0  # their samples
        self._last_backward = False  # whether the window's latest microbatch ran a backward
        self._reduced = False  # whether this rank joined the step's all-reduce
        self._closed_step = -1  # global step of the last on_before_optimizer_step
        self._taps_are_new = False  # FSDP2 taps made since the current window's first forward
        self._population: Population | None = None
        self._named: list[tuple[str, torch.nn.Parameter]] | None = None  # all parameters, walked each epoch
        self._trainable: tuple[bool, ...] | None = None  # which of them the taps watch
        self._known: set[int] = set()  # their ids
        self._batch: Any = None
        self._batch_idx = 0

    @property
    def state_key(self) -> str:
        # Only what makes two monitors different sinks: a resume may change every_n_steps or groups.
        return self._generate_state_key(prefix=self.prefix)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        supported = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
        refused = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)
        if not isinstance(strategy, supported) or isinstance(strategy, refused):
            raise MisconfigurationException(
                "SNRMonitor supports single-device, DDP, and FSDP2 (`fully_shard`) through"
                " ModelParallelStrategy(tensor_parallel_size=1), not"
                f" {type(strategy).__name__}: its gradients need a reduction of squared norms that this"
                " monitor does not do."
            )
        if isinstance(strategy, ModelParallelStrategy) and tensor_parallel_size(strategy) > 1:
            raise MisconfigurationException(
                "SNRMonitor supports ModelParallelStrategy with data parallelism (FSDP2) only, not tensor"
                " parallelism: a tensor-parallel gradient is split over ranks that saw the same samples."
            )
        self._sharded = isinstance(strategy, ModelParallelStrategy)
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "SNRMonitor needs automatic optimization (it reads Lightning's accumulation scaling)."
            )
        if self.split_batch and _holds_metrics(pl_module):
            raise MisconfigurationException(
                "SNRMonitor(split_batch=True) runs `training_step` once more on half of each measured batch;"
                " the module holds torchmetrics metrics, whose updates in that extra call would count the"
                " half batch twice and cannot be undone in general. Use gradient accumulation or several"
                " devices instead of split_batch."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.latest = {}  # values of an earlier fit must not pass for this one's
        self._reset_fit_state()
        self._rank = trainer.global_rank
        # A `fit` that goes on where this monitor's last one ended (the same Trainer fitted again) keeps the
        # EMAs; any other starts afresh (a checkpoint's state, if any, is loaded at the first watch).
        if trainer.global_step == 0 or trainer.global_step != self._ended_at_step:
            self._estimator = self._taps = None
            self._group_names = []
        if trainer.is_global_zero:
            add_snr_layout(trainer)

    @_never_crash
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sharded:
            # FSDP2 taps find their hooks during a forward: they must be attached before the first one.
            self._watch_trainable_parameters(trainer, pl_module)
            self._taps_are_new = False
            if self._taps is not None and trainer.global_step % self.every_n_steps == 0:
                self._taps.attach()

    @_never_crash
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._named = None  # walk the module again at the next measured window: it may have new tensors
        if self._sharded:
            # Walked now, between steps, when FSDP2 holds every parameter sharded: after a forward the root
            # module's parameters are its unsharded ones, which only the taps should see.
            self._watch_trainable_parameters(trainer, pl_module)
        # Dataloaders exist by now, and may be reloaded between epochs.
        if self.dataset_size is not None:
            size = None if self.dataset_size == math.inf else int(self.dataset_size)
            population = Population(size, f"dataset_size={self.dataset_size} was given")
        else:
            population = training_population(trainer.train_dataloader, trainer.world_size)
            if population.size is not None and self.batch_size_fn is not count_samples:
                # N counts the dataset's items; a batch_size_fn may count tokens or other units.
                population = Population(
                    None,
                    f"{population.description}, N = {population.size} items, but `batch_size_fn` counts"
                    " samples in its own unit (tokens?), in which N is unknown",
                )
        if population != self._population:
            self._population = population
            if population.size is None:
                rank_zero_info(
                    f"SNRMonitor: {population.description}, so the microbatches of a step are taken as"
                    " independent draws: no finite-training-set correction. Pass `dataset_size=N` if they are"
                    " disjoint draws from N samples (in the unit `batch_size_fn` counts)."
                )
            else:
                rank_zero_info(
                    f"SNRMonitor: {population.description}: the microbatches of a step are disjoint draws"
                    f" from a training set of N = {population.size} samples: `signal` is the training-set"
                    " |G|² (finite-population corrected), with `signal_beyond_chance` and `dataset_snr`."
                )
            if self._estimator is not None:
                self._estimator.dataset_size = population.size or math.inf

    # ------------------------------------------------------------------ per accumulation window
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch, self._batch_idx = batch, batch_idx
        self._last_backward = False

    @_never_crash
    def on_before_zero_grad(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning zeroes the gradients before the first backward of every accumulation window. Small
        # gradients still pending belong to a window the optimizer never applied (a user's `optimizer_step`
        # that skipped `optimizer.step()`, an epoch cut short by `on_train_batch_start` returning -1): their
        # applied gradient is being thrown away, so they are dropped and counted, never mixed into this one.
        if self._backwards:
            self._estimator.drop_step()
            self._taps.clear_window()
            self._backwards, self._window_size = 0, 0.0
        self._measuring = self._window_is_measured(trainer)
        if self._measuring:
            # Checked on every measured window, not at epoch start: another callback may unfreeze parameters
            # after this one's epoch hook, and lazy parameters exist only after the first forward.
            self._watch_trainable_parameters(trainer, pl_module)
            # FSDP2 taps made after this window's first forward cannot see its first microbatch.
            self._measuring = self._taps is not None and not self._taps_are_new
            self._taps_are_new = False
        if self._taps is not None:
            self._taps.attach() if self._measuring else self._taps.detach()

    def _window_is_measured(self, trainer: Trainer) -> bool:
        if trainer.global_step % self.every_n_steps:
            return False
        if trainer.world_size == 1 and trainer.accumulate_grad_batches == 1 and not self.split_batch:
            self._warn_once(
                "single_batch",
                "SNRMonitor: one device and `accumulate_grad_batches=1` give a single batch size per step,"
                " so signal and noise cannot be separated: nothing is logged and no hook is installed. Use"
                " gradient accumulation, several devices, or `SNRMonitor(split_batch=True)` (about half a"
                " forward/backward extra per measured step; raise `every_n_steps` to spend less).",
            )
            return False
        return True

    def _watch_trainable_parameters(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rewatch(trainer, pl_module)
        if self._pending_state is not None and self._estimator is not None:  # resumed from a checkpoint
            self._load_estimator(self._pending_state)
            self._pending_state = None

    def _rewatch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The module is walked once an epoch (a walk costs about as much as the norm reads of a small model);
        # each measured window only re-reads which of those tensors train and which exist yet. A tensor
        # trains if it requires a gradient and an optimizer holds it: Lightning clears only the optimizers'
        # gradients, so any other `.grad` grows from step to step and is never applied.
        optimized = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        if self._named is not None and not self._sharded and not optimized <= self._known:
            self._named = None  # the optimizer holds a tensor the last walk missed: a module was replaced
        if self._named is None:
            self._named, self._trainable = list(pl_module.named_parameters()), None
            self._known = {id(p) for _, p in self._named}
        trainable = tuple(p.requires_grad and not is_lazy(p) and id(p) in optimized for _, p in self._named)
        if trainable == self._trainable:
            return
        outside = [n for n, p in self._named if p.requires_grad and id(p) not in optimized]
        if outside:
            self._warn_once(
                "outside_optimizer",
                f"SNRMonitor: {len(outside)} parameter tensors require a gradient but are in no optimizer"
                f" (e.g. {outside[0]!r}); they are left out: their gradient is never applied, nor cleared.",
            )
        self._trainable = trainable
        named = [pair for pair, keep in zip(self._named, trainable, strict=True) if keep]
        watched = self._taps.parameters if self._taps is not None else []
        if len(named) == len(watched) and all(p is q for (_, p), q in zip(named, watched, strict=True)):
            return  # identity, not `==`: equal values say nothing about which tensors train
        if self._taps is not None:
            self._taps.detach()
            self._taps = None
        if not named:
            self._disable("the model has no trainable parameters")
            return
        names, parameters = zip(*named, strict=True)
        group_names, membership = group_parameters(list(names), self.groups)
        if self._sharded:
            self._taps = _fsdp2_taps(pl_module, list(names), list(parameters), membership)
            self._taps_are_new = True
        else:
            self._taps = GradientTaps(list(parameters), membership)
        if self._estimator is not None and int(self._estimator.updates) > 0:
            # The total (and maybe the groups) now sums over other tensors: a new quantity, new EMAs.
            before = {id(p) for p in watched}
            added = [n for n, p in named if id(p) not in before]
            removed = len(watched) - (len(named) - len(added))
            rank_zero_info(
                f"SNRMonitor: the trainable parameters changed ({len(watched)} -> {len(parameters)} tensors:"
                f" {len(added)} added{' (' + ', '.join(added[:3]) + ')' if added else ''}, {removed} removed;"
                f" groups {group_names}); the EMAs restart."
            )
        self._group_names = group_names
        dataset_size = (self._population.size if self._population else None) or math.inf
        self._estimator = GradientNoiseEstimator(
            len(group_names), self.ema_decay, parameters[0].device, dataset_size
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ended_at_step = trainer.global_step
        if self._taps is not None:
            self._taps.detach()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._ended_at_step = -1  # a failed fit is not one to go on from
        if self._taps is not None:
            self._taps.detach()  # never leave hooks on the user's model

    # ------------------------------------------------------------------ per microbatch
    @_never_crash
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        # Cleared here, not at batch start: `torch.autograd.grad` inside `training_step` (a gradient penalty,
        # gradient-norm logging) also runs the hooks; only what this backward adds to `.grad` counts.
        if self._measuring:
            self._taps.start_backward()

    @_never_crash
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._measuring:
            return
        # Lightning divides each microbatch loss by `accumulate_grad_batches`, and DDP averages ranks:
        # the hooks saw scale·g_k/K, and g_k enters the applied gradient with weight 1/(K·world_size).
        accumulation = trainer.accumulate_grad_batches
        size = self._batch_size(self._batch)
        self._taps.add_backward_to_window(size * accumulation**2)
        self._estimator.add_applied(size, weight=1.0 / (accumulation * trainer.world_size))
        self._window_size = self._window_size + size
        self._backwards += 1
        self._last_backward = True

    def _batch_size(self, batch: Any) -> float | Tensor:
        try:
            size = self.batch_size_fn(batch)
        except Exception as error:
            raise ValueError(
                f"could not count the samples of a training batch ({error}); pass"
                " `SNRMonitor(batch_size_fn=...)` returning what the training loss is a mean over"
            ) from error
        if self.batch_size_fn is count_samples and "ambiguous_batch" not in self._warned:
            self._check_unambiguous(batch, size)
        # A device tensor is not checked (that would sync); a bad one makes the step non-finite (skipped).
        if not isinstance(size, Tensor) and not (isinstance(size, (int, float)) and 0 < size < math.inf):
            raise ValueError(f"batch_size_fn returned {size!r} for a batch: it must count its samples (> 0)")
        return size

    # ------------------------------------------------------------------ per optimizer step
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        measured = trainer.global_step % self.every_n_steps == 0
        distributed = trainer.world_size > 1
        try:
            if self._disabled:
                if distributed and measured:
                    self._skip_step_on_all_ranks(trainer, pl_module)
                return
            if trainer.global_step == self._closed_step:
                raise RuntimeError(
                    "the optimizer evaluated its closure more than once in one step (LBFGS and other"
                    " line-search optimizers): each evaluation is a new gradient at new parameters, not a"
                    " microbatch of one step, so signal and noise cannot be separated"
                )
            if self._measuring:
                if trainer.global_step == self._closed_step:
                    raise RuntimeError(
                        "the optimizer stepped more than once in one step (LBFGS and other line searches"
                        " evaluate their closure again; an `optimizer_step` may call `optimizer.step()`"
                        " twice): each is a gradient at new parameters, not a microbatch of one step, so"
                        " signal and noise cannot be separated"
                    )
                self._closed_step = trainer.global_step
                self._finish_step(trainer, pl_module, optimizer)
        except Exception as error:
            if distributed and measured and not self._reduced:
                self._skip_step_on_all_ranks(trainer, pl_module)  # the other ranks wait in the all-reduce
            self._disable(f"{type(error).__name__} in on_before_optimizer_step: {error}")
        finally:
            self._backwards, self._window_size, self._reduced = 0, 0.0, False
            if not self._disabled:
                self._attach_ahead_of_next_step(trainer)

    @_never_crash
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # At the end of every window, stepped or not (a window whose `optimizer.step()` was skipped is still a
        # logging step for Lightning), where Lightning logs the module's own step metrics.
        if window_ends(trainer) and should_log(trainer):
            self._log(trainer, pl_module)

    def _attach_ahead_of_next_step(self, trainer: Trainer) -> None:
        if self._taps is not None and self._taps.reads_shards:  # (the step counter moves after this hook)
            measured = (trainer.global_step + 1) % self.every_n_steps == 0
            self._taps.attach() if measured else self._taps.detach()

    def _finish_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scale = loss_scale(trainer)
        if self._backwards * trainer.world_size == 1 and not self.split_batch:
            # One microbatch on one device: nothing to compare it with. Only at an epoch's ragged end under
            # accumulation (the single-batch setup is caught at window start), so it is expected and silent.
            self._taps.clear_window()
            self._estimator.discard_step()
            return
        if trainer.world_size > 1 and ddp_comm_hooks(trainer):
            raise RuntimeError(
                "a DDP communication hook is registered (PowerSGD, gradient compression, ...): the applied"
                " gradient is then not the mean of the ranks' gradients, so signal and noise cannot be"
                " separated"
            )
        step_samples = self._window_size * trainer.world_size  # (an explicit dataset_size may be wrong)
        if self.dataset_size is not None and isinstance(step_samples, (int, float)):
            if step_samples > self.dataset_size:
                raise ValueError(
                    f"this step drew {step_samples:g} samples, more than dataset_size={self.dataset_size}:"
                    " the microbatches of a step cannot be disjoint draws from that many samples"
                )
        self._estimator.add_small_sum(self._taps.take_window(scale), self._window_size, self._backwards)
        if self._backwards * trainer.world_size == 1:
            self._add_half_batch(trainer, pl_module)
        # Lightning unscales fp16 gradients before this hook, except for optimizers that unscale in their
        # own step (fused Adam) and for steps whose last microbatch skipped its backward (returned None).
        unscaled = not unscales_in_step(optimizer) and self._last_backward
        applied = self._taps.accumulated_sq_norms(1.0 if unscaled else scale)
        all_reduce = _sum_over_ranks if trainer.world_size > 1 else None
        self._estimator.step(applied, all_reduce, applied_is_sharded=self._taps.reads_shards)
        self._reduced = True

    def _skip_step_on_all_ranks(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A rank whose monitor failed still joins each measured step's all-reduce, with non-finite values: no
        rank waits for it, and every rank skips the step alike (counted in ``snr/skipped_steps``). The vector
        has the length the healthy ranks use now, for the parameters that train now (they may have changed
        since this rank failed, or this rank may have failed before it built its estimator)."""
        optimized = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        names = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) in optimized]
        if not names:
            return  # the healthy ranks have nothing to measure either
        groups = len(group_parameters(names, self.groups)[0])
        length = groups + 4 + (groups if self._sharded else 0)
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
        _sum_over_ranks(torch.full((length,), math.nan, dtype=dtype, device=pl_module.device))
        if self._estimator is not None:
            self._estimator.discard_step()
            self._estimator.skipped += 1

    def _add_half_batch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The split-batch fallback: one extra small gradient from the first half of the batch."""
        full_size = int(count_samples(self._batch))
        if full_size < 2:
            self._warn_once(
                "tiny_batch",
                f"SNRMonitor(split_batch=True): a batch of {full_size} sample cannot be split in two; such"
                " steps are not measured.",
            )
            return
        half = apply_to_collection(
            self._batch, Tensor, lambda t: t[: full_size // 2] if t.ndim and len(t) == full_size else t
        )
        scale = loss_scale(trainer)
        device = pl_module.device
        rng_devices = [device] if device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=rng_devices),
            _restored_python_and_numpy_random(),
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

    def _check_unambiguous(self, batch: Any, size: int) -> None:
        """Once a fit: say so if the batch's tensors disagree on their leading dimension (e.g. a list of
        per-sample tensors beside a target), since the default count may then be wrong."""
        self._warned.add("ambiguous_batch")  # checked once (a tree walk), warned at most once
        leading: set[int] = set()
        apply_to_collection(batch, Tensor, lambda t: leading.add(len(t)) if t.ndim else None)
        if len(leading) > 1:
            rank_zero_warn(
                f"SNRMonitor: the batch's tensors have leading dimensions {sorted(leading)}; it counts {size}"
                " samples (the first tensor's). If the loss is a mean over another count, pass"
                " `SNRMonitor(batch_size_fn=...)`."
            )

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            rank_zero_warn(message)

    # ------------------------------------------------------------------ logging
    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._estimator is None:
            return
        estimator = self._estimator
        values = estimator.compute()
        names, tensors = [], []
        for index, group in enumerate(self._group_names):
            prefix = f"{self.prefix}/" if group == TOTAL else f"{self.prefix}/{group}/"
            for key, value in values.items():
                names.append(prefix + key)
                tensors.append(value[index])
        counters = {"batch_size": estimator.batch_size, "skipped_steps": estimator.skipped}
        counters["dropped_windows"] = estimator.dropped
        names += [f"{self.prefix}/{key}" for key in counters]
        tensors += [*counters.values(), estimator.updates]
        *numbers, updates = torch.stack([t.to(torch.float64) for t in tensors]).tolist()  # the one host sync
        latest = dict(zip(names, numbers, strict=True))
        if math.isfinite(estimator.dataset_size):
            latest[f"{self.prefix}/dataset_size"] = estimator.dataset_size
        if updates == 0:  # no estimate yet: only say if steps were skipped or dropped
            counts = [f"{self.prefix}/skipped_steps", f"{self.prefix}/dropped_windows"]
            latest = {key: latest[key] for key in counts if latest[key]}
            if not latest:
                return
        self.latest = latest
        step = logging_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(self.latest, step=step)
        log_bands(trainer.loggers, self.latest, step, self.prefix)  # edges of the TensorBoard band charts
        ratio = self.latest.get(f"{self.prefix}/ratio", math.nan)
        if self.prog_bar and ratio == ratio:
            pl_module.log(f"{self.prefix}/ratio", ratio, prog_bar=True, logger=False)

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
        # Lightning restores callbacks before fit starts; the EMAs are restored once parameters are watched.
        self._pending_state = state_dict

    def _load_estimator(self, state: dict[str, Any]) -> None:
        if not state:
            return
        try:
            saved_decay = state["estimator"]["ema_decay"]
            if state.get("group_names") != self._group_names:
                rank_zero_warn(
                    f"SNRMonitor: the checkpoint's groups {state.get('group_names')} differ from this run's"
                    f" {self._group_names}; the EMAs start afresh."
                )
                return
            self._estimator.load_state_dict(state["estimator"])
            if not bool(torch.isfinite(self._estimator.moments).all()):  # once, at resume
                raise ValueError("its moments are not finite")
        except Exception as error:
            self._estimator.reset()
            rank_zero_warn(
                "SNRMonitor: the checkpoint's monitor state could not be used"
                f" ({type(error).__name__}: {error}); the EMAs start afresh."
            )
            return
        if saved_decay != self.ema_decay:
            rank_zero_warn(
                f"SNRMonitor: the checkpoint was smoothed with ema_decay={saved_decay}, this run uses"
                f" {self.ema_decay}; the bias correction of the restored EMAs is approximate."
            )


def count_samples(batch: Any) -> int:
    """The default ``batch_size_fn``: the leading dimension of the batch's first tensor that has one (0-dim
    tensors, such as a per-batch scalar, are skipped)."""
    # The usual batch (a tensor, or a tuple, list or dict starting with one) without the generic tree walk:
    # this runs once per microbatch.
    first = batch
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
    elif isinstance(batch, dict) and batch:
        first = next(iter(batch.values()))
    if isinstance(first, Tensor) and first.ndim:
        return len(first)
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(len(t)) if t.ndim else None)
    if not sizes:
        raise ValueError(f"the batch ({type(batch).__name__}) holds no tensor with a leading dimension")
    return sizes[0]


def _fsdp2_taps(
    pl_module: LightningModule, names: list[str], parameters: list[torch.nn.Parameter], membership: Tensor
) -> ShardedGradientTaps:
    """Taps for a module sharded with ``fully_shard`` on a 1-D data-parallel mesh; refuses anything else."""
    plain = [name for name, p in zip(names, parameters, strict=True) if not isinstance(p, DTensor)]
    if plain:
        raise ValueError(
            "under ModelParallelStrategy every trainable parameter must be sharded with `fully_shard` (apply"
            f" it to the root module in `configure_model`); not sharded: {plain[:3]}"
        )
    if any(p.device_mesh.ndim != 1 for p in parameters):
        raise ValueError(
            "hybrid sharding (a 2-D mesh) is not supported: SNRMonitor measures FSDP2 on one data-parallel"
            " mesh dimension"
        )
    modules = [(name, module) for name, module in pl_module.named_modules() if isinstance(module, FSDPModule)]
    return ShardedGradientTaps(parameters, membership, names, modules)


def _holds_metrics(pl_module: LightningModule) -> bool:
    try:
        from torchmetrics import Metric
    except ImportError:
        return False
    return any(isinstance(module, Metric) for module in pl_module.modules())


@contextlib.contextmanager
def _restored_python_and_numpy_random() -> Iterator[None]:
    """`torch.random.fork_rng` covers torch only; a `training_step` may also draw from `random` or NumPy."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


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
