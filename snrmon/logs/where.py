"""Row selection with a small, safe expression language: ``"N <= 7e9 and D <= 1.8e11"``.

Comparisons, ``and``/``or``/``not``, numbers, quoted strings and column names, parsed with :mod:`ast` and
never evaluated as Python.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable

import numpy as np

from snrmon.logs.tables import Table

COMPARISONS: dict[type, Callable] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
FORBIDDEN = {
    ast.Call: "function calls",
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.BinOp: "arithmetic",
    ast.Lambda: "lambda",
    ast.IfExp: "if-expressions",
    ast.In: "'in'",
    ast.NotIn: "'not in'",
    ast.Is: "'is'",
    ast.IsNot: "'is not'",
}
ALLOWED = "comparisons (< <= > >= == !=), and, or, not, parentheses, numbers, quoted strings, column names"


class WhereError(ValueError):
    """An expression outside the allowed language, or one that does not fit the table's columns."""


def where(table: Table, expression: str) -> np.ndarray:
    """The boolean row mask of ``expression`` over ``table``'s columns, e.g. ``"N <= 7e9 and D > 1e9"``.

    Allowed: comparisons ``< <= > >= == !=`` (chained too: ``1e9 < D <= 1e11``), ``and``, ``or``, ``not``,
    parentheses, numeric literals, quoted string literals (``group == "a"``) and column names. Anything else
    (calls, attributes, arithmetic, ...) raises :class:`WhereError`; nothing is evaluated as Python.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        mask = _condition(tree.body, table, expression)
    except SyntaxError:
        raise WhereError(f"invalid expression {_short(expression)}; allowed: {ALLOWED}") from None
    except (RecursionError, MemoryError):  # Python's parser (or _condition) gives up on deep nesting
        raise WhereError(f"expression nested too deeply: {_short(expression)}") from None
    return np.broadcast_to(np.asarray(mask, dtype=bool), (len(table),)).copy()


def _short(expression: str, limit: int = 80) -> str:
    """The expression quoted for a message, cut to ``limit`` characters: a message stays one short line."""
    return repr(expression if len(expression) <= limit else expression[: limit - 3] + "...")


def _condition(node: ast.AST, table: Table, expression: str) -> np.ndarray:
    if isinstance(node, ast.BoolOp):
        masks = [_condition(value, table, expression) for value in node.values]
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        return combine.reduce(masks)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_condition(node.operand, table, expression)
    if isinstance(node, ast.Compare):
        mask = np.ones(len(table), dtype=bool)
        left = _value(node.left, table, expression)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if type(op) not in COMPARISONS:
                _reject(op, expression)
            right = _value(right_node, table, expression)
            mask &= _compare(op, left, right, expression)
            left = right
        return mask
    if isinstance(node, (ast.Name, ast.Constant)):
        raise WhereError(f"{expression!r} is not a condition: compare a column, e.g. 'D <= 1e11'")
    _reject(node, expression)


def _value(node: ast.AST, table: Table, expression: str) -> np.ndarray | float | str:
    if isinstance(node, ast.Name):
        if node.id not in table:
            raise WhereError(
                f"unknown column {node.id!r} in {expression!r}; columns: {', '.join(table.names)}"
            )
        return table[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
        if not isinstance(node.value, bool):
            return float(node.value) if not isinstance(node.value, str) else node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if isinstance(operand, ast.Constant) and type(operand.value) in (int, float):
            return -float(operand.value) if isinstance(node.op, ast.USub) else float(operand.value)
    if isinstance(node, (ast.Compare, ast.BoolOp)) or (
        isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
    ):
        raise WhereError(f"a condition cannot be compared again in {expression!r}; use and/or")
    _reject(node, expression)


def _compare(op: ast.cmpop, left, right, expression: str) -> np.ndarray:
    left_text, right_text = _is_text(left), _is_text(right)
    if left_text != right_text:
        raise WhereError(f"{expression!r} compares text with a number")
    if left_text and not isinstance(op, (ast.Eq, ast.NotEq)):
        raise WhereError(f"text can only be compared with == or != in {expression!r}")
    with np.errstate(invalid="ignore"):
        return np.asarray(COMPARISONS[type(op)](left, right), dtype=bool)


def _is_text(value) -> bool:
    return isinstance(value, str) or (isinstance(value, np.ndarray) and value.dtype.kind in "US")


def _reject(node: ast.AST, expression: str):
    what = FORBIDDEN.get(type(node), type(node).__name__)
    if isinstance(node, ast.Constant):
        what = f"the literal {node.value!r}"
    raise WhereError(f"{what} not allowed in {expression!r}; allowed: {ALLOWED}")
