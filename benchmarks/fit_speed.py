"""Wall time of fit_law: the single-run warm refit a live monitor does, and full multi-start fits.

Synthetic data with 1% log-normal noise from the Shannon-law design of tests/test_fitting.py (every run has
its basin inside the observed tokens) and from Chinchilla's constants. Prints machine information and one
row per case: rows, starting points, median wall time over the repeats, the target and whether it is met.

    python benchmarks/fit_speed.py              # the figures in docs/performance.md
    python benchmarks/fit_speed.py --repeats 9
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import scipy

from snrmon.fitting import fit_law
from snrmon.laws import get_law

SIGMA = 0.01
# Shannon design (tests/test_fitting.py): a, α, c, d, e, β, γ, δ with D* ≈ 4.5e10 at N = 1e8.
SHANNON = np.array([0.28 / 1e8**0.15, 0.15, 25.0 / 1e18**0.2, 15.0 / (0.2 * 3e10**0.5), 50.0, 0.3, 0.2, 0.5])
CHINCHILLA = np.array([1.8, 400.0, 0.34, 410.0, 0.28])


def noisy(law, theta, columns, seed=0):
    rng = np.random.default_rng(seed)
    return law.loss(theta, columns) * np.exp(rng.normal(0.0, SIGMA, len(columns["D"])))


def cpu_model() -> str:
    """The CPU's model name where the OS tells it (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(function, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the warm refits (cold: 3)")
    args = parser.parse_args()

    print(f"machine: {platform.platform()}, processor {platform.processor()!r} ({cpu_model()}), ", end="")
    print(f"{os.cpu_count()} CPUs")
    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}")
    rows = []

    # (i) One run (T9) on 10,000 points: cold multi-start, then the warm polish of the live monitor.
    run = get_law("shannon-run")
    n = 1e8
    a, alpha, c, d, e, beta, gamma, delta = SHANNON
    run_theta = np.array([a * n**alpha, c * n**gamma, d, e, beta, gamma, delta])
    tokens = {"D": np.geomspace(1e9, 1e12, 10_000)}
    loss = noisy(run, run_theta, tokens)
    seconds, cold = timed(lambda: fit_law(run, tokens, loss), 3)
    rows.append(("T9 single run, cold (default starts)", 10_000, len(run.starts(256)), seconds, 3, None))
    seconds, _ = timed(lambda: fit_law(run, tokens, loss, theta0=cold.theta, starts=0), args.repeats)
    rows.append(("T9 single run, warm (theta0 = cold fit)", 10_000, 0, seconds, args.repeats, 0.050))
    # The monitor's real case: the curve grew by 1,000 points since the last fit.
    earlier = {"D": tokens["D"][:9_000]}
    previous = fit_law(run, earlier, loss[:9_000])
    seconds, _ = timed(lambda: fit_law(run, tokens, loss, theta0=previous.theta, starts=0), args.repeats)
    rows.append(("T9 single run, warm after 1,000 new points", 10_000, 0, seconds, args.repeats, 0.050))

    # (ii) The full Shannon law (T6–T8, b = 1: 8 constants) on 1,000 rows, default multi-start.
    shannon = get_law("shannon")
    mesh = np.meshgrid(np.geomspace(1e8, 1e10, 10), np.geomspace(1e9, 1e12, 100), indexing="ij")
    columns = {"N": mesh[0].ravel(), "D": mesh[1].ravel()}
    loss = noisy(shannon, SHANNON, columns)
    seconds, _ = timed(lambda: fit_law(shannon, columns, loss), 3)
    rows.append(("Shannon T6–T8, cold (default starts)", 1_000, len(shannon.starts(256)), seconds, 3, 2.0))

    # (iii) Chinchilla on 1,000 rows, default multi-start.
    chinchilla = get_law("chinchilla")
    loss = noisy(chinchilla, CHINCHILLA, columns)
    seconds, _ = timed(lambda: fit_law(chinchilla, columns, loss), 3)
    rows.append(
        ("Chinchilla T11, cold (default starts)", 1_000, len(chinchilla.starts(256)), seconds, 3, None)
    )

    print()
    print("| fit | rows | starts | median wall time | repeats | target | met |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, count, starts, seconds, repeats, target in rows:
        wall = f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"
        goal = "—" if target is None else (f"≤ {target * 1e3:.0f} ms" if target < 1 else f"≤ {target:.0f} s")
        met = "—" if target is None else ("yes" if seconds <= target else "no")
        print(f"| {name} | {count:,} | {starts} | {wall} | {repeats} | {goal} | {met} |")


if __name__ == "__main__":
    main()
