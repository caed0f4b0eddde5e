"""GradientMeter: the measurement protocol of snrmon, framework-free, for any training loop.

This is the one implementation of the protocol: which backward enters a step's window and with which weight,
when the applied gradient is read, the division by the loss scale and by K, joining the ranks in one
all-reduce, skipped and dropped windows, measured and unmeasured steps, the parameters watched (and watched
anew when which of them train changes, FSDP2's sharded ones included) and the finite-set correction. It drives
:class:`~snrmon.measure.taps.GradientTaps` (the hooks) and
:class:`~snrmon.measure.estimator.GradientNoiseEstimator` (the arithmetic). A plain loop calls it directly;
the Lightning ``SNRMonitor`` is an adapter that only turns Lightning's hooks into the same calls.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from snrmon.measure.estimator import GradientNoiseEstimator
from snrmon.measure.groups import TOTAL, check_groups, group_parameters
from snrmon.measure.sampling import check_dataset_size
from snrmon.measure.taps import NARROW_DTYPES, GradientTaps, several_gradients_message
from snrmon.measure.trainable import TrainableParameters, make_taps

_log = logging.getLogger("snrmon")


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Sum over ``torch.distributed`` ranks in place: a plain all-reduce, no barrier (a barrier, as in
    Lightning's ``strategy.reduce``, would block the host on every measured step; an all-reduce is a device
    collective, not a host sync under NCCL)."""
    torch.distributed.all_reduce(tensor)
    return tensor


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside wrappers that hold exactly its parameters: ``DistributedDataParallel``,
    ``DataParallel`` and Lightning Fabric's module (their ``.module``), ``torch.compile`` (``._orig_mod``).
    Parameter names, and so groups by depth or regex, are then the model's own (``blocks.0``, not
    ``_forward_module.module.blocks.0``). Duck-typed, so that the core imports no framework; a ``.module``
    that holds only some of the parameters is a part of the model, not a wrapper, and is left alone."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        if {id(p) for p in inner.parameters()} != {id(p) for p in model.parameters()}:
            return model
        model = inner


def _world_size() -> int:
    """The number of ranks if a process group is initialised, else 1."""
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if available else 1


def _checked_number(name: str, value: object, device: torch.device | None) -> float | Tensor:
    """A microbatch's size or weight: a number > 0 (as a float: a numpy number would fail in the tensor
    arithmetic), or a one-element real tensor on ``device`` or the host (as a 0-dim tensor on ``device``).
    A tensor's value is not read here, which would sync: :meth:`GradientMeter.before_step` makes a step
    with one that is not > 0 count as such, and :meth:`GradientMeter.compute` says so. Anything else would
    fail at ``before_step``, far from the call, or be taken silently (``True`` as 1)."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a number or a one-element real tensor, not a {value.dtype} one")
        if value.numel() != 1:
            shape = tuple(value.shape)
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {shape}")
        value = value.detach().reshape(())
        if device is not None and value.device != device:
            if value.device.type != "cpu":
                raise ValueError(
                    f"{name} is a tensor on {value.device}, the measured parameters are on {device}: give a"
                    f" number or a tensor on {device}"
                )
            # A host tensor (a batch_size_fn's torch.tensor(len(batch))): copied over, which waits for
            # nothing queued on the device.
            value = value.to(device)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # (numpy's numbers are Real)
        raise TypeError(f"{name} must be a number or a one-element tensor, got {value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _nan_unless_positive(total: float | Tensor, values: list[Tensor]) -> float | Tensor:
    """``total``, or NaN if one of the device tensors ``values`` is not a finite number > 0: checked on the
    device, without a sync; the estimator counts the NaN as a bad size, not as a non-finite gradient."""
    if not values:
        return total
    stacked = torch.stack(values)
    return torch.where(((stacked > 0) & (stacked < math.inf)).all(), total, math.nan)


# Squared gradient norms whose mean over a group's float32 (or narrower) entries is below this are not
# measured well: the norms of those gradients are taken in float32, where entries below ~1e-20 square to
# subnormal numbers (down to 1.4e-45) that keep few digits or none; above it they keep about four. Float64 and
# complex gradients have norms of their own precision; exactly zero gradients (no gradient at all) are a value
# of their own.
FLOAT32_FLOOR_PER_ENTRY = 1e-41


# (numbers.Integral and numbers.Real: numpy's integers and floats too, as a config or a sweep gives them)
def check_every_n_steps(every_n_steps: object) -> None:
    whole = isinstance(every_n_steps, numbers.Integral) and not isinstance(every_n_steps, bool)
    if not whole or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")


def check_accumulation(accumulation: object) -> None:
    if accumulation is not None and (
        isinstance(accumulation, bool) or not isinstance(accumulation, numbers.Integral) or accumulation < 1
    ):
        raise ValueError(f"accumulation must be None or an int >= 1, got {accumulation!r}")


def check_ema_decay(ema_decay: object) -> None:
    real = isinstance(ema_decay, numbers.Real) and not isinstance(ema_decay, bool)
    if not real or not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be a number in [0, 1), got {ema_decay!r}")


class GradientMeter:
    r"""Measure gradient signal |G|², noise tr(Σ), noise scale and SNR in any training loop.

    The microbatches of one optimizer step (gradient accumulation, and/or one local gradient per
    ``torch.distributed`` rank) give *small* gradients; the gradient the optimizer applies is the *large* one.
    Tensor hooks read each microbatch's squared gradient norms before autograd accumulates them;
    :meth:`before_step` reads the applied gradient. From the two batch sizes the estimator forms per-step
    signal and noise (T2, T3 of ``docs/theory.md``) and smooths them with bias-corrected EMAs. Everything
    stays on the training device until :meth:`compute`, the only host sync.

    The loop must make the applied gradient the mean of its microbatches' mean gradients, as Lightning does:
    each microbatch backpropagates its *mean* loss divided by K, the number of microbatches this rank runs in
    the step, and under ``torch.distributed`` (DDP) the ranks' gradients are averaged. With several ranks,
    :meth:`before_step` sums the step's few numbers over ranks in one all-reduce: the per-step estimates are
    ratios of those sums, so the ranks cannot be joined later, at :meth:`compute`. Every rank must call it.

    :meth:`compute` returns ``signal``, ``noise``, ``noise_scale`` (in samples), ``ratio`` (SNR at the current
    batch size), each with ``_se``, ``batch_size``, ``skipped_steps`` (steps left out: non-finite gradients,
    or a window without a backward), ``dropped_windows`` (windows whose step never came), with
    ``dataset_size`` also ``signal_beyond_chance``, ``dataset_snr`` (with ``_se``) and ``dataset_size``, and
    per group ``<group>/signal`` and so on: the keys of ``SNRMonitor.latest`` without its ``"snr/"`` prefix.

    **Windows.** A plain loop needs only :meth:`after_backward` and :meth:`before_step`: the meter watches the
    parameters that require a gradient when it is made, hooks them at once, and opens each step's window when
    the last one closes. An adapter to a framework (``SNRMonitor``; a Trainer callback) also calls
    :meth:`start_window` before each step's first backward, with the framework's step number: it then measures
    only every ``every_n_steps``-th step (no hook on the others), and, given ``optimizers``, watches the
    parameters those hold, re-read at every measured window.

    Args:
        model: the module whose parameters are measured (materialise lazy modules with a forward first, or
            pass ``optimizers``); a wrapped one (DDP, Fabric, ``torch.compile``) is named as the model inside
            (:func:`unwrap`).
        groups: also report per parameter group: an ``int`` depth groups by the first components of
            parameter names (``2``: ``"blocks.0"``), a dict maps group names to regexes.
        dataset_size: N, when the microbatches of a step are disjoint draws from a training set of N samples
            (a shuffled ``DataLoader``, ``DistributedSampler`` shards): the values are then the training
            set's, with the finite-set correction. ``None`` or ``math.inf``: independent draws. Each step's
            samples are checked against it (an N read off a loader later, by setting :attr:`dataset_size`, is
            not: a ``DistributedSampler`` pads its shards with repeats).
        scaler: the ``torch.amp.GradScaler`` of an fp16 loop: the microbatch and applied norms are divided by
            its scale (read as a device tensor, no sync). :meth:`before_step` may come before or after
            ``scaler.unscale_(optimizer)``; the meter reads which from the scaler.
        ema_decay: EMA factor β for signal and noise; the window is about (1 + β) / (1 − β) steps.
        every_n_steps: measure on every n-th optimizer step; on the others no hook is installed.
        optimizers: returns the optimizers whose parameters train. Given, the meter watches the tensors they
            hold that require a gradient, from the first measured :meth:`start_window` on, and re-reads them
            on every measured window: when they change, the taps and the EMAs start anew. ``None``: the
            parameters that require a gradient when the meter is made, for its whole life.
        sharded: the model is sharded with FSDP2's ``fully_shard`` on a 1-D mesh: the hooks go on the
            unsharded parameters during each forward, and the applied gradient is read from the local shards.
            The hooks must be on before the forward (:meth:`attach_ahead`).
        world_size: the number of ranks whose gradients the applied one averages; ``None``: the
            ``torch.distributed`` world size (1 without a process group).
        all_reduce: sums a tensor over the ranks in place and returns it; ``None``: ``torch.distributed``'s
            all-reduce (see :func:`sum_over_ranks`).
        warn: called with ``(topic, message)`` for a warning about the run (``topic`` ``None`` or a word
            to warn once per kind); ``None``: ``warnings.warn``, once per topic.
        info: called with a message about the run worth a line (the EMAs restart); ``None``: the ``snrmon``
            logger.

    Raises:
        ValueError: for a model without trainable parameters or with lazy ones (without ``optimizers``), a bad
            ``groups``, ``dataset_size``, ``ema_decay`` or ``every_n_steps``; at :meth:`after_backward`, a
            ``batch_size`` or ``weight`` number that is not > 0 and finite, a tensor one on another
            accelerator than the parameters (a host tensor is copied over), a weight for some microbatches of
            a step only, or a call while measuring when no watched parameter received a gradient since the
            last :meth:`after_backward` (or :meth:`before_backward`): a second call for one backward, or a
            call before its backward; at :meth:`before_step`, an ``accumulation`` that is not a whole number
            >= 1, a step of a single microbatch on a single process (no second batch size: no noise estimate
            is possible) or of more samples than ``dataset_size``; at :meth:`compute` and :meth:`snapshot`,
            once for the steps since the last such error, when a ``batch_size`` or ``weight`` given as a
            tensor was not a finite number > 0 (its value is read only there, where the meter syncs anyway):
            such steps are left out of the estimates and of ``skipped_steps``.
        TypeError: at :meth:`after_backward`, a ``batch_size`` or ``weight`` that is neither a number nor a
            one-element real tensor (``True``, ``torch.tensor(True)``).
        RuntimeError: :meth:`before_step` without any :meth:`after_backward` since the last step (unless
            ``accumulation`` is given: that window, every microbatch of which the loop skipped, is left out),
            :meth:`compute` before any measured step, any use after :meth:`close`, and a parameter that
            received several gradients where one backward was expected: several backwards without
            :meth:`after_backward` between them, or a gradient that arrives in parts (reentrant activation
            checkpointing).

    An :meth:`after_backward` that raises leaves the step unmeasured (its gradient holds a microbatch that
    could not be recorded) and the meter ready for the next step.

    Example::

        with GradientMeter(model, dataset_size=len(train_set)) as meter:
            for step in range(steps):
                for micro in microbatches:                   # K >= 2, or several ranks
                    (loss_fn(model, micro) / K).backward()
                    meter.after_backward(batch_size=len(micro))
                meter.before_step()                          # after unscaling, before clipping
                optimizer.step()
                optimizer.zero_grad()
            print(meter.compute()["noise_scale"])
    """

    def __init__(
        self,
        model: nn.Module,
        groups: int | dict[str, str] | None = None,
        dataset_size: float | None = None,
        scaler: Any = None,
        ema_decay: float = 0.95,
        *,
        every_n_steps: int = 1,
        optimizers: Callable[[], Iterable[torch.optim.Optimizer]] | None = None,
        sharded: bool = False,
        world_size: int | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        warn: Callable[[str | None, str], None] | None = None,
        info: Callable[[str], None] | None = None,
    ):
        check_groups(groups)
        check_dataset_size(dataset_size)
        check_ema_decay(ema_decay)
        check_every_n_steps(every_n_steps)
        self.model = model
        self.groups = groups
        self.scaler = scaler
        self.ema_decay = float(ema_decay)
        self.every_n_steps = int(every_n_steps)
        self.sharded = sharded
        self._checked_size = math.inf if dataset_size is None else float(dataset_size)
        self._dataset_size = self._checked_size
        self._world_size = world_size
        self._all_reduce = all_reduce or sum_over_ranks
        self._warn_callback, self._info_callback = warn, info
        self._warned: set[str] = set()
        # Which parameters are watched: re-read from the optimizers, or fixed now.
        self._trainable = TrainableParameters(model, optimizers) if optimizers is not None else None

        self.group_names: list[str] = []
        self._taps: GradientTaps | None = None
        self._estimator: GradientNoiseEstimator | None = None
        self._taps_are_new = False  # FSDP2 taps made since the current window's first forward
        self._pending_state: dict[str, Any] | None = None  # a state to restore into the next estimator
        self._closed = False
        self._windows_given = False  # whether start_window opens the windows (else before_step does)
        self._clears_before_backward = False  # whether before_backward clears the slots (else after_backward)
        self._step = 0  # the step of the current window
        self._measuring = False  # whether the current window is measured
        self._sizes: list[float | Tensor] = []  # samples of each microbatch of the window, this rank
        self._weights: list[float | Tensor | None] = []  # their weights (after_backward), None for 1/K
        self._extras = 0  # small gradients of the window the optimizer does not apply (backward_aside)
        self._steps = 0  # measured steps closed
        self._read_updates = 0  # the estimator's update count at the last snapshot
        if self._trainable is None:
            self._watch_now()
            self._measuring = True
            self._taps.attach()
            self._taps.start_backward()

    # ------------------------------------------------------------------ the loop's calls
    def start_window(self, step: int | None = None, measure: bool = True) -> bool:
        """Open the window of optimizer step ``step``, before its first backward (an adapter's call; a plain
        loop need not make it). Microbatches still recorded belong to a window whose step never came (a
        skipped ``optimizer.step()``, an epoch cut short): they are dropped, counted in ``dropped_windows``.
        Measured steps are every ``every_n_steps``-th, unless ``measure`` is ``False``; on a measured window
        the trainable parameters are re-read (given ``optimizers``) and the hooks installed, on others
        removed. Returns whether this window is measured."""
        self._check_open()
        self._windows_given = True
        if self._sizes:
            self._estimator.drop_step()
            self._taps.clear_window()
            self._sizes, self._weights = [], []
        self._step = self._step if step is None else step
        measured = measure and self.measures(self._step)
        if measured:
            self.watch()
            # FSDP2 taps made after this window's first forward cannot see its first microbatch.
            measured = self._taps is not None and not self._taps_are_new
            self._taps_are_new = False
        if self._taps is not None:
            self._taps.attach() if measured else self._taps.detach()
        self._measuring = measured
        return measured

    def before_backward(self) -> None:
        """Optional, right before each microbatch's backward: forget what the hooks saw since the last one (a
        ``torch.autograd.grad`` inside the forward, for a gradient penalty, also runs them). Once it is
        called, the meter relies on it and no longer clears the hooks' slots after each backward and step."""
        self._clears_before_backward = True
        if self._measuring:
            self._taps.start_backward()

    def after_backward(self, batch_size: float | Tensor, weight: float | Tensor | None = None) -> None:
        """Record the backward just run: one microbatch of ``batch_size`` samples (or tokens, or total
        weight: what its loss is a mean over), as a number or a device tensor.

        ``weight``: the factor the loop multiplied this microbatch's *mean* loss by before its backward, when
        the microbatches of a step are not weighted alike, e.g. ``tokens / tokens_in_step`` for a loss summed
        over tokens and divided by the step's token count (Hugging Face's ``num_items_in_batch``). ``None``:
        1/K, the mean over the step's K microbatches. Give it for every microbatch of a step or for none.

        Call it once per backward, after it: while measuring, a call when no watched parameter received a
        gradient since the last one (or since :meth:`before_backward`) is refused. A tensor ``batch_size``
        or ``weight`` is not read here (no sync): one that is not > 0 is said at :meth:`compute`."""
        self._check_open()
        try:
            # The checks of the input also in unmeasured windows: the same input is refused on every step.
            device = self._estimator.device if self._estimator is not None else None
            batch_size = _checked_number("batch_size", batch_size, device)
            if weight is not None:
                weight = _checked_number("weight", weight, device)
            if self._weights and (weight is None) != (self._weights[0] is None):
                raise ValueError("after_backward: give a weight for every microbatch of a step or for none")
            if self._measuring:
                self._record_backward(batch_size, weight)
        except Exception:
            # The step's gradient now holds a microbatch that cannot be recorded: the step goes unmeasured,
            # and the hooks start anew (else the next backward would read as a second one in this one).
            if self._measuring:
                self.discard_window()
            raise

    def _record_backward(self, batch_size: float | Tensor, weight: float | Tensor | None) -> None:
        taps = self._taps
        if taps.error is not None:
            error, taps.error = taps.error, None
            raise error
        calls = taps.most_calls()
        if calls == 0:
            raise ValueError(
                "after_backward() with no gradient since the last after_backward() (or before_backward()):"
                " it was called twice for one backward, or before its backward (or the backward reached"
                " none of the watched parameters). Call it once after each microbatch's backward"
            )
        if calls > 1:
            raise RuntimeError(several_gradients_message(calls))
        # The window holds Σ b_k |hooked gradient|² / w_k², that is Σ b_k |g_k|²; with no weight the 1/K the
        # loop scaled each loss by is undone in before_step, when K is known.
        taps.add_backward_to_window(batch_size if weight is None else batch_size / (weight * weight))
        if self._clears_before_backward:
            taps.forget_calls()  # the slots are cleared by before_backward; the calls now, to see a 2nd call
        else:
            taps.start_backward()  # the next backward starts from zero (a parameter it skips counts as zero)
        self._sizes.append(batch_size)
        self._weights.append(weight)

    def backward_aside(self, loss: Tensor, batch_size: float | Tensor) -> None:
        """Add one more small gradient to this step, one the optimizer does not apply: the gradient of
        ``loss`` (a mean over ``batch_size`` samples, not divided by K), taken with ``torch.autograd.grad`` so
        that ``.grad`` is left alone. SNRMonitor's split-batch fallback gets a second batch size this way."""
        self._check_open()
        if not self._measuring:
            return
        taps, scale = self._taps, self._loss_scale()
        batch_size = _checked_number("batch_size", batch_size, self._estimator.device)
        if isinstance(batch_size, Tensor):
            batch_size = _nan_unless_positive(batch_size, [batch_size])
        taps.start_backward()
        torch.autograd.grad(loss * scale, taps.parameters, allow_unused=True)
        self._estimator.add_small(taps.backward_sq_norms(scale), batch_size)
        self._extras += 1

    def before_step(self, accumulation: int | None = None) -> None:
        """Close the step: read the applied gradient (after unscaling, before clipping) and update the
        estimates. Under several ranks every rank must call it: it joins one all-reduce (also when it fails,
        then with values that make every rank skip the step).

        Args:
            accumulation: the K each microbatch's loss was divided by, if not the number of microbatches
                recorded (Lightning divides by ``accumulate_grad_batches`` also in an epoch's shorter last
                window, whose single microbatch is then skipped silently).
        """
        self._check_open()
        if not self._measuring:
            self._end_window()
            check_accumulation(accumulation)  # (refused on every step alike, the window closed first)
            return
        taps, estimator, sizes = self._taps, self._estimator, self._sizes
        count, world = len(sizes), self.world_size
        reduced = False
        try:
            check_accumulation(accumulation)
            if count == 0 and accumulation is not None:
                # Every microbatch of the window was skipped (Lightning: a `training_step` that returned
                # None): nothing to measure. Counted in skipped_steps, alike on one process and under several
                # ranks, where the other ranks skip the step with this one.
                taps.clear_window()
                reduced = True  # (skip_step joins the other ranks' all-reduce; no second time on failure)
                self.skip_step()
                return
            if count == 0:
                raise RuntimeError(
                    "before_step() with no after_backward() since the last step: call"
                    " after_backward(batch_size) after each microbatch's backward"
                )
            k = accumulation or count
            if (count + self._extras) * world == 1:
                if k > count:  # the shorter last window of an epoch: nothing to compare it with
                    estimator.discard_step()
                    taps.clear_window()
                    return
                raise ValueError(
                    "a step of one microbatch on one process has a single batch size: no noise estimate is"
                    " possible. Accumulate K >= 2 microbatches per step (each loss divided by K), or run on"
                    " several ranks"
                )
            samples = sum(sizes, 0.0)
            if isinstance(samples, float) and samples * world > self._checked_size:
                raise ValueError(
                    f"this step drew {samples * world:g} samples, more than"
                    f" dataset_size={int(self._checked_size)}: the microbatches of a step cannot be disjoint"
                    " draws from that many samples"
                )
            weights = self._weights
            # Sizes and weights given as tensors: one that is not > 0 makes the step's samples NaN, a step
            # that every rank then skips and that compute() names.
            given = [v for v in (*sizes, *weights) if isinstance(v, Tensor)]
            samples = _nan_unless_positive(samples, given)
            scale = self._loss_scale()
            # The hooks saw scale·g_k/K: dividing the window by (scale/K)² gives Σ b_k |g_k|². g_k enters the
            # applied gradient (the mean over ranks of the sum of each rank's g_k/K) with weight 1/(K·world).
            # With weights given the hooks saw scale·w_k·g_k, already divided out of the window but for the
            # scale, and g_k enters with w_k/world.
            weighted = bool(weights) and weights[0] is not None
            estimator.add_small_sum(taps.take_window(scale if weighted else scale / k), samples, count)
            for size, weight in zip(sizes, weights, strict=True):
                estimator.add_applied(size, weight=(weight if weighted else 1.0 / k) / world)
            applied = taps.accumulated_sq_norms(1.0 if self._unscaled() else scale)
            all_reduce = self._all_reduce if world > 1 else None
            estimator.step(applied, all_reduce, applied_is_sharded=taps.reads_shards)
            reduced = True
            self._steps += 1
        except Exception:
            taps.clear_window()
            estimator.discard_step()
            if world > 1 and not reduced:
                self.skip_step()  # the other ranks wait in the all-reduce
            raise
        finally:
            self._end_window()

    def skip_step(self) -> None:
        """Skip this step on this rank: what it recorded is dropped and the step counted in
        ``skipped_steps``; under several ranks this rank still joins the step's all-reduce, with non-finite
        values, so that no rank waits for it and every rank skips the step alike. For a rank that cannot
        measure a measured step (an adapter's own check failed, or it gave up); :meth:`before_step` does this
        itself when it fails. The vector has the length the other ranks use, for the parameters that train
        now (they may have changed since this rank last watched them)."""
        if self._trainable is not None:
            names = self._trainable.names()
        else:
            names = [name for name, p in unwrap(self.model).named_parameters() if p.requires_grad]
        if not names:
            return  # the other ranks have nothing to measure either
        if self.world_size > 1:
            num_groups = len(group_parameters(names, self.groups)[0])
            # The layout of GradientNoiseEstimator.step's vector: per group the small gradients' sum, four
            # scalars, and under FSDP2 per group the applied gradient's shard.
            length = num_groups + 4 + (num_groups if self.sharded else 0)
            device = self._model_device()
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._all_reduce(torch.full((length,), math.nan, dtype=dtype, device=device))
        if self._estimator is not None:
            self._estimator.discard_step()
            self._estimator.skipped += 1

    def compute(self) -> dict[str, float]:
        """The smoothed values as plain floats (the one host sync); the keys of ``SNRMonitor.latest`` without
        ``"snr/"``. NaN values with a positive ``skipped_steps`` mean every step so far was non-finite."""
        self._check_open()
        if self._steps == 0:
            raise RuntimeError(
                "no step measured yet, so there is nothing to compute: signal and noise come from the"
                " microbatches of whole optimizer steps (after_backward per microbatch, then before_step)"
            )
        if self._trainable is None:
            self._check_still_trainable()
        return self._read("")[0]

    def snapshot(self, prefix: str = "") -> dict[str, float]:
        """The values as ``SNRMonitor.latest`` holds them: keys as :meth:`compute`'s, after ``prefix`` and a
        slash if ``prefix`` is given. While no step has given an estimate, only the non-zero counters of
        skipped steps and dropped windows (nothing before the first measured window). One host sync."""
        if self._estimator is None:
            return {}
        values, self._read_updates = self._read(prefix)
        if self._read_updates == 0:
            head = f"{prefix}/" if prefix else ""
            counters = [head + "skipped_steps", head + "dropped_windows"]
            return {key: values[key] for key in counters if values[key]}
        return values

    @property
    def measured_steps(self) -> int:
        """The steps that had updated the estimates as of the last :meth:`snapshot`: a snapshot of new
        estimates has a larger count than the one before (no host sync)."""
        return self._read_updates

    def updated_since_snapshot(self) -> bool:
        """Whether steps have updated the estimates since the last :meth:`snapshot` (a host sync)."""
        return self._estimator is not None and int(self._estimator.updates) > self._read_updates

    # ------------------------------------------------------------------ the parameters watched
    def measures(self, step: int) -> bool:
        """Whether optimizer step ``step`` is one of those measured (every ``every_n_steps``-th)."""
        return step % self.every_n_steps == 0

    def watch(self) -> None:
        """Re-read which parameters train (given ``optimizers``) and watch those: when they changed, new taps
        and new EMAs (the total then sums over other tensors: a new quantity). :meth:`start_window` does it on
        every measured window; under FSDP2 call it also between steps, when every parameter is sharded. A
        state given to :meth:`load_state_dict` is restored into the first estimator."""
        self._check_open()
        if self._trainable is not None:
            self._rewatch()
        if self._pending_state is not None and self._estimator is not None:
            self._load(self._pending_state)
            self._pending_state = None

    def walk_again(self) -> None:
        """Walk the model again at the next :meth:`watch`: it may have new tensors (once an epoch; a walk
        costs about as much as the norm reads of a small model)."""
        if self._trainable is not None:
            self._trainable.walk_again()

    def attach_ahead(self, step: int) -> None:
        """Under FSDP2, install the hooks before the forward of step ``step``'s first microbatch if that step
        is measured, else remove them: sharded taps find the parameters to hook during the forward. (Other
        taps are hooked by :meth:`start_window`, before the first backward.) :meth:`before_step` does it for
        the next step; an adapter does it before the first."""
        if self._taps is not None and self._taps.reads_shards:
            self._taps_are_new = False
            self._taps.attach() if self.measures(step) else self._taps.detach()

    def discard_window(self) -> None:
        """Forget the current window's microbatches, uncounted, and measure nothing more in it."""
        if self._taps is not None:
            self._taps.clear_window()
            self._taps.start_backward()
        if self._estimator is not None:
            self._estimator.discard_step()
        self._sizes, self._weights, self._extras = [], [], 0
        self._measuring = self._taps_are_new = False

    def detach(self) -> None:
        """Remove the hooks from the model, for now (the end of a run, an error): the next measured
        :meth:`start_window` installs them again. :meth:`close` ends the meter."""
        if self._taps is not None:
            self._taps.detach()

    # ------------------------------------------------------------------ state
    @property
    def dataset_size(self) -> float:
        """N, the training set the microbatches are drawn from without replacement (``inf``: independent
        draws). May be set between steps, e.g. to an N read off a reloaded loader (not checked against each
        step's samples, as the constructor's is)."""
        return self._dataset_size

    @dataset_size.setter
    def dataset_size(self, value: float | None) -> None:
        check_dataset_size(value)
        self._dataset_size = math.inf if value is None else float(value)
        if self._estimator is not None:
            self._estimator.dataset_size = self._dataset_size

    @property
    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else _world_size()

    @property
    def measuring(self) -> bool:
        """Whether the current window is measured."""
        return self._measuring

    @property
    def backwards_in_window(self) -> int:
        """The microbatches :meth:`after_backward` recorded in the current window, on this rank."""
        return len(self._sizes)

    @property
    def taps(self) -> GradientTaps | None:
        """The hooks on the watched parameters (``None`` while none are watched)."""
        return self._taps

    @property
    def estimator(self) -> GradientNoiseEstimator | None:
        """The EMAs (``None`` while no parameter is watched)."""
        return self._estimator

    def state_dict(self) -> dict[str, Any]:
        """The EMAs and counters and the groups they are for; ``{}`` while no parameter is watched (a state
        given to :meth:`load_state_dict` and not restored yet is returned as given)."""
        if self._estimator is None or self._pending_state is not None:
            return dict(self._pending_state or {})
        return {"group_names": self.group_names, "estimator": self._estimator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: now, or given ``optimizers`` at the next :meth:`watch`. A state for
        other groups, or one that cannot be used, leaves the EMAs fresh, with a warning."""
        self._pending_state = state
        if self._trainable is None:
            self.watch()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Remove the hooks from the model; the meter cannot be used afterwards (closing twice is fine)."""
        self.detach()
        self._taps = None
        self._closed = True

    def __enter__(self) -> GradientMeter:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this GradientMeter is closed (its hooks are removed): make a new one")

    def _end_window(self) -> None:
        """The window is over: the next one starts from nothing, and its hooks are readied."""
        self._sizes, self._weights, self._extras = [], [], 0
        if self._taps is not None and not self._clears_before_backward:
            self._taps.start_backward()  # reading `.grad` used the slots the hooks write into
        self._step += 1
        if self._windows_given:  # the next start_window opens the next window
            self._measuring = False
        else:  # a plain loop: the next window opens now
            self._measuring = self.measures(self._step) and self._taps is not None
            if self._taps is not None:
                self._taps.attach() if self._measuring else self._taps.detach()
        self.attach_ahead(self._step)

    def _watch_now(self) -> None:
        """Without ``optimizers``: watch the parameters that require a gradient now, for good, named as in the
        model inside any wrapper."""
        named = [(name, p) for name, p in unwrap(self.model).named_parameters() if p.requires_grad]
        lazy = [name for name, p in named if is_lazy(p)]
        if lazy:
            raise ValueError(
                f"uninitialised lazy parameters {lazy[:3]}: run a forward before making the meter"
            )
        if not named:
            raise ValueError("the model has no parameter that requires a gradient: nothing to measure")
        self._make_taps(named)

    def _check_still_trainable(self) -> None:
        """Without ``optimizers`` the meter watches, for good, the parameters that required a gradient when it
        was made. Once others do (a layer unfrozen, gradual unfreezing) the values no longer sum over what
        trains, and nothing else would say so: warned once, when the values are read (a walk over the
        parameters' flags, no sync)."""
        watched = {id(p) for p in self._taps.parameters}
        now = {id(p) for p in unwrap(self.model).parameters() if p.requires_grad}
        if now != watched:
            self._warn(
                "trainable_changed",
                f"which parameters require a gradient changed since the meter was made ({len(now - watched)}"
                f" tensors added, {len(watched - now)} removed): it measures the {len(watched)} it watched"
                " from the start, so the values are not those of the parameters that train now. Make a new"
                " GradientMeter when the trainable parameters change.",
            )

    def _rewatch(self) -> None:
        """If other tensors train than the taps watch: new taps on them, and a new estimator."""
        change = self._trainable.read(self.sharded)
        if change is None:
            return
        named, outside = change
        if not named and self._taps is None and not any(is_lazy(p) for p in self.model.parameters()):
            # (Lazy parameters become trainable at the first forward, after this check: no warning for them.)
            self._warn(
                "nothing_trains",
                "no parameter trains (a registered `nn.Parameter` that requires a gradient and that an"
                " optimizer holds): nothing is measured or logged until one does. Tensors kept as plain"
                " attributes are not seen: wrap them in `nn.Parameter`.",
            )
        if outside:
            self._warn(
                "outside_optimizer",
                f"{len(outside)} parameter tensors require a gradient but are in no optimizer (e.g."
                f" {outside[0]!r}); they are left out: their gradient is never applied, nor cleared.",
            )
        watched = self._taps.parameters if self._taps is not None else []
        if len(named) == len(watched) and all(p is q for (_, p), q in zip(named, watched, strict=True)):
            return  # identity, not `==`: equal values say nothing about which tensors train
        if self._taps is not None:
            self._taps.detach()
            self._taps = None
        if not named:
            raise RuntimeError("the model has no trainable parameters")
        before = self._estimator
        self._make_taps(named)
        self._taps_are_new = self.sharded
        if before is not None and int(before.updates) > 0:
            # The total (and maybe the groups) now sums over other tensors: a new quantity, new EMAs.
            ids = {id(p) for p in watched}
            added = [n for n, p in named if id(p) not in ids]
            removed = len(watched) - (len(named) - len(added))
            self._info(
                f"the trainable parameters changed ({len(watched)} -> {len(named)} tensors:"
                f" {len(added)} added{' (' + ', '.join(added[:3]) + ')' if added else ''}, {removed} removed;"
                f" groups {self.group_names}); the EMAs restart."
            )

    def _make_taps(self, named: list[tuple[str, nn.Parameter]]) -> None:
        self.group_names, self._taps = make_taps(self.model, named, self.groups, self.sharded)
        device = named[0][1].device
        self._estimator = GradientNoiseEstimator(
            len(self.group_names), self.ema_decay, device, self._dataset_size
        )

    def _load(self, state: dict[str, Any]) -> None:
        if not state:
            return
        try:
            saved_decay = state["estimator"]["ema_decay"]
            if state.get("group_names") != self.group_names:
                self._warn(
                    None,
                    f"the checkpoint's groups {state.get('group_names')} differ from this run's"
                    f" {self.group_names}; the EMAs start afresh.",
                )
                return
            self._estimator.load_state_dict(state["estimator"])
            if not bool(torch.isfinite(self._estimator.moments).all()):  # once, at resume
                raise ValueError("its moments are not finite")
            # (compute() reads the restored steps now, also when every one of them was non-finite)
            self._steps = max(self._steps, int(self._estimator.updates + self._estimator.skipped))
        except Exception as error:
            self._estimator.reset()
            self._warn(
                None,
                f"the checkpoint's monitor state could not be used ({type(error).__name__}: {error}); the"
                " EMAs start afresh.",
            )
            return
        if saved_decay != self.ema_decay:
            self._warn(
                None,
                f"the checkpoint was smoothed with ema_decay={saved_decay}, this run uses {self.ema_decay};"
                " the bias correction of the restored EMAs is approximate.",
            )
        saved_size = state["estimator"].get("dataset_size")  # (None: a checkpoint from before it was saved)
        size = self._estimator.dataset_size
        if saved_size is not None and saved_size != size:
            independent = " (inf: independent draws)" if math.inf in (saved_size, size) else ""
            self._warn(
                None,
                f"the checkpoint's estimates were corrected for a training set of N = {saved_size:g}, this"
                f" run's is N = {size:g}{independent}; the restored signal mixes the two until the EMAs"
                " forget the checkpoint's steps.",
            )

    def _read(self, prefix: str) -> tuple[dict[str, float], int]:
        """The values with their keys, and the estimator's update count: one stack, one host sync."""
        estimator = self._estimator
        values = estimator.compute()
        head = f"{prefix}/" if prefix else ""
        names, tensors = [], []
        for index, group in enumerate(self.group_names):
            group_head = head if group == TOTAL else f"{head}{group}/"
            for key, value in values.items():
                names.append(group_head + key)
                tensors.append(value[index])
        names += [head + key for key in ("batch_size", "skipped_steps", "dropped_windows")]
        tensors += [estimator.batch_size, estimator.skipped, estimator.dropped, estimator.updates]
        tensors.append(estimator.bad_sizes)
        stacked = torch.stack([t.to(torch.float64) for t in tensors])
        *numbers, updates, bad_sizes = stacked.tolist()  # the one host sync
        if bad_sizes:
            estimator.bad_sizes.zero_()  # said once: the next read gives the values
            raise ValueError(
                f"{int(bad_sizes)} measured steps had a batch_size or weight tensor that was not a finite"
                " number > 0 (zero, negative, inf or NaN; a tensor's value is read only here, where the meter"
                " syncs): they are left out of the estimates, not counted as skipped steps. Give sizes > 0."
            )
        result = dict(zip(names, numbers, strict=True))
        for group, entries in zip(self.group_names, self._narrow_entries(), strict=True):
            group_head = head if group == TOTAL else f"{head}{group}/"
            signal, noise = result[group_head + "signal"], result[group_head + "noise"]
            # What the gradient norms measured: |g|² ≈ signal + noise / batch (smaller ones: signal + noise).
            measured = max(abs(signal), abs(noise) / max(result[head + "batch_size"], 1.0))
            if entries and 0 < measured < FLOAT32_FLOOR_PER_ENTRY * entries:
                self._warn(
                    "tiny",
                    f"the squared gradient norms of {group!r} average {measured / entries:.2g} an entry,"
                    " where their float32 norms lose their precision (entries below ~1e-20 square to"
                    " subnormal numbers, or to zero): its estimates are not reported (NaN). Scale the loss"
                    " up.",
                )
                for key in values:
                    result[group_head + key] = math.nan
        if math.isfinite(estimator.dataset_size):
            result[head + "dataset_size"] = estimator.dataset_size
        return result, int(updates)

    def _narrow_entries(self) -> list[int]:
        """Per group, the entries of its float32, float16 and bfloat16 parameters (their norms accumulate in
        float32)."""
        taps = self._taps
        if taps is None:
            return [0] * len(self.group_names)
        narrow = [p.numel() if p.dtype in NARROW_DTYPES else 0 for p in taps.parameters]
        return (taps.membership.cpu() @ torch.tensor(narrow, dtype=torch.float64)).long().tolist()

    def _loss_scale(self) -> Tensor | float:
        """The fp16 loss scale as a device tensor (``GradScaler.get_scale()`` would sync), else 1."""
        scale = getattr(self.scaler, "_scale", None)
        if self.scaler is None or not getattr(self.scaler, "is_enabled", lambda: True)() or scale is None:
            return 1.0
        return scale

    def _unscaled(self) -> bool:
        """Whether ``.grad`` is already unscaled: no scaler, or ``scaler.unscale_`` ran this step (its
        per-optimizer stage says so; it is reset by ``scaler.update()``). Lightning unscales before
        ``on_before_optimizer_step``, except for optimizers that unscale in their own step (fused Adam) and
        for steps whose last microbatch skipped its backward: the stage says those too."""
        if isinstance(self._loss_scale(), float):
            return True
        states: Iterable[dict] = getattr(self.scaler, "_per_optimizer_states", {}).values()
        return any(getattr(state.get("stage"), "name", None) == "UNSCALED" for state in states)

    def _model_device(self) -> torch.device:
        device = getattr(self.model, "device", None)  # a LightningModule or a Hugging Face model says it
        return device if isinstance(device, torch.device) else next(self.model.parameters()).device

    def _warn(self, topic: str | None, message: str) -> None:
        if self._warn_callback is not None:
            self._warn_callback(topic, message)
        elif topic is None or topic not in self._warned:
            self._warned.add(topic or "")
            warnings.warn(f"GradientMeter: {message}", stacklevel=3)

    def _info(self, message: str) -> None:
        if self._info_callback is not None:
            self._info_callback(message)
        else:
            _log.info("GradientMeter: %s", message)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._steps} steps"
        return f"GradientMeter(groups={self.group_names}, dataset_size={self.dataset_size:g}, {state})"
