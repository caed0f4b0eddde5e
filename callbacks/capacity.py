"""Logs the Shannon law's capacity term (T6) from an ``SNRMonitor``'s measurements: ``snr/capacity``.

A thin adapter: the arithmetic is ``snrmon.forecast.capacity.CapacityMeter`` (framework-free; the derivation
and its assumptions in docs/theory.md, "The capacity term"). At each step where the monitor has logged a new
estimate it adds the steps since the previous one, at the optimizer's current learning rate and the monitor's
batch size, and logs ``<prefix>/capacity`` with the terms it uses: ``<prefix>/capacity/snr``,
``signal_sum``, ``noise_sum``, ``tokens`` and, with a finite training set, ``dataset_snr`` and
``dataset_capacity``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks.callback import Callback

from snrmon.callbacks._batch_size import count_samples
from snrmon.callbacks._lightning import logging_step, should_log, window_ends
from snrmon.callbacks.snr_monitor import SNRMonitor
from snrmon.forecast.capacity import CapacityMeter


class CapacityLogger(Callback):
    """Log the capacity term measured by an ``SNRMonitor`` among the trainer's callbacks.

    Args:
        monitor: the ``SNRMonitor`` whose signal, noise, batch size and dataset size are used; it must be
            among the trainer's callbacks. ``None`` (the default, and what a LightningCLI config gives by
            leaving it out): the trainer's ``SNRMonitor`` with ``prefix``, found at setup.
        tokens_per_sample: tokens D per sample, the unit of ``capacity/tokens`` (default 1: samples seen,
            across ranks and accumulation).
        count_tokens: a function of a training batch returning its tokens (e.g. non-padding tokens); summed
            over micro-batches and ranks. Overrides ``tokens_per_sample``. A tensor it returns is read on the
            host at every micro-batch (a device sync): return a Python number where one is at hand.
        prefix: with ``monitor=None``, the ``prefix`` of the ``SNRMonitor`` to use; ``None``: the trainer's
            only ``SNRMonitor``.

    Raises:
        MisconfigurationException: at setup, when no ``SNRMonitor`` among the trainer's callbacks fits (none,
            none with ``prefix``, several and no ``prefix``), or ``monitor`` is not among them: a monitor
            outside the trainer measures nothing, and the logger would log nothing, without a word.
    """

    def __init__(
        self,
        monitor: SNRMonitor | None = None,
        tokens_per_sample: float = 1.0,
        count_tokens: Callable[[Any], int | float] | None = None,
        prefix: str | None = None,
    ) -> None:
        if not tokens_per_sample > 0:
            raise ValueError(f"tokens_per_sample must be positive, got {tokens_per_sample}")
        if monitor is not None and prefix is not None:
            raise ValueError("give monitor or prefix (to find the trainer's monitor), not both")
        self.monitor = monitor
        self.prefix = prefix
        self.tokens_per_sample = tokens_per_sample
        self.count_tokens = count_tokens
        self.meter: CapacityMeter | None = None
        self.latest: dict[str, float] = {}
        self._seen: dict | None = None  # the monitor's last `latest` used: it builds a new dict per estimate
        self._step = 0  # optimizer steps accounted for
        self._tokens = 0.0  # tokens of this rank since the last estimate

    @property
    def state_key(self) -> str:
        # Unique per monitor and token unit, so two loggers (e.g. samples and tokens) can be checkpointed.
        # Before setup finds the monitor, the prefix asked for stands in (the monitor's default: "snr").
        prefix = self.monitor.prefix if self.monitor is not None else self.prefix or "snr"
        counter = getattr(self.count_tokens, "__qualname__", None) if self.count_tokens else None
        return self._generate_state_key(
            prefix=prefix, tokens_per_sample=self.tokens_per_sample, count_tokens=counter
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        monitors = [callback for callback in trainer.callbacks if isinstance(callback, SNRMonitor)]
        if self.monitor is not None:
            if not any(callback is self.monitor for callback in monitors):
                raise MisconfigurationException(
                    f"CapacityLogger's monitor (SNRMonitor with prefix {self.monitor.prefix!r}) is not "
                    "among the trainer's callbacks: it would measure nothing, and nothing would be logged. "
                    "Pass the same SNRMonitor object to both, or leave monitor out (e.g. in a LightningCLI "
                    "config, which builds a separate object) to use the trainer's."
                )
            return
        found = [m for m in monitors if self.prefix is None or m.prefix == self.prefix.strip("/ ")]
        if len(found) == 1:
            self.monitor = found[0]
            return
        prefixes = ", ".join(repr(m.prefix) for m in monitors)
        if not monitors:
            problem = "there is none among the trainer's callbacks: add one, whose measurements it logs"
        elif not found:
            problem = f"none with prefix {self.prefix!r} among the trainer's callbacks (prefixes: {prefixes})"
        else:
            problem = f"{len(found)} among the trainer's callbacks (prefixes: {prefixes}): choose with prefix"
        raise MisconfigurationException(f"CapacityLogger needs an SNRMonitor: {problem}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.count_tokens is not None:
            self._tokens += float(self.count_tokens(batch))
        else:
            self._tokens += count_samples(batch) * self.tokens_per_sample
        # Only on logging steps, which every rank reaches alike (the monitor logs there too), so that every
        # rank joins the token count's all-reduce whatever its monitor did (a monitor that failed on one rank
        # must not leave the others waiting).
        if not (window_ends(trainer) and should_log(trainer)) or trainer.global_step <= self._step:
            return
        # Every rank saw its own batches: the tokens of the interval are the sum over ranks.
        tokens = float(trainer.strategy.reduce(torch.tensor(self._tokens), reduce_op="sum"))
        latest = self.monitor.latest
        prefix = self.monitor.prefix
        signal, noise = latest.get(f"{prefix}/signal"), latest.get(f"{prefix}/noise")
        batch_size = latest.get(f"{prefix}/batch_size")
        if latest is self._seen or signal is None or noise is None or batch_size is None:
            return  # no new estimate: the tokens count toward the next one
        self._tokens = 0.0
        self._seen = latest
        if self.meter is None:
            self.meter = CapacityMeter(latest.get(f"{prefix}/dataset_size"))
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        terms = self.meter.update(trainer.global_step - self._step, signal, noise, lr, batch_size, tokens)
        self._step = trainer.global_step
        if terms is None:
            return
        names = {"capacity": prefix + "/capacity"}
        self.latest = {
            names.get(key, f"{prefix}/capacity/{key}"): value
            for key, value in terms.as_dict().items()
            if key != "steps" and math.isfinite(value)
        }
        for logger in trainer.loggers:
            logger.log_metrics(self.latest, step=logging_step(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {"meter": None if self.meter is None else self.meter.state_dict(), "step": self._step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["meter"] is not None:
            self.meter = CapacityMeter()
            self.meter.load_state_dict(state_dict["meter"])
        self._step = state_dict["step"]
