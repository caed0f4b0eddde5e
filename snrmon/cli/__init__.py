"""The ``snrmon`` command line: parsing and printing only; the work is done by :mod:`snrmon.laws`,
:mod:`snrmon.forecast` and :mod:`snrmon.logs`."""

from snrmon.cli.main import main

__all__ = ["main"]
