"""Lightning callbacks of snrmon (installed as ``snrmon.callbacks``)."""

from snrmon.callbacks.basin_early_stopping import BasinEarlyStopping
from snrmon.callbacks.fabric_meter import fabric_meter
from snrmon.callbacks.perturbation_probe import GaussianNoiseProbe, PerturbationProbe, QuantizationProbe
from snrmon.callbacks.snr_monitor import SNRMonitor

__all__ = [
    "BasinEarlyStopping",
    "GaussianNoiseProbe",
    "PerturbationProbe",
    "QuantizationProbe",
    "SNRMonitor",
    "fabric_meter",
]
