"""Gradient signal |G|² and noise tr(Σ) from two batch sizes (theory T1–T5, weighted form in docs/theory.md).

One optimizer step contributes two kinds of gradient:

* *small* gradients g_k, each the mean gradient over one microbatch of ``size`` b_k samples
  (a microbatch under accumulation, one DDP rank's local gradient, or both);
* the *applied* gradient G_B = Σ_k w_k g_k / Σ_k w_k, whatever combination of them the optimizer uses.

By T1, E|g_k|² = |G|² + tr(Σ)/b_k and E|G_B|² = |G|² + tr(Σ)·Σ v_k²/b_k with v = w/Σw. The size-weighted
small average X_b = Σ b_k|g_k|² / Σ b_k has E X_b = |G|² + tr(Σ)·K/Σb_k, so both are linear in the unknowns
and T2/T3 generalise to

    noise  = (X_b − X_B) / (1/b − 1/B),     signal = (X_B/b − X_b/B) / (1/b − 1/B)        (T2, T3)

with 1/b = K/Σb_k and 1/B = Σ v_k²/b_k; equal microbatches give T2 and T3 exactly.

Drawn without replacement from a training set of N samples (``dataset_size``), both expectations gain the
same −S²/N (docs/theory.md, F1–F3): noise still estimates S², and signal + noise/N is the unbiased
training-set |G|².

Everything here is plain torch on the training device: ``add_small``/``add_applied`` accumulate one step
(sizes and weights given as Python numbers stay Python numbers until the step closes, so the hot path issues
at most one device op per small gradient), ``step`` turns it into per-step estimates and updates
bias-corrected EMAs, and ``compute`` is the only place that produces values meant for the host. No method
syncs with the host before ``compute``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# Layout of the EMA moments per group: signal, noise, and the second moments for the uncertainty.
_SIGNAL, _NOISE, _SIGNAL_SQ, _NOISE_SQ, _SIGNAL_NOISE = range(5)


class GradientNoiseEstimator:
    """Bias-corrected EMA estimates of gradient signal, noise, noise scale and SNR, per parameter group.

    Args:
        num_groups: number of parameter groups whose squared norms are passed in (group 0 is
            conventionally the total over all parameters).
        ema_decay: EMA factor β in [0, 1); the effective window is about (1 + β) / (1 − β) steps.
        device: where the state lives (the training device).

    Usage per optimizer step::

        for each microbatch k:  estimator.add_small(sq_norms_of_g_k, size=b_k)
                                estimator.add_applied(size=b_k, weight=w_k)
        estimator.step(sq_norms_of_applied_gradient)   # optionally with all_reduce=...
        ...
        values = estimator.compute()                   # on log steps only
    """

    def __init__(
        self,
        num_groups: int,
        ema_decay: float = 0.95,
        device: torch.device | str = "cpu",
        dataset_size: float = math.inf,
    ):
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.num_groups = num_groups
        self.ema_decay = ema_decay
        self.device = torch.device(device)
        self.dataset_size = dataset_size
        # float64 keeps the small difference X_b − X_B exact enough; MPS has no float64.
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.reset()

    @property
    def dataset_size(self) -> float:
        """N when the small gradients of a step are disjoint draws from N samples, else ``inf``."""
        return self._dataset_size

    @dataset_size.setter
    def dataset_size(self, value: float) -> None:
        if not value > 1:
            raise ValueError(f"dataset_size must be > 1 (math.inf for independent draws), got {value}")
        self._dataset_size = float(value)

    def reset(self) -> None:
        """Forget all history."""
        zeros = lambda *shape: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        self.moments = zeros(self.num_groups, 5)
        self.updates = zeros()  # valid steps seen
        self.skipped = zeros()  # non-finite steps
        self.bad_sizes = zeros()  # steps with a size tensor that was not > 0 (not saved: said when read)
        self.dropped = zeros()  # steps whose applied gradient never came (see drop_step)
        self.batch_size = zeros()  # last step's effective batch size
        self.discard_step()

    def discard_step(self) -> None:
        """Drop what was added since the last ``step``."""
        self._small_sq: Tensor | float = 0.0  # Σ_k b_k |g_k|² per group
        # Python numbers while sizes and weights are (the usual case), device tensors once one is a tensor.
        self._small_size: Tensor | float = 0.0  # Σ_k b_k
        self._small_count = 0  # K
        self._weight: Tensor | float = 0.0  # Σ_k w_k
        self._weight_sq_over_size: Tensor | float = 0.0  # Σ_k w_k² / b_k

    def drop_step(self) -> None:
        """Drop what was added since the last ``step``, counted in ``dropped``: the optimizer never applied
        the gradient these small gradients summed to (a skipped ``optimizer.step``, an epoch cut short)."""
        self.dropped += 1
        self.discard_step()

    # ------------------------------------------------------------------ per microbatch (hot path)
    def add_small(self, sq_norms: Tensor, size: float | Tensor) -> None:
        """Add one small gradient: ``sq_norms[g]`` = |g_k|² over group g, mean over ``size`` samples."""
        self.add_small_sum(sq_norms * size, size, count=1)

    def add_small_sum(self, size_weighted_sq_norms: Tensor, size: float | Tensor, count: int) -> None:
        """Add ``count`` small gradients at once: ``size_weighted_sq_norms[g]`` = Σ_k b_k |g_k|² over group g,
        and ``size`` = Σ_k b_k (Python numbers or device tensors)."""
        self._small_sq = self._small_sq + size_weighted_sq_norms.to(self.dtype)
        self._small_size = self._small_size + size
        self._small_count += count

    def add_applied(self, size: float | Tensor, weight: float = 1.0) -> None:
        """Declare that the applied gradient contains ``weight`` × a mean gradient over ``size`` samples."""
        self._weight = self._weight + weight
        self._weight_sq_over_size = self._weight_sq_over_size + _divide(weight * weight, size)

    # ------------------------------------------------------------------ per optimizer step
    def step(
        self,
        applied_sq_norms: Tensor,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        applied_is_sharded: bool = False,
    ) -> None:
        """Close the step: estimate T2/T3 from what was added, and update the EMAs.

        Args:
            applied_sq_norms: |Σ_k w_k g_k|² per group (the gradient the optimizer sees, already
                identical on all ranks under DDP).
            all_reduce: sums a tensor over distributed ranks (``None`` on a single process). Each rank
                adds its own small gradients and its share of the applied weights.
            applied_is_sharded: ``applied_sq_norms`` covers only this rank's shard of the applied gradient
                (FSDP): the shards' squared norms are summed over ranks in the same all-reduce.

        A step with non-finite values, a single small gradient, or no usable second batch size leaves
        the EMAs untouched; non-finite steps are counted in ``skipped``.
        """
        small_sum, small_size, small_count = self._small_sq, self._small_size, self._small_count
        weight, weight_sq_over_size = self._weight, self._weight_sq_over_size
        self.discard_step()
        if all_reduce is not None:
            # One vector, one all-reduce; filling it from Python numbers needs no host-device copy.
            groups = self.num_groups
            size = groups + 4 + (groups if applied_is_sharded else 0)
            stats = torch.zeros(size, dtype=self.dtype, device=self.device)
            stats[:groups] = small_sum
            for offset, value in enumerate((small_size, small_count, weight, weight_sq_over_size)):
                stats[groups + offset] = value
            if applied_is_sharded:
                stats[groups + 4 :] = applied_sq_norms
            stats = all_reduce(stats)
            small_sum = stats[:groups]
            small_size, small_count, weight, weight_sq_over_size = stats[groups : groups + 4]
            if applied_is_sharded:
                applied_sq_norms = stats[groups + 4 :]
        # The scalars are Python numbers on a single process with numeric sizes (most runs): then only the
        # per-group arithmetic below issues device ops, about fifteen tiny ones per step.
        inv_small = _divide(small_count, small_size)
        inv_big = _divide(weight_sq_over_size, weight * weight)
        gap = inv_small - inv_big
        # Two batch sizes that coincide (one microbatch, or pathological weights) carry no information.
        informative = (small_count > 1) & (abs(gap) > 1e-6 * inv_small)
        if informative is False:
            return
        x_small = small_sum / small_size
        x_big = applied_sq_norms.to(self.dtype) / (weight * weight)  # (both divisors are non-zero here)
        noise = (x_small - x_big) / gap
        # T2 estimates |G|² − S²/N for disjoint draws from N samples (F3): adding noise/N undoes it.
        signal = (x_big * inv_small - x_small * inv_big) / gap + noise / self.dataset_size
        per_step = torch.stack([signal, noise, signal * signal, noise * noise, signal * noise], 1)
        # Non-finite gradients (NaN/Inf, an fp16 overflow) or sizes make the per-step values non-finite.
        finite = torch.isfinite(per_step).all()
        valid = finite & informative
        beta = self.ema_decay
        updated = beta * self.moments + (1.0 - beta) * torch.nan_to_num(per_step)
        self.moments = torch.where(valid, updated, self.moments)
        self.updates += valid
        skipped = ~finite
        if isinstance(small_size, Tensor):
            # A size or weight tensor that is not > 0 made the sizes NaN (GradientMeter.before_step), but not
            # the count (a rank's skip_step makes all NaN): a bad input, not a non-finite gradient.
            bad_sizes = small_size.isnan()
            if isinstance(small_count, Tensor):
                bad_sizes &= small_count.isfinite()
            self.bad_sizes += bad_sizes
            skipped &= ~bad_sizes
        self.skipped += skipped
        self.batch_size = torch.where(valid, 1.0 / inv_big, self.batch_size)

    # ------------------------------------------------------------------ results
    def compute(self) -> dict[str, Tensor]:
        """Smoothed estimates per group (tensors of shape [num_groups], NaN before the first valid step).

        ``signal`` and ``noise`` are the bias-corrected EMAs of T2 and T3; ``noise_scale`` (T4) and
        ``ratio`` (T5, at the last step's batch size) are ratios of those EMAs, never EMAs of ratios.
        ``*_se`` are standard errors from the spread of the per-step estimates inside the EMA window
        (treating steps as independent), propagated to the ratios by the delta method.
        """
        beta, count = self.ema_decay, self.updates
        debias = 1.0 - beta**count
        mean = self.moments / debias  # NaN (0/0) before any valid step
        signal, noise = mean[:, _SIGNAL], mean[:, _NOISE]
        # Σ of squared normalised EMA weights: the variance of an EMA mean of independent samples is
        # Var · weight_sq, and the weighted spread underestimates Var by the factor (1 − weight_sq).
        weight_sq = (1 - beta) * (1 - beta ** (2 * count)) / ((1 + beta) * debias**2)
        # 1 − weight_sq in closed form, exactly 0 (se = NaN) for a single step: no spread to measure yet.
        bessel = (1 + beta) * debias / (2 * (beta - beta**count))
        bessel = torch.where(count > 1, bessel, math.nan)  # not 0·inf, which rounding can make inf
        var_signal = (mean[:, _SIGNAL_SQ] - signal**2).clamp_min(0) * bessel
        var_noise = (mean[:, _NOISE_SQ] - noise**2).clamp_min(0) * bessel
        cov = (mean[:, _SIGNAL_NOISE] - signal * noise) * bessel
        signal_se = (var_signal * weight_sq).sqrt()
        noise_se = (var_noise * weight_sq).sqrt()
        noise_scale = noise / signal
        rel_var = (var_noise / noise**2 + var_signal / signal**2 - 2 * cov / (noise * signal)) * weight_sq
        rel_se = rel_var.clamp_min(0).sqrt()
        noise_scale_se = noise_scale.abs() * rel_se
        # The step's own noise is S²(1/B − 1/N): a batch of the whole training set has none.
        ratio = 1.0 / (noise_scale * (1.0 / self.batch_size - 1.0 / self.dataset_size))
        values = {
            "signal": signal,
            "noise": noise,
            "noise_scale": noise_scale,
            "ratio": ratio,
            "signal_se": signal_se,
            "noise_se": noise_se,
            "noise_scale_se": noise_scale_se,
            "ratio_se": ratio.abs() * rel_se,
        }
        if math.isfinite(self.dataset_size):
            # F4, F5 of docs/theory.md: the part of the signal beyond the training set's sampling noise S²/N,
            # and the dataset-level SNR N|G|²/S².
            n = self.dataset_size
            beyond = signal - noise / n
            var_beyond = (var_signal + var_noise / n**2 - 2 * cov / n).clamp_min(0)
            dataset_snr = n / noise_scale
            values |= {
                "signal_beyond_chance": beyond,
                "signal_beyond_chance_se": (var_beyond * weight_sq).sqrt(),
                "dataset_snr": dataset_snr,
                "dataset_snr_se": dataset_snr.abs() * rel_se,
            }
        return values

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        # clone: on CPU `.cpu()` is the live tensor, which `step` changes in place.
        names = ("moments", "updates", "skipped", "dropped", "batch_size")
        settings = {"ema_decay": self.ema_decay, "dataset_size": self.dataset_size}  # (what the EMAs are of)
        return settings | {name: getattr(self, name).cpu().clone() for name in names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state; the EMAs continue exactly if ``ema_decay`` is the saved one."""
        moments = state["moments"]
        if moments.shape != self.moments.shape:
            raise ValueError(f"saved estimator has {moments.shape[0]} groups, this one has {self.num_groups}")
        for name in ("moments", "updates", "skipped", "dropped", "batch_size"):
            if name not in state:  # a checkpoint from before this counter existed
                continue
            setattr(self, name, state[name].to(device=self.device, dtype=self.dtype, copy=True))


def _divide(numerator: float | Tensor, denominator: float | Tensor) -> float | Tensor:
    """``numerator / denominator``, NaN (as a tensor would give) instead of ZeroDivisionError for numbers."""
    if isinstance(denominator, Tensor) or denominator != 0:
        return numerator / denominator
    return math.nan
