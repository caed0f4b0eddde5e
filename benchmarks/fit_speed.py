"""Wall time of fit_law: the single-run warm refit a live monitor does, and full multi-start fits.

Synthetic data with 1% log-normal noise from the Shannon-law design of tests/test_fitting.py (every run has
its basin inside the observed tokens) and from Chinchilla's constants. Prints machine information and one
row per case: rows, starting points, median wall time over the repeats, the target and whether it is met.

    python benchmarks/fit_speed.py              # the figures in docs/performance.md
    python benchmarks/fit_speed.py --repeats 9
    python benchmarks/fit_speed.py --large      # the snrmon command on 25,000 to 200,000 rows

``--large`` writes CSV files of continuous model sizes (every row its own N, as in a log of many small
runs) and times the ``snrmon`` command on them in a fresh process each (``python -m snrmon.cli``, run from a
temporary directory, so ``PYTHONPATH`` chooses the code measured): ``fit --bootstrap 0``, ``compare`` and
``fit`` with its default bootstrap, with a time limit per command.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy

from snrmon.laws import get_law
from snrmon.laws.fitting import fit_law

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


# The synthetic data of docs/law.md (examples/make_law_data.py): a, α, c, d, e, β, γ, δ.
SYNTHETIC = np.array([0.02, 0.08, 1.6e-11, 1e-3, 1.0, 0.3, 0.6, 0.2])


def large_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` rows of the Shannon law at log-uniform N in [1e7, 3e9] and D in [1e8, 1e12], 1% noise."""
    rng = np.random.default_rng(seed)
    columns = {"N": np.exp(rng.uniform(np.log(1e7), np.log(3e9), rows))}
    columns["D"] = np.exp(rng.uniform(np.log(1e8), np.log(1e12), rows))
    loss = noisy(get_law("shannon"), SYNTHETIC, columns, seed)
    np.savetxt(path, np.column_stack([columns["N"], columns["D"], loss]), delimiter=",", header="N,D,loss",
               comments="", fmt="%.8g")  # fmt: skip
    return path


def command_time(arguments: list[str], limit: float) -> tuple[float | None, float, int, int]:
    """Wall time of ``snrmon ARGUMENTS`` in a fresh process (None: over ``limit`` s), its CPU time (user +
    system: less sensitive than wall time to other work on a shared machine), its exit status and its number
    of output lines."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "snrmon.cli", *arguments],
            capture_output=True,
            text=True,
            timeout=limit,
            cwd=tempfile.gettempdir(),  # not the repository: PYTHONPATH, else the installed snrmon, is timed
        )
    except subprocess.TimeoutExpired:
        return None, math.nan, -1, 0
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, done.returncode, len(done.stdout.splitlines())


def large(sizes: list[int], limit: float, bootstrap: bool = True) -> None:
    """Time the command on large CSV files: fit without and with the bootstrap, and compare."""
    cases = [
        ("fit --law shannon --bootstrap 0", ["fit", "--law", "shannon", "--bootstrap", "0"]),
        ("compare", ["compare"]),
    ]
    if bootstrap:
        cases.append(("fit --law shannon (100 bootstrap resamples)", ["fit", "--law", "shannon"]))
    print()
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print("| command | rows | wall time | CPU time | exit status | output lines |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as directory:
        for rows in sizes:
            path = large_csv(Path(directory) / f"large_{rows}.csv", rows)
            for name, arguments in cases:
                seconds, cpu, code, lines = command_time([arguments[0], str(path), *arguments[1:]], limit)
                wall = f"> {limit:.0f} s (stopped)" if seconds is None else f"{seconds:.1f} s"
                print(f"| snrmon {name} | {rows:,} | {wall} | {cpu:.1f} s | {code} | {lines:,} |", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the warm refits (cold: 3)")
    parser.add_argument("--large", action="store_true", help="time the snrmon command on large CSV files")
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[25_000, 50_000, 100_000, 200_000], help="--large: row counts"
    )
    parser.add_argument("--limit", type=float, default=600.0, help="--large: seconds allowed per command")
    parser.add_argument(
        "--no-bootstrap", action="store_true", help="--large: skip the (slowest) fit with the bootstrap"
    )
    args = parser.parse_args()

    print(f"machine: {platform.platform()}, processor {platform.processor()!r} ({cpu_model()}), ", end="")
    print(f"{os.cpu_count()} CPUs")
    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}")
    if args.large:
        large(args.rows, args.limit, bootstrap=not args.no_bootstrap)
        return
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
