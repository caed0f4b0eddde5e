"""Lightning callbacks of snrmon (installed as ``snrmon.callbacks``)."""

from snrmon.callbacks.snr_monitor import SNRMonitor

__all__ = ["SNRMonitor"]
