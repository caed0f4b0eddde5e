"""The Custom Scalars layout that groups snrmon's charts in TensorBoard."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def add_snr_layout(trainer: Trainer) -> None:
    """Group the SNR charts in TensorBoard's Custom Scalars tab (call on global rank zero)."""
    charts = {
        "signal |G|²": ["Multiline", [r"snr/(.*/)?signal$"]],
        "noise tr(Σ)": ["Multiline", [r"snr/(.*/)?noise$"]],
        "noise scale B_simple": ["Multiline", [r"snr/(.*/)?noise_scale$"]],
        "SNR at batch size": ["Multiline", [r"snr/(.*/)?ratio$"]],
        "uncertainty": ["Multiline", [r"snr/.*_se$"]],
    }
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars({"snrmon": charts})
