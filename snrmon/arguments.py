"""Number types for the command line's options, shared by every verb (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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
