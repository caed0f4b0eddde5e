"""The split-batch fallback of ``SNRMonitor(split_batch=True)``: a second batch size from half of the batch.

With one device and no gradient accumulation a step has one gradient, at one batch size, and signal and noise
cannot be separated. The fallback runs ``training_step`` once more, on the first half of the batch, and a
backward whose gradient only the monitor's taps see. Nothing of the run may change: not ``.grad``, not the
torch, Python or NumPy random streams, not buffers such as BatchNorm's running statistics, not the logs.
Torchmetrics metrics updated inside that call cannot be undone in general, so a module that holds them is
refused at setup.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from snrmon.measure.meter import GradientMeter


def holds_metrics(pl_module: LightningModule) -> bool:
    """Whether the module holds torchmetrics metrics: the extra ``training_step`` would update them again."""
    try:
        from torchmetrics import Metric
    except ImportError:
        return False
    return any(isinstance(module, Metric) for module in pl_module.modules())


def first_half(batch: Any, size: int) -> Any:
    """The first ``size // 2`` samples of a batch of ``size``: each tensor of that leading dimension is cut,
    anything else is kept whole."""
    return apply_to_collection(batch, Tensor, lambda t: t[: size // 2] if t.ndim and len(t) == size else t)


def backward_aside(
    trainer: Trainer,
    pl_module: LightningModule,
    batch: Any,
    batch_idx: int,
    meter: GradientMeter,
    batch_size: float | Tensor,
) -> None:
    """Run ``training_step`` on ``batch`` and hand its loss to ``meter.backward_aside`` (a backward that the
    taps alone see): random states and buffers are restored, ``self.log`` is muted, and ``.grad`` is left
    alone."""
    device = pl_module.device
    rng_devices = [device] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=rng_devices),
        _restored_python_and_numpy_random(),
        _muted_logging(pl_module),
        _restored_buffers(pl_module),
        trainer.precision_plugin.train_step_context(),
    ):
        output = pl_module.training_step(batch, batch_idx)
        loss = output["loss"] if isinstance(output, dict) else output
        meter.backward_aside(loss, batch_size)


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
