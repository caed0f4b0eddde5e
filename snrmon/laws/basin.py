"""Where a Shannon-law loss curve turns up: the basin D* (T10) by root finding, and its closed-form limits."""

from __future__ import annotations

import math

from scipy.optimize import brentq


def basin_tokens(c: float, d: float, e: float, beta: float, gamma: float, delta: float) -> float:
    """The token count D* that minimises the loss of one run (fixed N), or ``inf`` if the loss never turns up.

    At fixed N the loss 1/(A·log2(1 + SNR)) is smallest where SNR(D) = D^β / (c·D^γ + d·D^δ + e) is largest
    (here ``c`` already holds N^γ: c = c_law · N^γ). Setting d log SNR / d log D = 0 gives T10:

        (γ − β)·c·D^γ + (δ − β)·d·D^δ = β·e

    The left side starts at 0 for D → 0 (below β·e) and is eventually dominated by its fastest-growing term,
    so a root exists iff that term grows, i.e. max(γ, δ) > β with a positive coefficient; where it exists it
    is unique (the left side can dip below zero first, but it crosses β·e only once). Solved in u = log D;
    a root beyond the float range gives ``inf``.
    """
    terms = [(exponent, coefficient) for exponent, coefficient in ((gamma, c), (delta, d)) if coefficient > 0]
    if e <= 0 or not terms or max(exponent for exponent, _ in terms) <= beta:
        return math.inf
    # Growing terms against β·e plus the shrinking ones, compared in log space so that nothing overflows
    # however far out the root lies: excess(u) = log(growing) − log(β·e + shrinking).
    growing = [(math.log((x - beta) * k), x) for x, k in terms if x > beta]
    shrinking = [(math.log(beta * e), 0.0)] + [(math.log((beta - x) * k), x) for x, k in terms if x < beta]

    def excess(u: float) -> float:
        return _log_sum_exp([a + x * u for a, x in growing]) - _log_sum_exp([a + x * u for a, x in shrinking])

    lower, upper = -1.0, 1.0
    while excess(lower) >= 0:
        lower *= 2
    while excess(upper) <= 0:
        upper *= 2
    root = brentq(excess, lower, upper, xtol=1e-12, rtol=1e-14)
    return _exp(root)


def _log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf  # a basin beyond float range is no basin in practice


def basin_tokens_data_limit(d: float, e: float, beta: float, delta: float) -> float:
    """T10 when the model-data term is negligible: D* = (β·e / ((δ − β)·d))^(1/δ), for δ > β."""
    return _exp((math.log(beta * e) - math.log((delta - beta) * d)) / delta) if delta > beta else math.inf


def basin_tokens_model_limit(c: float, e: float, beta: float, gamma: float) -> float:
    """T10 when the data-noise term is negligible: D* = (β·e / ((γ − β)·c))^(1/γ), for γ > β.

    With c = c_law·N^γ this is D* ∝ 1/N: bigger models reach the basin sooner.
    """
    return _exp((math.log(beta * e) - math.log((gamma - beta) * c)) / gamma) if gamma > beta else math.inf
