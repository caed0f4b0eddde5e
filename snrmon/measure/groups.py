"""Parameter groups: which parameters each reported signal/noise value sums over."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

TOTAL = "total"


def check_groups(groups: object) -> None:
    """Raise a clear error for a ``groups`` argument that :func:`group_parameters` cannot use."""
    if groups is None:
        return
    if isinstance(groups, bool):
        raise ValueError(f"groups as a depth must be a positive int, got {groups!r}")
    if not isinstance(groups, (int, Mapping)):
        raise TypeError(
            "groups must be None, a positive int (name depth) or a dict {group name: regex},"
            f" got {type(groups).__name__} {groups!r}"
        )
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"groups as a depth must be a positive int, got {groups}")
        return
    for name, regex in groups.items():
        if name == TOTAL:
            raise ValueError(f"{TOTAL!r} is reserved for the sum over all parameters")
        if not isinstance(name, str) or not name:
            raise ValueError(f"group names must be non-empty strings, got {name!r}")
        if not isinstance(regex, str):
            raise TypeError(f"group {name!r}: the pattern must be a regex string, got {regex!r}")
        try:
            re.compile(regex)
        except re.error as error:
            raise ValueError(f"group {name!r}: {regex!r} is not a valid regex ({error})") from None


def group_parameters(
    names: list[str], groups: int | dict[str, str] | None = None
) -> tuple[list[str], Tensor]:
    """Assign parameters to groups; the first group, ``"total"``, always holds every parameter.

    Args:
        names: parameter names, e.g. from ``module.named_parameters()``.
        groups: ``None`` for the total only; an ``int`` depth to group by the first ``depth`` components of
            the name (``2``: ``"blocks.0.attn.weight"`` -> ``"blocks.0"``); or ``{group: regex}``, each
            parameter going to the first group whose regex it matches (``re.search``).

    Returns:
        The group names and a 0/1 membership matrix of shape ``[num_groups, len(names)]``, so that
        ``membership @ per_parameter_squared_norms`` gives per-group squared norms (sums over coordinates).
    """
    check_groups(groups)
    labels: list[str | None]
    if groups is None:
        labels = [None] * len(names)
    elif isinstance(groups, int):
        labels = [".".join(name.split(".")[:groups]) for name in names]
    else:
        patterns = {group: re.compile(regex) for group, regex in groups.items()}
        labels = [next((g for g, p in patterns.items() if p.search(name)), None) for name in names]
        unmatched = set(patterns) - set(labels)
        if unmatched:
            warnings.warn(f"snrmon: parameter groups {sorted(unmatched)} match no parameter", stacklevel=2)
    group_names = [TOTAL] + list(dict.fromkeys(label for label in labels if label is not None))
    if TOTAL in group_names[1:]:
        raise ValueError(f"{TOTAL!r} is reserved for the sum over all parameters")
    membership = torch.zeros(len(group_names), len(names))
    membership[0] = 1.0
    for column, label in enumerate(labels):
        if label is not None:
            membership[group_names.index(label), column] = 1.0
    return group_names, membership
