"""The ``snrmon`` command: fit a scaling law to a loss log, compare every law on it, or replay a run through
the basin forecaster. One module per verb (``fit``, ``compare``, ``forecast``); this one dispatches.

    snrmon fit DATA --law shannon [--where EXPR] [--train-where EXPR] [--json] [--plot FILE]
    snrmon compare DATA [--where EXPR] [--train-where EXPR] [--json]
    snrmon forecast DATA [--metric NAME] [--x D|step] [--horizon H] [--prior FIT.json] [--json] [--plot FILE]

DATA is a CSV file (columns N, D, loss; optional bits, group, others) or a TensorBoard log directory. Bad
input ends with a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from snrmon.cli import compare, fit
from snrmon.cli.arguments import Parser, UsageError
from snrmon.cli.data import DESCRIPTION, data_parser
from snrmon.laws import FitError
from snrmon.laws.plot import PlotError
from snrmon.logs import LogError, WhereError

USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        with one_blas_thread():
            return args.run(args)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except (UsageError, LogError, WhereError, FitError, PlotError) as error:
        print(f"snrmon: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into e.g. head, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # a bug: still no traceback for the user, but say where to look
        print(f"snrmon: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def one_blas_thread():
    """A context in which BLAS (numpy's and scipy's OpenBLAS) runs on one thread.

    The fits solve many small least-squares problems (8 constants by a few hundred or thousand rows; only the
    final polish sees every row): BLAS threads only add overhead there, and on a busy machine a great deal of
    it (a 20,000-row Shannon fit run at low priority beside other work took 2 s with one thread, 44 s with
    two; see docs/performance.md).
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="snrmon", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    data = data_parser()
    fit.add_parser(commands, data)
    compare.add_parser(commands, data)
    from snrmon.cli.forecast import add_parser as add_forecast  # here: other commands never load it

    add_forecast(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
