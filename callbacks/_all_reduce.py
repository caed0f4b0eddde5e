"""The monitor's one collective per measured step, and how a rank whose monitor failed still takes part.

Under DDP and FSDP2 each measured step ends in one all-reduce of a short vector
(``GradientNoiseEstimator.step``). Every rank must join it, or the others wait forever.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from snrmon.callbacks._trainable import optimized_parameter_ids
from snrmon.measure.estimator import GradientNoiseEstimator
from snrmon.measure.groups import group_parameters


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Sum over DDP ranks in place. A plain all-reduce: Lightning's ``strategy.reduce`` adds a barrier, which
    would block the host on every measured step."""
    torch.distributed.all_reduce(tensor)
    return tensor


def skip_step_on_all_ranks(
    trainer: Trainer,
    pl_module: LightningModule,
    groups: int | dict[str, str] | None,
    sharded: bool,
    estimator: GradientNoiseEstimator | None,
) -> None:
    """A rank whose monitor failed still joins each measured step's all-reduce, with non-finite values: no
    rank waits for it, and every rank skips the step alike (counted in ``snr/skipped_steps``). The vector
    has the length the healthy ranks use now, for the parameters that train now (they may have changed
    since this rank failed, or this rank may have failed before it built its estimator)."""
    optimized = optimized_parameter_ids(trainer)
    names = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) in optimized]
    if not names:
        return  # the healthy ranks have nothing to measure either
    num_groups = len(group_parameters(names, groups)[0])
    # The layout of GradientNoiseEstimator.step's vector: per group the small gradients' sum, four scalars,
    # and under FSDP2 per group the applied gradient's shard.
    length = num_groups + 4 + (num_groups if sharded else 0)
    dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
    sum_over_ranks(torch.full((length,), math.nan, dtype=dtype, device=pl_module.device))
    if estimator is not None:
        estimator.discard_step()
        estimator.skipped += 1
