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

Everything here is plain torch on the training device: ``add_small``/``add_applied`` accumulate one step,
``step`` turns it into per-step estimates and updates bias-corrected EMAs, and ``compute`` is the only
place that produces values meant for the host. No method syncs with the host before ``compute``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# Layout of the per-step statistics vector, after the per-group sums (kept in one tensor so that a
# distributed run reduces it with a single all-reduce).
_SMALL_SIZE, _SMALL_COUNT, _WEIGHT, _WEIGHT_SQ_OVER_SIZE = range(4)
_NUM_SCALARS = 4

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

    def __init__(self, num_groups: int, ema_decay: float = 0.95, device: torch.device | str = "cpu"):
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.num_groups = num_groups
        self.ema_decay = ema_decay
        self.device = torch.device(device)
        # float64 keeps the small difference X_b − X_B exact enough; MPS has no float64.
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.reset()

    def reset(self) -> None:
        """Forget all history."""
        zeros = lambda *shape: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        self.moments = zeros(self.num_groups, 5)
        self.updates = zeros()  # valid steps seen
        self.skipped = zeros()  # non-finite steps
        self.batch_size = zeros()  # last step's effective batch size
        self.discard_step()

    def discard_step(self) -> None:
        """Drop what was added since the last ``step``."""
        self._step_stats = torch.zeros(self.num_groups + _NUM_SCALARS, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ per microbatch (hot path)
    def add_small(self, sq_norms: Tensor, size: float | Tensor) -> None:
        """Add one small gradient: ``sq_norms[g]`` = |g_k|² over group g, mean over ``size`` samples."""
        stats = self._step_stats
        # ``size`` may be a Python number or a device tensor (a token count): both multiply in place.
        stats[: self.num_groups] += sq_norms.to(stats.dtype) * size
        stats[self.num_groups + _SMALL_SIZE] += size
        stats[self.num_groups + _SMALL_COUNT] += 1

    def add_applied(self, size: float | Tensor, weight: float = 1.0) -> None:
        """Declare that the applied gradient contains ``weight`` × a mean gradient over ``size`` samples."""
        stats = self._step_stats
        stats[self.num_groups + _WEIGHT] += weight
        stats[self.num_groups + _WEIGHT_SQ_OVER_SIZE] += weight * weight / size

    # ------------------------------------------------------------------ per optimizer step
    def step(self, applied_sq_norms: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Close the step: estimate T2/T3 from what was added, and update the EMAs.

        Args:
            applied_sq_norms: |Σ_k w_k g_k|² per group (the gradient the optimizer sees, already
                identical on all ranks under DDP).
            all_reduce: sums a tensor over distributed ranks (``None`` on a single process). Each rank
                adds its own small gradients and its share of the applied weights.

        A step with non-finite values, a single small gradient, or no usable second batch size leaves
        the EMAs untouched; non-finite steps are counted in ``skipped``.
        """
        stats = self._step_stats
        if all_reduce is not None:
            stats = all_reduce(stats)
        self.discard_step()
        groups = self.num_groups
        small_sum = stats[:groups]
        small_size, small_count, weight, weight_sq_over_size = stats[groups:]
        x_small = small_sum / small_size
        x_big = applied_sq_norms.to(stats.dtype) / (weight * weight)
        inv_small = small_count / small_size
        inv_big = weight_sq_over_size / (weight * weight)
        gap = inv_small - inv_big
        noise = (x_small - x_big) / gap
        signal = (x_big * inv_small - x_small * inv_big) / gap
        per_step = torch.stack([signal, noise, signal * signal, noise * noise, signal * noise], 1)

        finite = torch.isfinite(stats).all() & torch.isfinite(applied_sq_norms).all()
        # Two batch sizes that coincide (one microbatch, or pathological weights) carry no information.
        informative = (small_count > 1) & (gap.abs() > 1e-6 * inv_small)
        valid = finite & informative & torch.isfinite(per_step).all()
        beta = self.ema_decay
        updated = beta * self.moments + (1.0 - beta) * torch.nan_to_num(per_step)
        self.moments = torch.where(valid, updated, self.moments)
        self.updates += valid.to(stats.dtype)
        self.skipped += (~finite).to(stats.dtype)
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
        var_signal = (mean[:, _SIGNAL_SQ] - signal**2).clamp_min(0) * bessel
        var_noise = (mean[:, _NOISE_SQ] - noise**2).clamp_min(0) * bessel
        cov = (mean[:, _SIGNAL_NOISE] - signal * noise) * bessel
        signal_se = (var_signal * weight_sq).sqrt()
        noise_se = (var_noise * weight_sq).sqrt()
        noise_scale = noise / signal
        rel_var = (var_noise / noise**2 + var_signal / signal**2 - 2 * cov / (noise * signal)) * weight_sq
        noise_scale_se = noise_scale.abs() * rel_var.clamp_min(0).sqrt()
        ratio = self.batch_size / noise_scale
        ratio_se = ratio.abs() * rel_var.clamp_min(0).sqrt()
        return {
            "signal": signal,
            "noise": noise,
            "noise_scale": noise_scale,
            "ratio": ratio,
            "signal_se": signal_se,
            "noise_se": noise_se,
            "noise_scale_se": noise_scale_se,
            "ratio_se": ratio_se,
        }

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        # clone: on CPU `.cpu()` is the live tensor, which `step` changes in place.
        names = ("moments", "updates", "skipped", "batch_size")
        return {"ema_decay": self.ema_decay} | {name: getattr(self, name).cpu().clone() for name in names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state; the EMAs continue exactly if ``ema_decay`` is the saved one."""
        moments = state["moments"]
        if moments.shape != self.moments.shape:
            raise ValueError(f"saved estimator has {moments.shape[0]} groups, this one has {self.num_groups}")
        for name in ("moments", "updates", "skipped", "batch_size"):
            setattr(self, name, state[name].to(device=self.device, dtype=self.dtype, copy=True))
