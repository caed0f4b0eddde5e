"""Measuring gradients: taps on backward, parameter groups, the signal/noise estimator, the training set's
size, the framework-free meter, and the perturbations of the probes. Plain torch, no Lightning."""

from snrmon.measure.estimator import GradientNoiseEstimator
from snrmon.measure.groups import TOTAL, group_parameters
from snrmon.measure.meter import GradientMeter
from snrmon.measure.probes import GaussianNoise, Perturbation, Quantization, perturbed_loss
from snrmon.measure.taps import GradientTaps, ShardedGradientTaps

__all__ = [
    "TOTAL",
    "GaussianNoise",
    "GradientMeter",
    "GradientNoiseEstimator",
    "GradientTaps",
    "Perturbation",
    "Quantization",
    "ShardedGradientTaps",
    "group_parameters",
    "perturbed_loss",
]
