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
    is unique (the left side can dip below zero first, but it crosses β·e only once). Solved in u = log D.
    """
    terms = [(gamma, c), (delta, d)]
    exponent, coefficient = max((t for t in terms if t[1] > 0), default=(0.0, 0.0))
    if exponent <= beta or e <= 0:
        return math.inf

    def excess(u: float) -> float:
        return (gamma - beta) * c * math.exp(gamma * u) + (delta - beta) * d * math.exp(delta * u) - beta * e

    # Bracket: below, every term is tiny; above, the dominant term alone exceeds β·e with room to spare.
    upper = (math.log(2 * beta * e) - math.log((exponent - beta) * coefficient)) / exponent
    lower = upper - 1.0
    while excess(lower) >= 0:
        lower -= 10.0
    while excess(upper) <= 0:
        upper += 10.0
        if upper > 700 / max(exponent, 1e-12):
            return math.inf
    return math.exp(brentq(excess, lower, upper, xtol=1e-12, rtol=1e-12))


def basin_tokens_data_limit(d: float, e: float, beta: float, delta: float) -> float:
    """T10 when the model-data term is negligible: D* = (β·e / ((δ − β)·d))^(1/δ), for δ > β."""
    return (beta * e / ((delta - beta) * d)) ** (1 / delta) if delta > beta else math.inf


def basin_tokens_model_limit(c: float, e: float, beta: float, gamma: float) -> float:
    """T10 when the data-noise term is negligible: D* = (β·e / ((γ − β)·c))^(1/γ), for γ > β.

    With c = c_law·N^γ this is D* ∝ 1/N: bigger models reach the basin sooner.
    """
    return (beta * e / ((gamma - beta) * c)) ** (1 / gamma) if gamma > beta else math.inf
