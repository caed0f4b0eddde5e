"""Hugging Face ``Trainer`` callbacks of snrmon (``pip install snrmon[hf]``): the gradient signal-to-noise
monitor and basin early stopping, driving the same framework-free core as the Lightning callbacks
(:class:`snrmon.GradientMeter`, :class:`snrmon.forecast.watch.BasinWatch`).

``import snrmon.callbacks`` does not import transformers; this package does.
"""

from snrmon.callbacks.transformers.add_callbacks import add_callbacks
from snrmon.callbacks.transformers.basin_early_stopping_callback import BasinEarlyStoppingCallback
from snrmon.callbacks.transformers.snr_monitor_callback import SNRMonitorCallback

__all__ = ["BasinEarlyStoppingCallback", "SNRMonitorCallback", "add_callbacks"]
