"""Forecasting the basin of a monitored loss curve (issue 7): framework-free, used by BasinEarlyStopping and
``snrmon forecast``."""

from snrmon.forecast.forecaster import BasinForecaster, Forecast, PriorError, Projection, load_prior

__all__ = ["BasinForecaster", "Forecast", "PriorError", "Projection", "load_prior"]
