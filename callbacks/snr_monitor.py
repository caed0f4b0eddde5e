"""SNRMonitor: gradient signal, noise, noise scale and SNR of a Lightning run, live (theory T1–T5): the
Lightning adapter over :class:`~snrmon.GradientMeter`."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from snrmon.callbacks._batch_size import (
    count_samples,
    samples_in,
    warn_if_leading_dimensions_differ,
)
from snrmon.callbacks._lightning import (
    ddp_comm_hooks,
    logging_step,
    should_log,
    step_of_last_batch,
    window_ends,
)
from snrmon.callbacks._split_batch import backward_aside, first_half
from snrmon.callbacks._supported import check_supported_run
from snrmon.callbacks._training_set import announce, run_population
from snrmon.callbacks.tensorboard_layout import add_snr_layout, log_chart_series
from snrmon.callbacks.tensorboard_loss_runs import close_loss_runs, log_loss_runs
from snrmon.measure.estimator import GradientNoiseEstimator
from snrmon.measure.groups import TOTAL, check_groups
from snrmon.measure.meter import GradientMeter, check_ema_decay, check_every_n_steps
from snrmon.measure.sampling import Population, check_dataset_size
from snrmon.measure.taps import GradientTaps

# What every logger gets by default: the values, per total and per group. The standard errors, the counters
# (batch size, skipped steps, dropped windows, dataset size) and the per-group finite-set values are many
# flat or secondary curves (124 cards in TensorBoard's Time Series for the demo's 8 groups); they stay in
# `latest` and are logged with `log_details=True`. The totals' bands are drawn from them all the same.
LOGGED_TOTALS = ("signal", "noise", "noise_scale", "ratio", "signal_beyond_chance", "dataset_snr")
LOGGED_PER_GROUP = ("signal", "noise", "noise_scale", "ratio")


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

    The measuring is :class:`~snrmon.GradientMeter`'s (:attr:`meter`, made at the start of each fit), the one
    framework-free implementation of the protocol; this callback turns Lightning's hooks into the meter's
    calls and adds only what is Lightning's: the batch size read off the batch, N read off the dataloader, the
    split-batch fallback, the strategy checks, the loggers, rank-zero messages, and disabling itself (with a
    warning) rather than stopping the run when something fails.

    When the microbatches of a step are disjoint draws from a finite training set of N samples (a shuffled
    map-style dataset, ``DistributedSampler`` shards), T2 alone would estimate |G|² − S²/N; the monitor reads
    N off the training dataloader (or ``dataset_size``) and reports the training-set |G|² the optimizer
    descends, plus ``signal_beyond_chance`` (|G|² − S²/N) and ``dataset_snr`` (N|G|²/S²). One info line at
    the start says which case the run is in.

    Kept in :attr:`latest` on ``log_every_n_steps``, at each check of a ``BasinEarlyStopping`` that reads it
    (:meth:`refresh`) and at the end of training: ``snr/signal``,
    ``snr/noise``, ``snr/noise_scale`` (in samples), ``snr/ratio`` (SNR at the current batch size), each with
    a ``_se`` standard error, ``snr/batch_size``, ``snr/skipped_steps`` (steps with non-finite gradients),
    ``snr/dropped_windows`` (accumulation windows the optimizer never applied), with a finite training set
    ``snr/signal_beyond_chance``, ``snr/dataset_snr`` (with ``_se``) and ``snr/dataset_size``, and per group
    ``snr/<group>/...``. Every configured logger gets, under the same names, the totals' values and the
    groups' signal, noise, noise scale and SNR; with ``log_details=True`` everything in :attr:`latest`.
    TensorBoard loggers also get the series of snrmon's Custom Scalars charts, under ``~snr/``.
    :attr:`latest_steps` counts the optimizer steps measured into :attr:`latest`: it grows with each new
    estimate (a logging step with no step measured since the last rebuilds :attr:`latest` with the same
    values); ``BasinEarlyStopping`` reads ``dataset_snr`` from a new estimate only.

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
        log_details: also log the standard errors, the counters and the groups' finite-set values (always
            in :attr:`latest`).

    Raises:
        MisconfigurationException: at setup, for a sharded or XLA strategy, manual optimization, or
            ``split_batch=True`` on a module that holds torchmetrics metrics (their updates inside the extra
            ``training_step`` could not be undone); at fit start, for ``groups`` by depth that would name a
            group ``total`` (a submodule of that name), the name of the sum over all parameters. Two monitors
            with the same ``prefix`` share a ``state_key``, which Lightning refuses when the ``Trainer`` is
            made.
        ValueError: an invalid ``every_n_steps``, ``ema_decay``, ``groups``, ``dataset_size`` or ``prefix``;
            a ``batch_size_fn`` that is not callable; ``split_batch``, ``prog_bar`` or ``log_details`` not a
            bool.

    Example::

        trainer = Trainer(accumulate_grad_batches=4, callbacks=[SNRMonitor(groups=2)])
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        ema_decay: float = 0.95,
        groups: int | dict[str, str] | None = None,
        # It may return an int, a float or a Tensor. Annotated float because LightningCLI (jsonargparse) then
        # takes a function without a return annotation, or one annotated int or Tensor (not with a union
        # holding a class, nor with SupportsFloat, which refuses an unannotated function).
        batch_size_fn: Callable[[Any], float] | None = None,
        split_batch: bool = False,
        dataset_size: float | None = None,  # (float: a config's `.inf` for independent draws)
        prefix: str = "snr",
        prog_bar: bool = True,
        log_details: bool = False,
    ):
        check_every_n_steps(every_n_steps)
        check_ema_decay(ema_decay)
        check_groups(groups)
        check_dataset_size(dataset_size)
        if not isinstance(prefix, str) or not prefix.strip("/ "):
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ValueError(f"batch_size_fn must be None or a function of a batch, got {batch_size_fn!r}")
        flags = {"split_batch": split_batch, "prog_bar": prog_bar, "log_details": log_details}
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.every_n_steps = int(every_n_steps)
        self.ema_decay = float(ema_decay)
        self.groups = groups
        self.batch_size_fn = batch_size_fn or count_samples
        self.split_batch = split_batch
        # (LightningCLI gives a whole number as a float, a sweep a numpy number: said and logged as the int
        # it is)
        finite = dataset_size is not None and dataset_size != math.inf
        self.dataset_size = int(dataset_size) if finite else dataset_size
        self.prefix = prefix.strip("/ ")
        self.prog_bar = prog_bar
        self.log_details = log_details
        self.latest: dict[str, float] = {}
        # The optimizer steps measured into `latest`: a larger count is a new estimate (a logging step with no
        # measured step since the last one rebuilds `latest` with the same values).
        self.latest_steps = 0

        self._meter: GradientMeter | None = None  # made at fit start
        self._pending_state: dict[str, Any] | None = None  # a checkpoint's, until the meter is made
        self._carried_state: dict[str, Any] = {}  # a pickled copy's ended meter's (see __getstate__)
        self._rank = 0
        self._sharded = False  # FSDP2, known at setup
        self._ended_at_step = -1  # global step at the end of this monitor's last fit
        self._fitting = False  # between on_fit_start and the fit's end
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        self._disabled = False
        self._warned: set[str] = set()  # topics warned about in this fit: each once a fit
        self._logged_step = -1  # the step the values were last logged at
        self._closed_step = -1  # global step of the last measured on_before_optimizer_step
        self._population: Population | None = None
        self._announced: Population | None = None  # the population last said (at a measured window)
        self._batch: Any = None
        self._batch_idx = 0

    @property
    def state_key(self) -> str:
        # Only what makes two monitors different sinks: a resume may change every_n_steps or groups.
        return self._generate_state_key(prefix=self.prefix)

    @property
    def meter(self) -> GradientMeter | None:
        """The :class:`~snrmon.GradientMeter` that measures for this monitor (made at the start of a fit)."""
        return self._meter

    # The meter's taps and estimator, as tests and benchmarks/overhead.py look at them.
    @property
    def _taps(self) -> GradientTaps | None:
        return self._meter.taps if self._meter is not None else None

    @property
    def _estimator(self) -> GradientNoiseEstimator | None:
        return self._meter.estimator if self._meter is not None else None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_supported_run(trainer.strategy, pl_module, self.split_batch)
        self._sharded = isinstance(trainer.strategy, ModelParallelStrategy)

    def _namespaces(self) -> set[str]:
        """The folders this monitor logs into: its prefix, and one per named group."""
        named = self.groups.keys() if isinstance(self.groups, Mapping) else ()
        return {self.prefix} | {f"{self.prefix}/{group}" for group in named}

    def _check_names_apart(self, trainer: Trainer) -> None:
        """Two monitors whose names compose to the same tag (prefix "snr" with a group "attn", and prefix
        "snr/attn") would overwrite each other's values: refused before training. (Groups by depth are named
        only once the module is walked, and are not checked.)"""
        for other in trainer.callbacks:
            if isinstance(other, SNRMonitor) and other is not self:
                shared = self._namespaces() & other._namespaces()
                if shared:
                    raise MisconfigurationException(
                        f"two SNRMonitors would both log under {sorted(shared)[0]!r}/ (prefixes"
                        f" {self.prefix!r} and {other.prefix!r} with their groups): give them prefixes that"
                        " do not compose to the same names"
                    )

    def _check_depth_groups(self, pl_module: LightningModule) -> None:
        """Groups by depth are named after the module's submodules; one named ``total`` would take the name of
        the sum over all parameters (a dict of groups is checked when the monitor is made)."""
        if not isinstance(self.groups, int):
            return
        depth = self.groups
        names = [name for name, _ in pl_module.named_parameters()]
        clashing = [name for name in names if ".".join(name.split(".")[:depth]) == TOTAL]
        if clashing:
            raise MisconfigurationException(
                f"SNRMonitor(groups={depth}) would name a group {TOTAL!r} (parameters {clashing[:3]}), the"
                " name of the sum over all parameters: rename that submodule, or pass groups as a dict"
                " {group name: regex} with other names"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_names_apart(trainer)
        self._check_depth_groups(pl_module)  # here, not at setup: `configure_model` has made the layers
        self.latest, self.latest_steps = {}, 0  # values of an earlier fit must not pass for this one's
        self._reset_fit_state()
        self._rank = trainer.global_rank
        # A `fit` that goes on where this monitor's last one ended (the same Trainer fitted again) keeps the
        # EMAs; any other starts afresh, or from a checkpoint's state. Either is restored into a new meter on
        # this fit's module when it first watches parameters.
        going_on = trainer.global_step != 0 and trainer.global_step == self._ended_at_step
        ended = self._meter.state_dict() if self._meter is not None else self._carried_state
        state = ended if going_on else {}
        self._carried_state = {}
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
        if self._meter is not None:
            self._meter.close()
        self._meter = GradientMeter(
            pl_module,
            groups=self.groups,
            dataset_size=self.dataset_size,
            # Lightning's fp16 plugin: its GradScaler (MixedPrecision.scaler); other plugins have none.
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            ema_decay=self.ema_decay,
            every_n_steps=self.every_n_steps,
            optimizers=lambda: trainer.optimizers,
            sharded=self._sharded,
            world_size=trainer.world_size,
            warn=self._meter_warning,
            info=lambda message: rank_zero_info(f"SNRMonitor: {message}"),
        )
        if state:
            self._meter.load_state_dict(state)
        self._fitting = True

    @_never_crash
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sharded:
            # FSDP2 taps find their hooks during a forward: they must be attached before the first one.
            self._meter.watch()
            self._meter.attach_ahead(trainer.global_step)
        # A fit resumed inside an epoch gets no `on_train_epoch_start` for that epoch: N is read here too.
        self._read_population(trainer)

    @_never_crash
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._meter.walk_again()  # at the next measured window: it may have new tensors
        if self._sharded:
            # Watched now, between steps, when FSDP2 holds every parameter sharded: after a forward the root
            # module's parameters are its unsharded ones, which only the taps should see.
            self._meter.watch()
        self._read_population(trainer)  # dataloaders may be reloaded between epochs

    def _read_population(self, trainer: Trainer) -> None:
        """N off the training dataloader (or ``dataset_size``), said once per change."""
        population = run_population(trainer, self.dataset_size, self.batch_size_fn)
        if population != self._population:
            self._population = population
            self._meter.dataset_size = population.size or math.inf

    # ------------------------------------------------------------------ per accumulation window
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    @_never_crash
    def on_before_zero_grad(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning zeroes the gradients after the first forward and before the first backward of every
        # accumulation window: the window starts here. (Microbatches still pending belong to a window the
        # optimizer never applied: a user's `optimizer_step` that skipped `optimizer.step()`, an epoch cut
        # short by `on_train_batch_start` returning -1. The meter drops and counts them.)
        step = trainer.global_step
        measure = self._meter.measures(step) and self._two_batch_sizes(trainer)
        if measure and self._announced != self._population:
            # Said at the first window measured (a GradientAccumulationScheduler may give two batch sizes only
            # later), and again when the population changes.
            self._announced = self._population
            announce(self._population)
        self._meter.start_window(step, measure=measure)

    def _single_batch_size(self, trainer: Trainer) -> bool:
        return trainer.world_size == 1 and trainer.accumulate_grad_batches == 1 and not self.split_batch

    def _two_batch_sizes(self, trainer: Trainer) -> bool:
        if self._single_batch_size(trainer):
            self._warn_once(
                "single_batch",
                "SNRMonitor: one device and `accumulate_grad_batches=1` give a single batch size per step,"
                " so signal and noise cannot be separated: while it does, nothing is measured and no hook is"
                " installed. Use gradient accumulation, several devices, or `SNRMonitor(split_batch=True)`"
                " (about half a forward/backward extra per measured step; raise `every_n_steps` to spend"
                " less).",
            )
            return False
        return True

    # ------------------------------------------------------------------ per microbatch
    @_never_crash
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        # Cleared here, not at batch start: `torch.autograd.grad` inside `training_step` (a gradient penalty,
        # gradient-norm logging) also runs the hooks; only what this backward adds to `.grad` counts.
        self._meter.before_backward()

    @_never_crash
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._meter.measuring:
            size = self._batch_size(self._batch)
            try:
                self._meter.after_backward(size)  # (the meter checks the count: one check, not two)
            except (TypeError, ValueError) as error:
                raise ValueError(f"batch_size_fn returned {size!r} for a batch: {error}") from error

    def _batch_size(self, batch: Any) -> float | Tensor:
        size = samples_in(batch, self.batch_size_fn)
        if self.batch_size_fn is count_samples and "ambiguous_batch" not in self._warned:
            self._warned.add("ambiguous_batch")  # checked once (a tree walk), warned at most once
            warn_if_leading_dimensions_differ(batch, size)
        return size

    # ------------------------------------------------------------------ per optimizer step
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        meter, several_ranks = self._meter, trainer.world_size > 1
        try:
            if self._disabled:
                if several_ranks and meter is not None and meter.measures(trainer.global_step):
                    meter.skip_step()  # the other ranks wait for this one in the step's all-reduce
                return
            try:
                self._check_step(trainer)
                one_gradient = meter.backwards_in_window * trainer.world_size == 1
                if meter.measuring and self.split_batch and one_gradient:
                    self._add_half_batch(trainer, pl_module)
            except Exception:
                if several_ranks and meter.measures(trainer.global_step):
                    meter.skip_step()
                raise
            # Lightning divides each microbatch loss by `accumulate_grad_batches` (also in an epoch's shorter
            # last window), and has unscaled fp16 gradients by now where the scaler's state says so.
            meter.before_step(accumulation=trainer.accumulate_grad_batches)  # (joins the ranks even failing)
        except Exception as error:
            self._disable(f"{type(error).__name__} in on_before_optimizer_step: {error}")

    def _check_step(self, trainer: Trainer) -> None:
        """What Lightning can do to a step that the meter cannot measure."""
        if trainer.global_step == self._closed_step:  # (on_before_zero_grad may not run again in between)
            raise RuntimeError(
                "the optimizer evaluated its closure more than once in one step (LBFGS and other"
                " line-search optimizers, or an `optimizer_step` that calls `optimizer.step()` twice):"
                " each evaluation is a new gradient at new parameters, not a microbatch of one step, so"
                " signal and noise cannot be separated"
            )
        if not self._meter.measuring:
            return
        self._closed_step = trainer.global_step
        if trainer.world_size > 1 and ddp_comm_hooks(trainer):
            raise RuntimeError(
                "a DDP communication hook is registered (PowerSGD, gradient compression, ...): the applied"
                " gradient is then not the mean of the ranks' gradients, so signal and noise cannot be"
                " separated"
            )

    def _add_half_batch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The split-batch fallback: one extra small gradient from the first half of the batch."""
        full_size = int(count_samples(self._batch))
        if full_size < 2:
            self._warn_once(
                "tiny_batch",
                f"SNRMonitor(split_batch=True): a batch of {full_size} sample cannot be split in two; such"
                " steps are not measured.",
            )
            self._meter.discard_window()
            return
        half = first_half(self._batch, full_size)
        backward_aside(trainer, pl_module, half, self._batch_idx, self._meter, self.batch_size_fn(half))

    # ------------------------------------------------------------------ logging
    @_never_crash
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # At the end of every window, stepped or not (a window whose `optimizer.step()` was skipped is still a
        # logging step for Lightning), where Lightning logs the module's own step metrics.
        if window_ends(trainer) and should_log(trainer):
            self._log(trainer, pl_module)
        log_loss_runs(trainer, "on_train_batch_end")  # each loss its own colour in TensorBoard

    @_never_crash
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_loss_runs(trainer, "on_train_epoch_end")

    @_never_crash
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_loss_runs(trainer, "on_validation_end")

    @property
    def finite_training_set(self) -> bool:
        """Whether the training batches are drawn from a finite set of known size (the finite-set values)."""
        return self._estimator is not None and math.isfinite(self._estimator.dataset_size)

    def _logged(self, name: str) -> bool:
        """Whether the value named ``name`` (a key of :attr:`latest`) goes to the loggers."""
        if self.log_details:
            return True
        key = name[len(self.prefix) + 1 :]
        group, _, quantity = key.rpartition("/")
        return quantity in (LOGGED_PER_GROUP if group else LOGGED_TOTALS)

    @_never_crash
    def refresh(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Bring :attr:`latest` up to date now, and log it, when steps were measured since it was last built
        (one host sync): for a callback that reads :attr:`latest` between logging steps, as
        ``BasinEarlyStopping`` does at each check (else a check would read the estimate of the last logging
        step, up to ``log_every_n_steps`` old). Call it on every rank, outside ``training_step``."""
        if self._meter is not None and self._meter.updated_since_snapshot():
            # At the batch's own logging step: a periodic check runs in its hooks, and a validation right
            # after them, before Lightning counts the batch (where it logs the validation's metrics too).
            self._log(trainer, pl_module, at_end=False, progress_bar=False)

    def _log(
        self, trainer: Trainer, pl_module: LightningModule, at_end: bool = False, progress_bar: bool = True
    ) -> None:
        """``at_end``: after training (Lightning has counted the last batch): logged at that batch's step,
        and not to the progress bar. Once a step: a refresh at a check made there already logged it."""
        step = step_of_last_batch(trainer) if at_end else logging_step(trainer)
        if step == self._logged_step:
            return
        latest = self._meter.snapshot(self.prefix) if self._meter is not None else {}  # the one host sync
        if not latest:  # nothing measured yet, nor skipped or dropped
            return
        self.latest, self.latest_steps, self._logged_step = latest, self._meter.measured_steps, step
        if trainer.is_global_zero:  # now that it is known whether the training set is finite
            add_snr_layout(trainer)
        logged = {name: value for name, value in latest.items() if self._logged(name)}
        if logged:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)
        log_chart_series(trainer.loggers, latest, step, self.prefix)  # the TensorBoard charts' lines
        ratio = self.latest.get(f"{self.prefix}/ratio", math.nan)
        if self.prog_bar and ratio == ratio and progress_bar and not at_end:
            pl_module.log(f"{self.prefix}/ratio", ratio, prog_bar=True, logger=False)

    # ------------------------------------------------------------------ end of fit
    @_never_crash
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Steps measured since the last logging step (all of them in a fit shorter than `log_every_n_steps`)
        # would be in neither `latest` nor the logs: computed and logged once more, at the last step. (The
        # progress bar cannot take values after training.) One host sync, after training.
        if self._meter is not None and self._meter.updated_since_snapshot():
            self._log(trainer, pl_module, at_end=True)
        said = {"single_batch", "nothing_trains"} & self._warned  # (why nothing was measured, said already)
        if self._meter is not None and not self.latest and not said and not self._disabled:
            # E.g. `fast_dev_run`: one microbatch, the shorter last window of its epoch.
            self._warn_once(
                "nothing_measured",
                "SNRMonitor: no optimizer step of this fit was measured (it ended at global step"
                f" {trainer.global_step}), so `latest` is empty and nothing was logged. Measured are every"
                f" {self.every_n_steps}-th step (`every_n_steps`) that has two or more microbatches (or"
                " ranks); not an epoch's shorter last window of one microbatch, nor a window whose every"
                " `training_step` returned None.",
            )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ended_at_step = trainer.global_step
        self._fitting = False
        close_loss_runs(trainer)
        if self._meter is not None:
            self._meter.detach()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._ended_at_step = -1  # a failed fit is not one to go on from
        self._fitting = False
        close_loss_runs(trainer)
        if self._meter is not None:
            self._meter.detach()  # never leave hooks on the user's model

    # ------------------------------------------------------------------ failure and state
    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            rank_zero_warn(message)

    def _meter_warning(self, topic: str | None, message: str) -> None:
        if topic is None:
            rank_zero_warn(f"SNRMonitor: {message}")
        else:
            self._warn_once(topic, f"SNRMonitor: {message}")

    def _disable(self, reason: str) -> None:
        self._disabled = True
        if self._meter is not None:
            self._meter.detach()
        # Every rank says it: under DDP the failing rank may not be rank zero.
        warnings.warn(
            f"SNRMonitor disabled itself on rank {self._rank}, training continues: {reason}", stacklevel=2
        )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":  # a checkpoint loaded to validate or test (ckpt_path=) is no state for a later fit
            self._pending_state = None

    def state_dict(self) -> dict[str, Any]:
        if self._meter is None or self._pending_state is not None:
            return dict(self._pending_state or self._carried_state)
        return self._meter.state_dict()

    def __getstate__(self) -> dict[str, Any]:
        # The meter is bound to one fit (its module's tensor hooks, the trainer's optimizers): a pickled copy
        # carries its state instead, as a checkpoint does, and makes a new meter at its next fit.
        state = self.__dict__.copy()
        if self._meter is not None:
            state["_meter"], state["_carried_state"] = None, self._meter.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before fit starts, or under ModelParallelStrategy after it; the fit's
        # meter restores the EMAs once it watches parameters.
        if self._fitting:
            self._meter.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict
