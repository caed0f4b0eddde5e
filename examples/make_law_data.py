"""Generate the synthetic scaling-law data shipped in data/shannon_synthetic.csv.

Losses of six model sizes over a grid of token counts, drawn from the Shannon law (T6–T8) with known
constants and 1% multiplicative noise, so that the smaller models' curves turn up inside the grid (a real
basin) and the truth is known. Used by docs/law.md and the tests.

    python examples/make_law_data.py            # rewrites data/shannon_synthetic.csv
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from snrmon.laws import ShannonLaw

TRUE_CONSTANTS = dict(a=0.02, alpha=0.08, c=1.6e-11, d=1e-3, e=1.0, beta=0.3, gamma=0.6, delta=0.2)
MODEL_SIZES = (1e7, 3e7, 1e8, 3e8, 1e9, 3e9)
TOKENS = np.logspace(8, 12, 21)
NOISE = 0.01
OUT = Path(__file__).resolve().parents[1] / "data" / "shannon_synthetic.csv"


def main(seed: int = 0) -> Path:
    law = ShannonLaw()
    theta = np.array([TRUE_CONSTANTS[name] for name in law.param_names])
    rng = np.random.default_rng(seed)
    n, d = (grid.ravel() for grid in np.meshgrid(MODEL_SIZES, TOKENS, indexing="ij"))
    loss = law.loss(theta, {"N": n, "D": d}) * np.exp(rng.normal(0.0, NOISE, n.size))
    OUT.parent.mkdir(exist_ok=True)
    with OUT.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["N", "D", "loss"])
        writer.writerows(zip(n.astype(int), d.astype(int), np.round(loss, 6), strict=True))
    for size in MODEL_SIZES:
        print(f"N = {size:.0e}: true D* = {law.d_star(theta, size):.3g} tokens")
    return OUT


if __name__ == "__main__":
    print(main())
