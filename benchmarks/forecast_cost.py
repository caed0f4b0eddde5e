"""What a forecast costs against the training it watches, per corpus scenario and signal (issue 13's target:
at most 1% of the training time).

For each scenario of a split (benchmarks/corpus.py) this times, in this process on one thread:

- the training between two validations: ``val_every`` optimizer steps of the scenario's own loop (batch,
  forward, backward, step; no validation, no statistics), CPU time, the median of a few intervals after a
  warm-up one;
- one forecast per signal, replaying the recorded curve through ``BasinForecaster``: the ratio (the default
  with a training loss, fed the training set's SNR as the callback does) over the replayed window, and the
  law (the loss alone) over its first ``--law-points`` points (its fresh searches make it slow); the median
  and the mean over the points that forecast, and the mean's share of the training (the cost a run pays).
  The family rows give each column's median over the family's runs.

    python benchmarks/forecast_cost.py                    # the tuning split (~3 min)
    python benchmarks/forecast_cost.py --corpus held-out-3 --markdown

Needs scikit-learn (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from corpus import SCENARIOS, VALIDATIONS, lr_factor, make_model, make_optimizer, make_task
from eval_record import load_corpus
from eval_replay import dataset_snr

from snrmon.forecast import BasinForecaster


def interval_seconds(scenario, intervals: int = 3) -> float:
    """Median CPU seconds of ``val_every`` training steps of ``scenario`` (after one warm-up interval)."""
    torch.manual_seed(scenario.seed)
    task = make_task(scenario.data, scenario.n_train, scenario.flip, scenario.seed)
    model = make_model(scenario, task)
    optimizer = make_optimizer(scenario, model)
    generator = torch.Generator().manual_seed(scenario.seed)
    total = VALIDATIONS * scenario.val_every  # (the recorded run's length: its schedule)
    times, step = [], 0
    for _ in range(intervals + 1):
        began = time.process_time()
        for _ in range(scenario.val_every):
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = scenario.lr * lr_factor(scenario.schedule, step, total)
            x, y = task.train_batch(generator, scenario.batch)
            loss = task.losses(model, x, y).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # as a loop that logs its loss does
        times.append(time.process_time() - began)
    return statistics.median(times[1:])


def forecast_seconds(curve, signal: str, points: int) -> tuple[float, float]:
    """Median and mean CPU seconds of one forecast over the curve's first ``points`` points (the mean carries
    the law's occasional fresh searches, the median not)."""
    forecaster, times = BasinForecaster(), []
    snr = dataset_snr(curve)
    for i in range(min(points, len(curve.x))):
        began = time.process_time()
        if signal == "ratio":
            forecaster.update(curve.x[i], curve.val[i], curve.train[i], snr[i])
        else:
            forecaster.update(curve.x[i], curve.val[i])
        times.append(time.process_time() - began)
    # Before min_points a forecast is a few list appends: over the points that forecast.
    forecasting = times[forecaster.min_points - 1 :]
    return statistics.median(forecasting), statistics.fmean(forecasting)


def row_cells(name: str, family: str, training: float, ratio: tuple, law: tuple) -> list[str]:
    """A row: the training between two validations; per signal, the median and mean cost of a forecast and
    the mean's share of that training (the cost a run pays)."""
    return [
        name,
        family,
        f"{training * 1e3:.1f} ms",
        f"{ratio[0] * 1e3:.2f} / {ratio[1] * 1e3:.2f} ms",
        f"{ratio[1] / training:.1%}",
        f"{law[0] * 1e3:.0f} / {law[1] * 1e3:.0f} ms",
        f"{law[1] / training:.0%}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    splits = ["tuning", "held-out", "held-out-2", "held-out-3", "held-out-4"]
    parser.add_argument("--corpus", default="tuning", choices=splits)
    parser.add_argument("--law-points", type=int, default=30, help="points of the law's replay (default 30)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scenarios = {s.name: s for s in SCENARIOS}
    rows = []
    for curve in load_corpus(args.corpus):
        scenario = scenarios[curve.name]
        training = interval_seconds(scenario)
        ratio = forecast_seconds(curve, "ratio", len(curve.x))
        law = forecast_seconds(curve, "law", args.law_points)
        rows.append((curve.name, scenario.family, training, ratio, law))
    header = [
        "run",
        "family",
        "training between validations",
        "ratio forecast, median / mean",
        "share",
        "law, median / mean",
        "share",
    ]
    lines = [header] + [row_cells(*row) for row in rows]
    for family in dict.fromkeys(row[1] for row in rows):  # each column's median over the family's runs
        mine = [row for row in rows if row[1] == family]
        training = float(np.median([row[2] for row in mine]))
        ratio, law = (tuple(np.median([row[k] for row in mine], axis=0)) for k in (3, 4))
        lines.append(row_cells(f"**{family}** (medians of {len(mine)})", "", training, ratio, law))
    share_ratio = np.array([row[3][1] / row[2] for row in rows])
    share_law = np.array([row[4][1] / row[2] for row in rows])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for k, line in enumerate(lines):
        if args.markdown:
            print("| " + " | ".join(line) + " |")
            if k == 0:
                print("| " + " | ".join("---" for _ in header) + " |")
        else:
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    print(
        f"the mean forecast within 1% of the training between two validations: the ratio on "
        f"{np.mean(share_ratio <= 0.01):.0%} of {len(rows)} runs, the law on {np.mean(share_law <= 0.01):.0%}"
    )


if __name__ == "__main__":
    main()
