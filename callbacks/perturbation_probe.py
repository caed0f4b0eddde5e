r"""
Perturbation probes
^^^^^^^^^^^^^^^^^^^

Log the validation loss of the model under a weight perturbation (Gaussian noise at an SNR in dB, or k-bit
quantization; theory §4) at each validation: the perturbed loss turns U-shaped before the clean one, so a
forecaster watching it sees the basin coming earlier. The perturbations are framework-free
(:mod:`snrmon.measure.probes`); this module is their Lightning adapter.

"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from snrmon.measure.probes import (
    DEFAULT_LAYER_TYPES,
    GaussianNoise,
    Perturbation,
    Quantization,
    perturbed_loss,
    probe_parameters,
)

LossFn = Callable[[pl.LightningModule, Any, int], Tensor]


class PerturbationProbe(Callback):
    r"""Log the validation loss under a weight perturbation as ``snr/probe/<name>``.

    During validation the first ``num_batches`` batches of the first validation dataloader are kept; at the
    end of the validation epoch the model is perturbed (``torch.no_grad``, eval mode, the probe's own
    generator), the loss of those batches is computed for each of the perturbation's fixed draws, and the
    weights and train/eval flags are restored bit-exactly. The mean over batches and draws is logged with
    ``pl_module.log(..., sync_dist=True)`` in ``on_validation_epoch_end``, so it reaches
    ``trainer.callback_metrics`` before ``on_validation_end``, where ``BasinEarlyStopping(monitor=...)`` and
    ``ModelCheckpoint`` read it. Under DDP every rank applies the same draws to its (identical) weights and
    the logged value is the mean of the ranks' losses. Nothing the training uses is touched: same seed, same
    training losses with and without a probe. Sanity-check validations are skipped.

    The loss of a batch is ``loss_fn(pl_module, batch, batch_idx)`` or, by default, what ``validation_step``
    returns (a scalar tensor, or a dict with ``"loss"``), called with its ``self.log`` muted. A
    ``validation_step`` with other side effects (updating a ``torchmetrics`` metric) needs a ``loss_fn``.

    Args:
        perturbation: what to apply (:class:`~snrmon.measure.GaussianNoise`,
            :class:`~snrmon.measure.Quantization` or your own :class:`~snrmon.measure.Perturbation`).
        num_batches: validation batches the probe evaluates (fewer is cheaper; the same batches each time
            when the validation dataloader is not shuffled).
        every_n_validations: probe every n-th validation only. The metric then keeps its last value in
            between; a ``BasinEarlyStopping`` watching it would see repeats, so keep 1 for that use.
        loss_fn: ``(pl_module, batch, batch_idx) -> scalar loss``; default: ``validation_step``'s return.
        layer_types: perturb the weights of these layers (default ``Linear``, ``Conv*``, ``Embedding``,
            ``MultiheadAttention``'s input projection; biases and norms untouched).
        include: instead, perturb each parameter for which ``include(name, parameter)`` is true.
        name: the metric suffix (default the perturbation's name, e.g. ``gaussian_10db``, ``int4``).

    Raises:
        ValueError: invalid ``num_batches`` or ``every_n_validations``.

    Without ``loss_fn``, the probe runs ``validation_step`` on the first ``num_batches`` batches of the first
    validation dataloader (with ``dataloader_idx=0`` when there are several). If it returns no loss there, a
    warning says so at the first such batch (the sanity check's, if any), the probe logs nothing, and
    training goes on; a perturbed run of it that returns none gives a NaN probe value.

    Attributes:
        last_value: the last logged (rank-averaged) probe loss, ``None`` before the first probe.
        local_value: this rank's last probe loss, before the average across ranks.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from snrmon.callbacks import BasinEarlyStopping, GaussianNoiseProbe
        >>> probe = GaussianNoiseProbe(snr_db=10)  # logs snr/probe/gaussian_10db
        >>> stopper = BasinEarlyStopping(monitor="snr/probe/gaussian_10db")
        >>> trainer = Trainer(callbacks=[probe, stopper])  # the probe logs before the stopper reads
    """

    def __init__(
        self,
        perturbation: Perturbation,
        num_batches: int = 4,
        every_n_validations: int = 1,
        loss_fn: LossFn | None = None,
        layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
        include: Callable[[str, nn.Parameter], bool] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
        if not isinstance(every_n_validations, int) or every_n_validations < 1:
            raise ValueError(f"every_n_validations must be a positive integer, got {every_n_validations!r}")
        self.perturbation = perturbation
        self.num_batches, self.every_n_validations = num_batches, every_n_validations
        self.loss_fn, self.layer_types, self.include = loss_fn, layer_types, include
        self.metric = f"snr/probe/{name or perturbation.name}"
        self.last_value: float | None = None
        self.local_value: float | None = None
        self._validations = 0  # validations seen (sanity checks excluded), for every_n_validations
        self._batches: list[tuple[Any, int]] = []
        self._warned_no_validation = False
        self._no_loss = False  # validation_step returns no loss and no loss_fn is given: nothing to probe
        self._several_dataloaders = False  # (then validation_step takes a dataloader_idx)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(metric=self.metric)

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and (
            not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0
        ):
            self._warn_no_validation()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validations == 0:
            self._warn_no_validation()  # e.g. a validation_step without a val_dataloader: Lightning skips it

    def _warn_no_validation(self) -> None:
        if not self._warned_no_validation:
            self._warned_no_validation = True
            rank_zero_warn(
                f"{type(self).__name__} logs `{self.metric}` at the end of each validation, but this run has "
                "no validation loop (no `validation_step`, no val_dataloader, or limit_val_batches=0): the "
                "probe will never run.",
                category=RuntimeWarning,
            )

    # -- validation ----------------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or batch_idx >= self.num_batches or self._no_loss:
            return  # (the probe reads the first batches of the first dataloader only)
        if self.loss_fn is None and _loss_of(outputs) is None:
            # Said at the first validation batch (the sanity check's, if any), not raised at the first probe:
            # a crash there would lose the epoch trained before it.
            self._no_loss = True
            rank_zero_warn(_no_loss_message(type(self).__name__, outputs), category=RuntimeWarning)
            return
        # Lightning passes dataloader_idx to a validation_step only when there are several dataloaders.
        self._several_dataloaders = len(trainer.num_val_batches) > 1
        # The batches are kept (already on the device) rather than probed here: one perturbation per draw for
        # all of them, instead of one per batch and draw.
        if len(self._batches) < self.num_batches and self._due(trainer):
            self._batches.append((batch, batch_idx))

    def _due(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and self._validations % self.every_n_validations == 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due, self._validations = self._due(trainer), self._validations + 1
        batches, self._batches = self._batches, []
        if not due or self._no_loss:  # (every rank alike: the same validation_step)
            return
        if not batches:  # every rank joins the reduction, even one without a batch (NaN: none seen)
            local = torch.tensor(float("nan"), device=pl_module.device)
        else:
            params = probe_parameters(pl_module, self.layer_types, self.include)
            # Lightning runs validation_step under the precision plugin's autocast; so does the probe, or a
            # bf16-mixed run would be probed in fp32.
            with trainer.precision_plugin.val_step_context():
                local = perturbed_loss(
                    pl_module, self.perturbation, lambda: self._mean_loss(pl_module, batches), params
                )
        local = local.to(pl_module.device)
        self.local_value = float(local)
        pl_module.log(self.metric, local, sync_dist=True, on_epoch=True, on_step=False)
        # The value Lightning's sync_dist mean will put in callback_metrics (read here so it is known on
        # every rank now, not only after the epoch's metrics are gathered).
        self.last_value = float(trainer.strategy.reduce(local.clone(), reduce_op="mean"))

    def _mean_loss(self, pl_module: pl.LightningModule, batches: list[tuple[Any, int]]) -> Tensor:
        losses = [
            self._batch_loss(pl_module, batch, batch_idx).detach().float() for batch, batch_idx in batches
        ]
        return torch.stack(losses).mean()

    def _batch_loss(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch, batch_idx)
        # The validation_step's own self.log calls would log the perturbed loss under the clean names: mute
        # them (instance attributes shadow the methods; deleting them brings the methods back).
        pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
        try:
            args = (batch, batch_idx, 0) if self._several_dataloaders else (batch, batch_idx)
            out = pl_module.validation_step(*args)
        finally:
            del pl_module.log, pl_module.log_dict
        loss = _loss_of(out)
        if loss is None:  # the clean batch returned one, the perturbed not (a step that skips a bad loss?)
            return torch.tensor(float("nan"), device=pl_module.device)  # a NaN probe value, not a crash
        return loss

    # -- checkpointing -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations, "last_value": self.last_value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = state_dict["validations"]
        self.last_value = state_dict["last_value"]


def _loss_of(out: Any) -> Tensor | None:
    """The loss a ``validation_step`` returned (a scalar tensor, or a dict's ``"loss"``), if any."""
    loss = out.get("loss") if isinstance(out, dict) else out
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None


def _no_loss_message(probe: str, out: Any) -> str:
    return (
        f"{probe} needs the loss of a validation batch: `validation_step` returned {type(out).__name__}, so"
        " nothing is probed or logged. Return the loss from `validation_step` (a scalar tensor, or a dict"
        " with 'loss'), or pass `loss_fn=lambda module, batch, batch_idx: ...`."
    )


class GaussianNoiseProbe(PerturbationProbe):
    r"""Log the validation loss under Gaussian weight noise at ``snr_db`` dB as
    ``snr/probe/gaussian_<snr_db>db``.

    Per perturbed tensor ``W``: ``W + σ·ε``, ``σ² = mean(W²) / 10^(snr_db/10)``, averaged over ``draws`` fixed
    draws of ``ε`` (draw ``i`` seeded with ``seed + i``; see :class:`PerturbationProbe` for the rest).

    Args:
        snr_db: the weight SNR in dB (e.g. 10).
        draws: noise draws averaged per probe.
        seed: the seed of the first draw.
        \**kwargs: :class:`PerturbationProbe`'s ``num_batches``, ``every_n_validations``, ``loss_fn``,
            ``layer_types``, ``include``, ``name``.

    Raises:
        ValueError: ``snr_db`` not finite, ``draws`` < 1, or an invalid :class:`PerturbationProbe` argument.

    Example::

        >>> probe = GaussianNoiseProbe(snr_db=10, draws=4, num_batches=4)
        >>> probe.metric
        'snr/probe/gaussian_10db'
    """

    def __init__(self, snr_db: float, draws: int = 4, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(GaussianNoise(snr_db, draws=draws, seed=seed), **kwargs)


class QuantizationProbe(PerturbationProbe):
    r"""Log the validation loss under ``bits``-bit weight quantization as ``snr/probe/int<bits>``.

    Symmetric per-output-channel round-to-nearest fake quantization in float (deterministic: one draw; see
    :class:`~snrmon.measure.Quantization` and :class:`PerturbationProbe`).

    Args:
        bits: bits per weight, ≥ 2 (3, 4 and 8 are typical).
        \**kwargs: :class:`PerturbationProbe`'s ``num_batches``, ``every_n_validations``, ``loss_fn``,
            ``layer_types``, ``include``, ``name``.

    Raises:
        ValueError: ``bits`` not an integer ≥ 2, or an invalid :class:`PerturbationProbe` argument.

    Example::

        >>> QuantizationProbe(bits=4).metric
        'snr/probe/int4'
    """

    def __init__(self, bits: int, **kwargs: Any) -> None:
        super().__init__(Quantization(bits), **kwargs)
