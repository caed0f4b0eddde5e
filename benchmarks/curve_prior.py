"""A learned prior over U-shaped curves (issue 13's lead): does a model trained only on synthetic curves tell
the moments to warn from the others on real runs better than rules fitted to the tuning runs?

Synthetic runs (``synthetic_run``) are drawn from a broad family with the mechanism of the Shannon law's basin
(theory §2): a generalising descent of the monitored loss, and memorisation that lowers the training loss
and, with a strength drawn independently, raises the monitored one (none, late or strong); the training loss
above or below the monitored one (dropout, label noise); noise of every size on each; constant, warmup +
cosine-to-10% and step schedules, where the curves follow the summed learning rate and a floor that falls with
the rate. Each is recorded for 240 validations, labelled by the same rule as the real corpus
(eval_record.label) and cut to the same 60-validation window. A small network (``CurvePrior``) reads the
curve up to a point, scale-free, and gives P(the minimum lies within [now, 2·now]): a warning now would be
in time.

The score is the AUC of "warn now" against "do not" on every validation from the 16th on, exactly the points
and labels of ``forecast_variants.py --separability``, on the three real splits. Nothing here is fitted to a
real curve: the generator's ranges were set by looking at the tuning split's plots only.

    python benchmarks/curve_prior.py            # ~3 min: generate, train, score
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
from eval_record import CorpusCurve, corpus_window, label, load_corpus
from forecast_variants import auc, labelled_points

N_VALIDATIONS, WINDOW, FIRST = 240, 60, 16
HISTORY = 16  # points read from the recent curve, and from the whole history resampled in log x


def _schedule(rng: np.random.Generator, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The learning rate (relative to its peak) at each step: constant, warmup + cosine to 10%, or steps;
    and the rate that sets SGD's noise floor (the warmup's low rates come before any floor is reached)."""
    end = steps[-1]
    kind = rng.choice(["constant", "cosine", "step"], p=[0.5, 0.3, 0.2])
    if kind == "constant":
        return np.ones_like(steps), np.ones_like(steps)
    if kind == "cosine":
        warmup = end * rng.uniform(0.0, 0.05)
        cosine = 0.1 + 0.45 * (1 + np.cos(np.pi * np.clip((steps - warmup) / (end - warmup), 0, 1)))
        return np.where(steps < warmup, steps / max(warmup, 1e-9), cosine), cosine
    edges = np.sort(rng.uniform(0.3, 0.9, size=rng.integers(1, 3))) * end
    rate = 0.1 ** np.searchsorted(edges, steps)
    return rate, rate


def synthetic_run(rng: np.random.Generator) -> dict:
    """One synthetic run of ``N_VALIDATIONS`` validations: x, the monitored and the training loss."""
    every = float(rng.choice([1, 5, 10, 20, 50]))
    x = every * np.arange(1, N_VALIDATIONS + 1)
    steps = np.arange(1, x[-1] + 1)
    lr, floor_rate = _schedule(rng, steps)
    time_ = np.cumsum(lr)[x.astype(int) - 1] / every  # summed rate, in validations at the peak rate
    rate = floor_rate[x.astype(int) - 1]

    descent_at = math.exp(rng.uniform(math.log(0.3), math.log(60)))  # in validations
    descent = 1 / (1 + (time_ / descent_at) ** rng.uniform(0.5, 3.0))
    memorise_at = descent_at * math.exp(rng.uniform(math.log(2.0), math.log(300)))
    sharp = rng.uniform(0.5, 3.0)
    memorised = (time_ / memorise_at) ** sharp / (1 + (time_ / memorise_at) ** sharp)

    drop = math.exp(rng.uniform(math.log(0.05), math.log(3.0)))
    floor = drop * math.exp(rng.uniform(math.log(0.03), math.log(3.0)))
    harm = 0.0 if rng.random() < 0.2 else drop * math.exp(rng.uniform(math.log(0.02), math.log(3.0)))
    annealed = drop * rng.uniform(0, 0.3) * rate  # a floor that falls with the rate (SGD's noise)
    val = floor + drop * descent + harm * memorised + annealed

    # The training loss: the same descent, scaled (dropout and noise lift it), minus what memorisation wins.
    train_floor = floor * rng.uniform(0.3, 1.3)
    train_drop = drop * rng.uniform(0.6, 1.4)
    won = train_floor * rng.uniform(0.0, 1.0)
    train = train_floor + train_drop * descent - won * memorised + annealed * rng.uniform(0.5, 1.5)

    val_noise = drop * math.exp(rng.uniform(math.log(1e-4), math.log(3e-2)))
    train_noise = math.exp(rng.uniform(math.log(1e-3), math.log(0.3)))
    ar = rng.uniform(0, 0.8)  # the same validation set read each time: correlated noise
    shocks = rng.normal(size=N_VALIDATIONS)
    correlated = np.empty(N_VALIDATIONS)
    correlated[0] = shocks[0]
    for i in range(1, N_VALIDATIONS):
        correlated[i] = ar * correlated[i - 1] + math.sqrt(1 - ar**2) * shocks[i]
    val = val + val_noise * correlated
    train = np.maximum(train, 1e-3) * np.exp(train_noise * rng.normal(size=N_VALIDATIONS))
    return {"x": x, "val": np.maximum(val, 1e-4), "train": train}


def synthetic_curves(count: int, seed: int) -> list[CorpusCurve]:
    """``count`` synthetic runs labelled and cut as the real corpus is."""
    rng = np.random.default_rng(seed)
    curves = []
    for i in range(count):
        run = synthetic_run(rng)
        entry = {
            "name": f"synthetic/{i}",
            "split": "synthetic",
            "family": "",
            "schedule": "",
            "replay_validations": WINDOW,
            "min_index": int(np.argmin(run["val"])),
            **{k: list(map(float, v)) for k, v in run.items()},
            **{
                k: [0.0] * N_VALIDATIONS
                for k in ("lr_sum", "grad_dot", "grad_dot_se", "step_dot", "step_dot_se", "val_se")
            },
        }
        entry["kind"] = label(CorpusCurve(name="", kind="", x=run["x"], val=run["val"], train=run["train"]))
        curves.append(corpus_window(entry))
    return curves


def encode(x: np.ndarray, val: np.ndarray, train: np.ndarray) -> np.ndarray:
    """The curve up to its last point, scale-free: the recent points and the whole history resampled in
    log x, both curves centred on the monitored loss now and scaled by its range so far; the training loss
    over the monitored one; the point-to-point noise over the range."""
    from snrmon.forecast.curve import train_at_points

    train = train_at_points(x, train)
    centre = float(np.mean(val[-3:]))
    scale = float(val.max() - val.min()) or 1e-12
    u = np.log(x)
    grid = np.linspace(u[0], u[-1], HISTORY)
    parts = [
        (val[-HISTORY:] - centre) / scale,
        (train[-HISTORY:] - centre) / scale,
        (np.interp(grid, u, val) - centre) / scale,
        (np.interp(grid, u, train) - centre) / scale,
        np.log(np.maximum(train[-HISTORY:], 1e-6) / np.maximum(val[-HISTORY:], 1e-6)),
        [math.log(float(np.median(np.abs(np.diff(val[-HISTORY:])))) / scale + 1e-9)],
        [math.log(float(np.median(np.abs(np.diff(train[-HISTORY:])))) / scale + 1e-9)],
        [(u[-1] - u[-HISTORY]), float(np.argmin(val) - len(val) + 1) / HISTORY],
    ]
    return np.clip(np.concatenate([np.asarray(p, dtype=float) for p in parts]), -20, 20)


def encoded_points(curves, target: str = "warn") -> tuple[np.ndarray, np.ndarray]:
    """The encoding and label of each scored validation. ``warn``: the points and labels of
    forecast_variants.labelled_points (1: a warning now is in time). ``stop``: every point from the 16th
    on, 1 once the minimum is behind (a stop now keeps it)."""
    rows, labels = [], []
    for curve in curves:
        if curve.kind == "U" and not curve.target:
            continue
        x, val, train = (np.asarray(s, dtype=float) for s in (curve.x, curve.val, curve.train))
        for i in range(FIRST, len(x)):
            if target == "warn" and curve.kind == "U" and i > curve.min_index:
                break
            rows.append(encode(x[: i + 1], val[: i + 1], train[: i + 1]))
            if target == "warn":
                labels.append(int(curve.kind == "U" and x[i] >= x[curve.min_index] / 2))
            else:
                labels.append(int(curve.kind == "U" and i > curve.min_index))
    return np.array(rows), np.array(labels)


class CurvePrior(torch.nn.Module):
    def __init__(self, inputs: int, width: int = 64) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(inputs, width),
            torch.nn.GELU(),
            torch.nn.Linear(width, width),
            torch.nn.GELU(),
            torch.nn.Linear(width, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def train_prior(features: np.ndarray, labels: np.ndarray, epochs: int, seed: int, width: int) -> CurvePrior:
    torch.manual_seed(seed)
    model = CurvePrior(features.shape[1], width)
    inputs, targets = torch.tensor(features, dtype=torch.float32), torch.tensor(labels, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    weight = torch.tensor((1 - labels.mean()) / max(labels.mean(), 1e-9))
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs)).split(512):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(inputs[batch]), targets[batch], pos_weight=weight
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--target", choices=("warn", "stop"), default="warn")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    synthetic = synthetic_curves(args.runs, args.seed)
    kinds = [c.kind for c in synthetic]
    print(
        f"{len(synthetic)} synthetic runs: {kinds.count('U')} U in the window "
        f"({sum(c.target for c in synthetic)} targets), {kinds.count('improving')} improving there"
    )
    features, labels = encoded_points(synthetic, args.target)
    print(f"{len(labels)} points, {labels.mean():.1%} 'warn now'; {time.perf_counter() - start:.0f} s")
    model = train_prior(features, labels, args.epochs, args.seed, args.width)
    validation = synthetic_curves(500, args.seed + 1)
    print(f"trained, {time.perf_counter() - start:.0f} s")
    rows = [("synthetic (new draws)", *encoded_points(validation, args.target))]
    for split in ("tuning", "held-out", "held-out-2"):
        rows.append((split, *encoded_points(load_corpus(split), args.target)))
    print(f"{'AUC of the curve prior':28s}" + "".join(f"{name:>24s}" for name, *_ in rows))
    with torch.no_grad():
        scores = [auc(model(torch.tensor(f, dtype=torch.float32)).numpy(), y) for _, f, y in rows]
    print(f"{'':28s}" + "".join(f"{s:24.2f}" for s in scores))
    since_best = [auc(-f[:, -1], y) for _, f, y in rows]  # validations since the best, for comparison
    print(f"{'validations since the best':28s}" + "".join(f"{s:24.2f}" for s in since_best))
    print(f"{'points (warn now / all)':28s}" + "".join(f"{f'{y.sum()} / {len(y)}':>24s}" for _, _, y in rows))
    # The same points as forecast_variants.labelled_points, checked.
    if args.target == "warn":
        assert len(labelled_points(load_corpus("tuning"))[1]) == len(rows[1][2])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
