"""The few private Lightning and torch attributes the callbacks read, in one place.

Each accessor says what it reads and why no public API gives it; a Lightning upgrade that renames one of them
breaks only this module.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel


def should_log(trainer: Trainer) -> bool:
    """Whether this step is a logging step (``log_every_n_steps``), as Lightning decides for ``self.log``."""
    return trainer._logger_connector.should_update_logs


def window_ends(trainer: Trainer) -> bool:
    """Whether the current training batch is the last microbatch of its accumulation window."""
    return not trainer.fit_loop._should_accumulate()


def logging_step(trainer: Trainer) -> int:
    """The step Lightning attaches to ``self.log`` values, so the monitor's points line up with the user's."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def logged_now(trainer: Trainer) -> dict[str, Tensor]:
    """The values Lightning sends to the loggers at this moment of a fit, by logged name: in
    ``on_train_batch_end`` the step values (logged right after it, at a logging step), in
    ``on_train_epoch_end`` and ``on_validation_end`` the epoch values. The public ``trainer.logged_metrics``
    holds them mixed with every value logged before; these are the current loop's alone. Call on every rank:
    at an epoch's end this computes the epoch values, a collective for those logged with ``sync_dist``
    (computed once, as Lightning's own ``trainer.callback_metrics`` does)."""
    if trainer._results is None:
        return {}
    return dict(trainer._logger_connector.metrics["log"])


def step_of_last_batch(trainer: Trainer) -> int:
    """After training, the step :func:`logging_step` gave during its last batch: Lightning counts a batch that
    stepped only after that batch's hooks have run."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped - 1


def tensor_parallel_size(strategy: ModelParallelStrategy) -> int:
    """The tensor-parallel size of a ``ModelParallelStrategy`` (its mesh exists once processes start)."""
    return strategy.device_mesh["tensor_parallel"].size()


def ddp_comm_hooks(trainer: Trainer) -> list:
    """The communication hooks registered on the DDP-wrapped model (PowerSGD, fp16 compression, ...): they
    change what the all-reduce makes of the ranks' gradients. Torch keeps them in a private list."""
    model = trainer.strategy.model
    return list(getattr(model, "_comm_hooks", [])) if isinstance(model, DistributedDataParallel) else []
