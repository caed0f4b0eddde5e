"""Scaling laws: their equations (T6–T14), fitting them to observed losses, their basins (T10), and the
fit-and-score study behind ``snrmon fit`` and ``compare``. numpy and scipy, no torch."""

from snrmon.laws.basin import basin_tokens
from snrmon.laws.equations import LAWS, Columns, Law, Param, PowerLaw, ShannonLaw, ShannonRunLaw, get_law
from snrmon.laws.fitting import Fit, FitError, fit_law, r2_score, rmse

__all__ = [
    "LAWS",
    "Columns",
    "Fit",
    "FitError",
    "Law",
    "Param",
    "PowerLaw",
    "ShannonLaw",
    "ShannonRunLaw",
    "basin_tokens",
    "fit_law",
    "get_law",
    "r2_score",
    "rmse",
]
