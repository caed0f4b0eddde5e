"""Printing for every verb: numbers in four significant digits, aligned tables, JSON without NaN, warnings."""

from __future__ import annotations

import math
import sys

import numpy as np


def format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def json_safe(value):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def warn(warnings: list[str]) -> None:
    """Each warning as one line on stderr, apart from the report on stdout."""
    for warning in warnings:
        print(f"snrmon: warning: {warning}", file=sys.stderr)
