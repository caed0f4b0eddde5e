"""Which runs SNRMonitor can measure, checked at setup: the strategy, the optimization, the split batch.

The monitor reads squared norms of local gradients and sums them over data-parallel ranks. Strategies whose
gradients are split otherwise (DeepSpeed, XLA, tensor parallelism) would need another reduction; and the
estimates read Lightning's accumulation scaling, which only automatic optimization applies.
"""

from __future__ import annotations

from lightning.fabric.strategies import Strategy as FabricStrategy
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)

from snrmon.callbacks._lightning import tensor_parallel_size
from snrmon.callbacks._split_batch import holds_metrics


def check_supported_run(strategy: Strategy, pl_module: LightningModule, split_batch: bool) -> None:
    """Raise ``MisconfigurationException`` for a run the monitor cannot measure."""
    if isinstance(strategy, FabricStrategy):  # Fabric's strategies share the Trainer's names, not its classes
        raise MisconfigurationException(
            f"SNRMonitor is a Trainer callback; {type(strategy).__name__} here is a Lightning Fabric"
            " strategy. In a Fabric loop, measure with snrmon.callbacks.fabric_meter(fabric, model)"
            " (docs/integrations.md)."
        )
    supported = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
    refused = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)
    if not isinstance(strategy, supported) or isinstance(strategy, refused):
        raise MisconfigurationException(
            "SNRMonitor supports single-device, DDP, and FSDP2 (`fully_shard`) through"
            " ModelParallelStrategy(tensor_parallel_size=1), not"
            f" {type(strategy).__name__}: its gradients need a reduction of squared norms that this"
            " monitor does not do."
        )
    if isinstance(strategy, ModelParallelStrategy) and tensor_parallel_size(strategy) > 1:
        raise MisconfigurationException(
            "SNRMonitor supports ModelParallelStrategy with data parallelism (FSDP2) only, not tensor"
            " parallelism: a tensor-parallel gradient is split over ranks that saw the same samples."
        )
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            "SNRMonitor needs automatic optimization (it reads Lightning's accumulation scaling)."
        )
    if split_batch and holds_metrics(pl_module):
        raise MisconfigurationException(
            "SNRMonitor(split_batch=True) runs `training_step` once more on half of each measured batch;"
            " the module holds torchmetrics metrics, whose updates in that extra call would count the"
            " half batch twice and cannot be undone in general. Use gradient accumulation or several"
            " devices instead of split_batch."
        )
