"""Parsing the command line, shared by every verb: a parser whose errors are one line, and number types for
options (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class UsageError(ValueError):
    """A bad command line or unusable data; reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message + sys.exit
        # main() prints "snrmon: error: "; a subcommand's parser adds its name ("fit: ...").
        command = self.prog.split()[1:]
        raise UsageError(f"{command[-1]}: {message}" if command else message)


def number(kind: type = float, *, zero_allowed: bool = False) -> Callable[[str], float]:
    """Parse a finite ``kind`` (``float`` or ``int``) that is positive, or also 0 with ``zero_allowed``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
            bound = "0 or more" if zero_allowed else "positive"
            raise argparse.ArgumentTypeError(f"must be {bound}: {text!r}")
        return value

    return parse


def file_name(text: str) -> str:
    """A file to write: any non-empty path (whether it can be written is checked before the work starts)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("needs a file name")
    return text
