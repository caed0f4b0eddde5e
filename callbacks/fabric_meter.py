"""fabric_meter: a GradientMeter for a Lightning Fabric loop (LitGPT's fine-tuning and pretraining loops).

Fabric has no hooks for the monitor to use, so the loop calls the meter itself; what this adds to
``GradientMeter(model)`` are Fabric's two seams: the strategy, which must be one whose gradients the meter
reads whole (one device, DDP), and the precision plugin's fp16 loss scaler, which the meter must divide out.
"""

from __future__ import annotations

from lightning.fabric import Fabric
from lightning.fabric.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
)
from torch import nn

from snrmon.measure.meter import GradientMeter


def fabric_meter(
    fabric: Fabric,
    model: nn.Module,
    groups: int | dict[str, str] | None = None,
    dataset_size: float | None = None,
    ema_decay: float = 0.95,
) -> GradientMeter:
    r"""A :class:`~snrmon.GradientMeter` on ``model`` for the loop that ``fabric`` runs.

    The meter takes the fp16 ``GradScaler`` of Fabric's precision plugin (``precision="16-mixed"``), and names
    parameters as the model inside Fabric's wrapper does (``blocks.0``, not ``_forward_module.blocks.0``).
    The loop divides each microbatch's mean loss by K (as LitGPT does), calls ``after_backward`` after each
    ``fabric.backward`` and ``before_step`` before ``fabric.clip_gradients`` and ``optimizer.step()``.

    Args:
        fabric: the launched ``Fabric`` (under DDP, make the meter after ``fabric.launch()``).
        model: the module, as returned by ``fabric.setup`` or before it.
        groups, dataset_size, ema_decay: as for :class:`~snrmon.GradientMeter`.

    Raises:
        ValueError: for a strategy other than one device or DDP (FSDP, DeepSpeed, XLA, model parallelism,
            DataParallel): their gradients are sharded or reduced otherwise, and the meter would report wrong
            numbers; and the meter's own errors.

    Example::

        fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
        fabric.launch()
        model, optimizer = fabric.setup(model, optimizer)
        with fabric_meter(fabric, model, groups=3) as meter:
            for iteration, (x, y) in enumerate(loader, 1):
                is_accumulating = iteration % K != 0
                with fabric.no_backward_sync(model, enabled=is_accumulating):
                    fabric.backward(loss_fn(model(x), y) / K)
                meter.after_backward(batch_size=len(x))
                if not is_accumulating:
                    meter.before_step()
                    optimizer.step()
                    optimizer.zero_grad()
    """
    strategy = fabric.strategy
    supported = (SingleDeviceStrategy, DDPStrategy)
    refused = (DeepSpeedStrategy, SingleDeviceXLAStrategy)
    if not isinstance(strategy, supported) or isinstance(strategy, refused):
        raise ValueError(
            f"fabric_meter supports one device and DDP, not {type(strategy).__name__}: its gradients are"
            " sharded or reduced otherwise, and the meter's squared norms would be wrong"
        )
    scaler = getattr(strategy.precision, "scaler", None)  # MixedPrecision's public attribute; None but fp16
    return GradientMeter(model, groups=groups, dataset_size=dataset_size, scaler=scaler, ema_decay=ema_decay)
