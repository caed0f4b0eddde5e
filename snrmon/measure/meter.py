"""GradientMeter: the SNR monitor without a framework, for any training loop.

It drives the same :class:`~snrmon.measure.taps.GradientTaps` and
:class:`~snrmon.measure.estimator.GradientNoiseEstimator` as the Lightning ``SNRMonitor``, with the same
weights, so both report the same numbers for the same microbatches; only the calls that Lightning's hooks make
for the monitor are made here by the user's loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from snrmon.measure.estimator import GradientNoiseEstimator
from snrmon.measure.groups import TOTAL, group_parameters
from snrmon.measure.sampling import check_dataset_size
from snrmon.measure.taps import GradientTaps


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Sum over ``torch.distributed`` ranks in place: a plain all-reduce, no barrier (no host sync with NCCL).
    The same as the Lightning adapter's helper, which lives with the callbacks."""
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


class GradientMeter:
    r"""Measure gradient signal |G|², noise tr(Σ), noise scale and SNR in a plain PyTorch loop.

    The microbatches of one optimizer step (gradient accumulation, and/or one local gradient per
    ``torch.distributed`` rank) give *small* gradients; the gradient the optimizer applies is the *large* one.
    Tensor hooks, installed when the meter is made, read each microbatch's squared gradient norms before
    autograd accumulates them; :meth:`before_step` reads the applied gradient. From the two batch sizes the
    estimator forms per-step signal and noise (T2, T3 of ``docs/theory.md``) and smooths them with
    bias-corrected EMAs. Everything stays on the training device until :meth:`compute`, the only host sync.

    The loop must make the applied gradient the mean of its microbatches' mean gradients, as Lightning does:
    each microbatch backpropagates its *mean* loss divided by K, the number of microbatches this rank runs in
    the step, and under ``torch.distributed`` (DDP) the ranks' gradients are averaged. With a process group
    initialised, :meth:`before_step` sums the step's few numbers over ranks in one all-reduce, as SNRMonitor
    does: the per-step estimates are ratios of those sums, so the ranks cannot be joined later, at
    :meth:`compute`. An all-reduce is a device collective, not a host sync under NCCL.

    :meth:`compute` returns the keys of ``SNRMonitor.latest`` without its ``"snr/"`` prefix: ``signal``,
    ``noise``, ``noise_scale`` (in samples), ``ratio`` (SNR at the current batch size), each with ``_se``,
    ``batch_size``, ``skipped_steps`` (steps with non-finite gradients), ``dropped_windows`` (always 0 here),
    with ``dataset_size`` also ``signal_beyond_chance``, ``dataset_snr`` (with ``_se``) and ``dataset_size``,
    and per group ``<group>/signal`` and so on.

    Args:
        model: the module whose parameters that require a gradient are measured (materialise lazy modules
            with a forward first); a wrapped one (DDP, Fabric, ``torch.compile``) is named as the model
            inside (:func:`unwrap`).
        groups: also report per parameter group: an ``int`` depth groups by the first components of
            parameter names (``2``: ``"blocks.0"``), a dict maps group names to regexes.
        dataset_size: N, when the microbatches of a step are disjoint draws from a training set of N samples
            (a shuffled ``DataLoader``, ``DistributedSampler`` shards): the values are then the training
            set's, with the finite-set correction. ``None`` or ``math.inf``: independent draws.
        scaler: the ``torch.amp.GradScaler`` of an fp16 loop: the microbatch and applied norms are divided by
            its scale (read as a device tensor, no sync). :meth:`before_step` may come before or after
            ``scaler.unscale_(optimizer)``; the meter reads which from the scaler.
        ema_decay: EMA factor β for signal and noise; the window is about (1 + β) / (1 − β) steps.

    Raises:
        ValueError: for a model without trainable parameters or with lazy ones, a bad ``groups``,
            ``dataset_size`` or ``ema_decay``; at :meth:`before_step`, for a step of a single microbatch on a
            single process (no second batch size: no noise estimate is possible) or of more samples than
            ``dataset_size``.
        RuntimeError: :meth:`before_step` without any :meth:`after_backward` since the last step,
            :meth:`compute` before any measured step, any use after :meth:`close`, and a parameter whose
            gradient arrives in parts (reentrant activation checkpointing).

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
    ):
        check_dataset_size(dataset_size)
        named = [(name, p) for name, p in unwrap(model).named_parameters() if p.requires_grad]
        lazy = [name for name, p in named if is_lazy(p)]
        if lazy:
            raise ValueError(
                f"uninitialised lazy parameters {lazy[:3]}: run a forward before making the meter"
            )
        if not named:
            raise ValueError("the model has no parameter that requires a gradient: nothing to measure")
        names, parameters = zip(*named, strict=True)
        self.group_names, membership = group_parameters(list(names), groups)
        self.dataset_size = math.inf if dataset_size is None else float(dataset_size)
        self.scaler = scaler
        self._taps: GradientTaps | None = GradientTaps(list(parameters), membership)
        self._estimator = GradientNoiseEstimator(
            len(self.group_names), ema_decay, parameters[0].device, self.dataset_size
        )
        self._sizes: list[float | Tensor] = []  # samples of each microbatch of the current step, this rank
        self._weights: list[float | Tensor | None] = []  # their weights (after_backward), None for 1/K
        self._steps = 0  # steps closed with before_step
        self._taps.attach()
        self._taps.start_backward()

    # ------------------------------------------------------------------ the loop's calls
    def after_backward(self, batch_size: float | Tensor, weight: float | Tensor | None = None) -> None:
        """Record the backward just run: one microbatch of ``batch_size`` samples (or tokens, or total
        weight: what its loss is a mean over), as a number or a device tensor.

        ``weight``: the factor the loop multiplied this microbatch's *mean* loss by before its backward, when
        the microbatches of a step are not weighted alike, e.g. ``tokens / tokens_in_step`` for a loss summed
        over tokens and divided by the step's token count (Hugging Face's ``num_items_in_batch``). ``None``:
        1/K, the mean over the step's K microbatches. Give it for every microbatch of a step or for none."""
        taps = self._open()
        if taps.error is not None:
            raise taps.error
        if isinstance(batch_size, (int, float)) and not batch_size > 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size!r}")
        if isinstance(weight, (int, float)) and not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight!r}")
        if self._weights and (weight is None) != (self._weights[0] is None):
            raise ValueError("after_backward: give a weight for every microbatch of a step or for none")
        # The window holds Σ b_k |hooked gradient|² / w_k², that is Σ b_k |g_k|²; with no weight the 1/K the
        # loop scaled each loss by is undone in before_step, when K is known.
        taps.add_backward_to_window(batch_size if weight is None else batch_size / (weight * weight))
        taps.start_backward()  # the next backward starts from zero (a parameter it skips counts as zero)
        self._sizes.append(batch_size)
        self._weights.append(weight)

    def before_step(self) -> None:
        """Close the step: read the applied gradient (after unscaling, before clipping) and update the
        estimates. Under ``torch.distributed`` every rank must call it: it joins one all-reduce."""
        taps = self._open()
        sizes, self._sizes = self._sizes, []
        weights, self._weights = self._weights, []
        count, world = len(sizes), _world_size()
        if count == 0:
            taps.clear_window()
            raise RuntimeError(
                "before_step() with no after_backward() since the last step: call after_backward(batch_size)"
                " after each microbatch's backward"
            )
        if count * world == 1:
            taps.clear_window()
            taps.start_backward()
            raise ValueError(
                "a step of one microbatch on one process has a single batch size: no noise estimate is"
                " possible. Accumulate K >= 2 microbatches per step (each loss divided by K), or run on"
                " several ranks"
            )
        step_samples = sum(sizes) * world
        if math.isfinite(self.dataset_size) and isinstance(step_samples, (int, float)):
            if step_samples > self.dataset_size:
                taps.clear_window()
                taps.start_backward()
                raise ValueError(
                    f"this step drew {step_samples:g} samples, more than dataset_size={self.dataset_size:g}:"
                    " the microbatches of a step cannot be disjoint draws from that many samples"
                )
        scale = self._loss_scale()
        # The hooks saw scale·g_k/K: dividing the window by (scale/K)² gives Σ b_k |g_k|² (SNRMonitor weighs
        # each backward by b_k·K² instead; the same numbers). g_k enters the applied gradient, the mean over
        # ranks of the mean over microbatches, with weight 1/(K·world). With weights given the hooks saw
        # scale·w_k·g_k, already divided out of the window but for the scale, and g_k enters with w_k/world.
        weighted = weights[0] is not None
        window = taps.take_window(scale if weighted else scale / count)
        self._estimator.add_small_sum(window, sum(sizes), count)
        for size, weight in zip(sizes, weights, strict=True):
            self._estimator.add_applied(size, weight=(weight if weighted else 1.0 / count) / world)
        applied = taps.accumulated_sq_norms(1.0 if self._unscaled() else scale)
        taps.start_backward()  # reading `.grad` used the slots the hooks write into
        self._estimator.step(applied, sum_over_ranks if world > 1 else None)
        self._steps += 1

    def compute(self) -> dict[str, float]:
        """The smoothed values as plain floats (the one host sync); the keys of ``SNRMonitor.latest`` without
        ``"snr/"``. NaN values with a positive ``skipped_steps`` mean every step so far was non-finite."""
        self._open()
        if self._steps == 0:
            raise RuntimeError(
                "no step measured yet, so there is nothing to compute: signal and noise come from the"
                " microbatches of whole optimizer steps (after_backward per microbatch, then before_step)"
            )
        estimator = self._estimator
        values = estimator.compute()
        names, tensors = [], []
        for index, group in enumerate(self.group_names):
            prefix = "" if group == TOTAL else f"{group}/"
            for key, value in values.items():
                names.append(prefix + key)
                tensors.append(value[index])
        names += ["batch_size", "skipped_steps", "dropped_windows"]
        tensors += [estimator.batch_size, estimator.skipped, estimator.dropped]
        numbers = torch.stack([t.to(torch.float64) for t in tensors]).tolist()  # the one host sync
        result = dict(zip(names, numbers, strict=True))
        if math.isfinite(self.dataset_size):
            result["dataset_size"] = self.dataset_size
        return result

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Remove the hooks from the model; the meter cannot be used afterwards (closing twice is fine)."""
        if self._taps is not None:
            self._taps.detach()
            self._taps = None

    def __enter__(self) -> GradientMeter:
        self._open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._taps is None

    # ------------------------------------------------------------------ helpers
    def _open(self) -> GradientTaps:
        if self._taps is None:
            raise RuntimeError("this GradientMeter is closed (its hooks are removed): make a new one")
        return self._taps

    def _loss_scale(self) -> Tensor | float:
        """The fp16 loss scale as a device tensor (``GradScaler.get_scale()`` would sync), else 1."""
        scale = getattr(self.scaler, "_scale", None)
        if self.scaler is None or not getattr(self.scaler, "is_enabled", lambda: True)() or scale is None:
            return 1.0
        return scale

    def _unscaled(self) -> bool:
        """Whether ``.grad`` is already unscaled: no scaler, or ``scaler.unscale_`` ran this step (its
        per-optimizer stage says so; it is reset by ``scaler.update()``)."""
        if isinstance(self._loss_scale(), float):
            return True
        states: Iterable[dict] = getattr(self.scaler, "_per_optimizer_states", {}).values()
        return any(getattr(state.get("stage"), "name", None) == "UNSCALED" for state in states)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._steps} steps"
        return f"GradientMeter(groups={self.group_names}, dataset_size={self.dataset_size:g}, {state})"
