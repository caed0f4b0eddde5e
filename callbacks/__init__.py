"""Lightning callbacks of snrmon (installed as ``snrmon.callbacks``)."""

from snrmon.callbacks.basin_early_stopping import BasinEarlyStopping
from snrmon.callbacks.snr_monitor import SNRMonitor

__all__ = ["BasinEarlyStopping", "SNRMonitor"]
