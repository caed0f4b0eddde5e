"""Worker for tests/test_ddp.py: SNRMonitor under CPU DDP (gloo, 2 ranks) on analytic least squares.

Model: y_hat = x·w, loss = mean (x·w − y)² over the rank's batch, at lr = 0 so w stays fixed.
Data: fresh samples x ~ N(0, I_d), y = x·w* + ε with w* = 0 and ε ~ N(0, σ²); each rank draws from
its own stream seeded with ``seed + global_rank``. With Δ = w − w*, the per-sample gradient
g = 2(x·w − y)x has |G|² = 4|Δ|² and tr Σ = E|g|² − |G|² = 4((d + 1)|Δ|² + dσ²).

Lightning relaunches this file once per rank with the same arguments; every rank writes its
``monitor.latest`` to ``<out>/rank<global_rank>.json``, with the estimator's state and the SNRMonitor
warnings the rank emitted. ``--fail-rank1-from-step S`` makes rank 1's ``batch_size_fn`` raise from
optimizer step S on (a monitor failure on one rank only). ``--finite N`` trains on a fixed data set of N such
samples instead, shuffled (Lightning shards it with a ``DistributedSampler``), and writes the data set's exact
|G|² and S² (per-sample variance, N − 1 denominator) as ``truth``.

    python tests/ddp_script.py --out DIR [--accumulate K] [--steps N] [--fail-rank1-from-step S] ...
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from snrmon.callbacks import SNRMonitor


class GaussianLeastSquares(IterableDataset):
    """An endless stream of batches (x, y) with x ~ N(0, I_d), y = ε ~ N(0, σ²) (w* = 0)."""

    def __init__(self, dim: int, sigma: float, batch_size: int, seed: int):
        self.dim, self.sigma, self.batch_size, self.seed = dim, sigma, batch_size, seed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            x = torch.randn(self.batch_size, self.dim, generator=generator)
            y = self.sigma * torch.randn(self.batch_size, generator=generator)
            yield x, y


class LeastSquares(L.LightningModule):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.args = args
        # w = Δ (w* = 0), with |Δ|² = args.delta_sq spread evenly over the coordinates.
        self.weight = nn.Parameter(torch.full((args.dim,), math.sqrt(args.delta_sq / args.dim)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return ((x @ self.weight - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        args = self.args
        if args.finite:
            return DataLoader(finite_dataset(args), batch_size=args.batch_size, shuffle=True)
        data = GaussianLeastSquares(args.dim, args.sigma, args.batch_size, args.seed + self.global_rank)
        return DataLoader(data, batch_size=None)


def finite_dataset(args: argparse.Namespace) -> TensorDataset:
    """The same N samples on every rank (the DistributedSampler gives each rank its shard)."""
    x, y = next(iter(GaussianLeastSquares(args.dim, args.sigma, args.finite, args.seed)))
    return TensorDataset(x, y)


def finite_truth(weight: Tensor, dataset: TensorDataset) -> dict[str, float]:
    x, y = (t.double() for t in dataset.tensors)
    per_sample = 2 * (x @ weight.detach().double() - y)[:, None] * x
    mean = per_sample.mean(0)
    noise = (per_sample - mean).square().sum() / (len(x) - 1)
    return {"signal": float(mean.square().sum()), "noise": float(noise)}


def common_arguments(description: str, accumulate: int) -> argparse.ArgumentParser:
    """The arguments this script shares with tests/fsdp_script.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accumulate", type=int, default=accumulate)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank, per microbatch")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--delta-sq", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fail-rank1-from-step", type=int, default=None)
    return parser


def failing_batch_size_fn(args: argparse.Namespace, trainer: Callable[[], L.Trainer]) -> Callable | None:
    """With ``--fail-rank1-from-step S``, a batch_size_fn that raises on rank 1 from step S on; else None (the
    default, since a custom batch_size_fn turns the finite-set correction off)."""
    fail_from = args.fail_rank1_from_step
    if fail_from is None:
        return None

    def batch_size_fn(batch: tuple[Tensor, Tensor]) -> int:
        if trainer().global_rank == 1 and trainer().global_step >= fail_from:
            raise RuntimeError(f"rank 1 batch_size_fn failed at step {trainer().global_step}")
        return len(batch[0])

    return batch_size_fn


def main() -> None:
    parser = common_arguments(__doc__, accumulate=1)
    parser.add_argument("--finite", type=int, default=0, help="train on a fixed data set of N samples")
    args = parser.parse_args()

    torch.set_num_threads(1)
    trainer: L.Trainer | None = None
    monitor = SNRMonitor(ema_decay=args.ema_decay, batch_size_fn=failing_batch_size_fn(args, lambda: trainer))
    trainer = L.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        callbacks=[monitor],
        logger=False,
        log_every_n_steps=args.steps,  # the last step is a logging step
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = LeastSquares(args)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module)
    estimator = monitor._estimator
    result = {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "disabled": monitor._disabled,
        "latest": monitor.latest,
        "updates": float(estimator.updates),
        "skipped": float(estimator.skipped),
        "moments": estimator.moments.tolist(),
        "warnings": [str(w.message) for w in record if "SNRMonitor" in str(w.message)],
        "truth": finite_truth(module.weight, finite_dataset(args)) if args.finite else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
