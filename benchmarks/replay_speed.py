"""How long does ``snrmon forecast`` take on a long log? (issue 15: replay at the speed of reading a file)

Writes synthetic curves of a run logged at every step (a U-shaped validation loss, a training loss that keeps
falling, both noisy) to CSV files and times the real command on them, end to end (reading, forecasting,
printing), in this process:

    python benchmarks/replay_speed.py            # 1,000 and 10,000 points, with and without the training loss
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from snrmon.cli import main  # noqa: E402


def write_curve(path: Path, points: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    step = np.arange(1, points + 1)
    u = step / points
    val = 0.5 + 2.0 * (1 + 40 * u) ** -0.5 + 0.3 * u + 0.004 * rng.normal(size=points)
    train = 0.2 + 2.0 * (1 + 40 * u) ** -0.7 + 0.004 * rng.normal(size=points)
    rows = "\n".join(f"{s},{v:.6f},{t:.6f}" for s, v, t in zip(step, val, train, strict=True))
    path.write_text("step,val_loss,train_loss\n" + rows + "\n")
    return path


def timed(args: list[str]) -> float:
    began = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = main(args)
    assert status == 0, args
    return time.perf_counter() - began


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        print("| points | training loss | --every | seconds | ms per forecast |")
        print("| --- | --- | --- | --- | --- |")
        for points, with_train, every in (
            (1000, True, 1),
            (10_000, True, 1),
            (1000, False, 1),
            (10_000, False, 10),
        ):
            data = str(write_curve(Path(folder) / f"curve{points}.csv", points))
            args = ["forecast", data, "--metric", "val_loss", "--every", str(every)]
            args += ["--train-metric", "train_loss"] if with_train else []
            seconds = timed(args)
            print(
                f"| {points:,} | {'yes' if with_train else 'no (the law)'} | {every} | {seconds:.1f} | "
                f"{1000 * seconds / (points // every):.1f} |",
                flush=True,
            )
