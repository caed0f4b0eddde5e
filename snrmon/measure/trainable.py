"""Which of a module's parameters the meter watches, and the gradient taps on them.

A tensor trains if it requires a gradient and an optimizer holds it: a loop clears only its optimizers'
gradients, so any other ``.grad`` grows from step to step and is never applied. Which tensors train can change
during a run (a callback unfreezes a backbone, lazy parameters come into being at the first forward, a module
is replaced), so :class:`~snrmon.measure.meter.GradientMeter` re-reads it on every measured window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parameter import is_lazy

from snrmon.measure.groups import group_parameters
from snrmon.measure.taps import GradientTaps, ShardedGradientTaps

NamedParameters = list[tuple[str, nn.Parameter]]


def optimized_parameter_ids(optimizers: Iterable[torch.optim.Optimizer]) -> set[int]:
    """The ids of every tensor the optimizers hold."""
    return {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}


class TrainableParameters:
    """The module's trainable parameters, re-read cheaply on each measured window.

    The module is walked once in a while (:meth:`walk_again`, once an epoch under Lightning; a walk costs
    about as much as the norm reads of a small model); each read only re-reads which of those tensors train
    and which exist yet.

    Args:
        module: the module whose parameters are read.
        optimizers: returns the optimizers whose tensors train (read at each :meth:`read`).
    """

    def __init__(self, module: nn.Module, optimizers: Callable[[], Iterable[torch.optim.Optimizer]]):
        self.module = module
        self.optimizers = optimizers
        self._named: NamedParameters | None = None  # all parameters, walked once in a while
        self._trainable: tuple[bool, ...] | None = None  # which of them the taps watch
        self._known: set[int] = set()  # their ids

    def walk_again(self) -> None:
        """Walk the module again at the next :meth:`read`: it may have new tensors."""
        self._named = None

    def read(self, sharded: bool) -> tuple[NamedParameters, list[str]] | None:
        """``None`` if which tensors train is unchanged since the last read; else the trainable ``(name,
        parameter)`` pairs and the names of the tensors that require a gradient but are in no optimizer."""
        optimized = optimized_parameter_ids(self.optimizers())
        # Under FSDP2 a walk is right only between steps (before a forward): after a forward the root
        # module's parameters are its unsharded ones.
        if self._named is not None and not sharded and not optimized <= self._known:
            self._named = None  # the optimizer holds a tensor the last walk missed: a module was replaced
        if self._named is None:
            self._named, self._trainable = list(self.module.named_parameters()), None
            self._known = {id(p) for _, p in self._named}
        trainable = tuple(p.requires_grad and not is_lazy(p) and id(p) in optimized for _, p in self._named)
        if trainable == self._trainable:
            return None
        outside = [n for n, p in self._named if p.requires_grad and id(p) not in optimized]
        self._trainable = trainable
        return [pair for pair, keep in zip(self._named, trainable, strict=True) if keep], outside

    def names(self) -> list[str]:
        """The names of the tensors that train now, from a fresh walk (what a failed rank needs to know)."""
        optimized = optimized_parameter_ids(self.optimizers())
        return [n for n, p in self.module.named_parameters() if p.requires_grad and id(p) in optimized]


def make_taps(
    module: nn.Module, named: NamedParameters, groups: int | dict[str, str] | None, sharded: bool
) -> tuple[list[str], GradientTaps]:
    """The parameter groups' names and the taps on ``named`` (FSDP2 taps if ``sharded``)."""
    names, parameters = zip(*named, strict=True)
    group_names, membership = group_parameters(list(names), groups)
    if sharded:
        return group_names, _fsdp2_taps(module, list(names), list(parameters), membership)
    return group_names, GradientTaps(list(parameters), membership)


def _fsdp2_taps(
    root: nn.Module, names: list[str], parameters: list[torch.nn.Parameter], membership: Tensor
) -> ShardedGradientTaps:
    """Taps for a module sharded with ``fully_shard`` on a 1-D data-parallel mesh; refuses anything else."""
    plain = [name for name, p in zip(names, parameters, strict=True) if not isinstance(p, DTensor)]
    if plain:
        raise ValueError(
            "under FSDP2 every trainable parameter must be sharded with `fully_shard` (apply it to the root"
            " module: under Lightning's ModelParallelStrategy in `configure_model`); not sharded:"
            f" {plain[:3]}"
        )
    if any(p.device_mesh.ndim != 1 for p in parameters):
        raise ValueError(
            "hybrid sharding (a 2-D mesh) is not supported: snrmon measures FSDP2 on one data-parallel"
            " mesh dimension"
        )
    modules = [(name, module) for name, module in root.named_modules() if isinstance(module, FSDPModule)]
    return ShardedGradientTaps(parameters, membership, names, modules)
