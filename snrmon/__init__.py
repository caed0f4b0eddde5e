"""snrmon: live gradient signal-to-noise monitoring and the Shannon scaling law.

The core (this package, without ``snrmon.callbacks``) is framework-free: plain torch and numpy.
"""

from snrmon.estimator import GradientNoiseEstimator
from snrmon.groups import group_parameters
from snrmon.taps import GradientTaps

__version__ = "0.1.0"
__all__ = ["GradientNoiseEstimator", "GradientTaps", "group_parameters"]
