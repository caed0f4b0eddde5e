"""Worker for tests/test_fsdp.py: SNRMonitor under FSDP2 (``fully_shard``) through Lightning's
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` on CPU (gloo, 2 ranks).

Model: least squares y_hat = x·w at lr = 0, with w = (a, b) split over two linear layers; ``fully_shard`` is
applied to ``a`` and to the root, which then holds ``b`` (a root keeps its parameters unsharded between
forward and backward). The weights have one row: rank 1's shards are empty. Data: fresh samples x ~ N(0, I_d),
y = ε ~ N(0, σ²) (w* = 0), each rank its own stream. With Δ = w, the per-sample gradient g = 2(x·w − y)x has,
over the coordinates of a block of d_a of them (Isserlis),

    |G_a|² = 4|Δ_a|²,    tr Σ_a = 4(d_a|Δ|² + |Δ_a|² + d_a σ²).

Besides the monitor's values each rank writes, for the first measured steps, the squared norm its hooks read
for each microbatch next to a reference computed on an unsharded copy of w, and the applied gradient's squared
norm (the shards' squared norms summed over ranks) next to the norm of the mean of the ranks' gradients.

``--fail-rank1-from-step S`` makes rank 1's ``batch_size_fn`` raise from optimizer step S on.
``--checkpoint-dir D`` saves a (distributed) checkpoint at the last step; ``--resume PATH`` resumes from one.

    python tests/fsdp_script.py --out DIR [--accumulate K] [--steps N] [--bf16] [--fail-rank1-from-step S]
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from ddp_script import GaussianLeastSquares, common_arguments, failing_batch_size_fn
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader

from snrmon.callbacks import SNRMonitor
from snrmon.measure.taps import GradientTaps

HOOK_CALLS = [0]
_original_hook = GradientTaps._hook


def _counted_hook(taps: GradientTaps, index: int):
    record = _original_hook(taps, index)

    def counted(grad: Tensor) -> None:
        HOOK_CALLS[0] += 1
        record(grad)

    return counted


GradientTaps._hook = _counted_hook


class LinearPair(nn.Module):
    """x·w with w = (a, b): two linear layers on the two halves of x."""

    def __init__(self, half: int):
        super().__init__()
        self.a = nn.Linear(half, 1, bias=False)
        self.b = nn.Linear(half, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        half = self.a.in_features
        return (self.a(x[:, :half]) + self.b(x[:, half:])).squeeze(-1)


class ShardedLeastSquares(L.LightningModule):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.args = args
        half = args.dim // 2
        self.net = LinearPair(half)
        with torch.no_grad():  # w = Δ, with |Δ_a|² = 2|Δ_b|², |Δ|² = args.delta_sq
            self.net.a.weight.fill_(math.sqrt(args.delta_sq * 2 / 3 / half))
            self.net.b.weight.fill_(math.sqrt(args.delta_sq / 3 / half))
        self.full_weight = torch.cat([self.net.a.weight, self.net.b.weight], 1).detach().clone().squeeze(0)

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.args.bf16 else None)
        fully_shard(self.net.a, mesh=mesh, mp_policy=policy)
        fully_shard(self.net, mesh=mesh, mp_policy=policy)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return ((self(x).float() - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        args = self.args
        data = GaussianLeastSquares(args.dim, args.sigma, args.batch_size, args.seed + self.global_rank)
        return DataLoader(data, batch_size=None)


class Reference(L.Callback):
    """Squared norms of each microbatch's local gradient and of the applied gradient, computed on an
    unsharded copy of w, next to what the monitor's taps read (first ``steps`` steps)."""

    def __init__(self, monitor: SNRMonitor, steps: int):
        self.monitor, self.steps = monitor, steps
        self.small: list[tuple[list[float], list[float]]] = []
        self.applied: list[tuple[list[float], list[float]]] = []
        self._window: Tensor | None = None

    def _reference_gradient(self, trainer: L.Trainer, pl_module: ShardedLeastSquares, batch) -> Tensor:
        x, y = batch
        w = pl_module.full_weight.clone().requires_grad_(True)
        loss = ((x @ w - y) ** 2).mean() / trainer.accumulate_grad_batches
        return torch.autograd.grad(loss, w)[0]

    def _per_group(self, gradient: Tensor, half: int) -> list[float]:
        return [float(gradient[:half].square().sum()), float(gradient[half:].square().sum())]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = batch

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step >= self.steps:
            return
        half = pl_module.args.dim // 2
        reference = self._reference_gradient(trainer, pl_module, self._batch)
        self._window = reference if self._window is None else self._window + reference
        taps = self.monitor._taps
        read = (taps.norms.double() ** 2).tolist()  # parameters in name order: net.a.weight, net.b.weight
        self.small.append((read, self._per_group(reference, half)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step >= self.steps:
            return
        half = pl_module.args.dim // 2
        local = self.monitor._taps.accumulated_sq_norms()[1:]  # groups: total, net.a, net.b
        dist.all_reduce(local)
        gathered = [torch.zeros_like(self._window) for _ in range(trainer.world_size)]
        dist.all_gather(gathered, self._window)
        mean = torch.stack(gathered).mean(0)
        self.applied.append((local.tolist(), self._per_group(mean, half)))
        self._window = None


def main() -> None:
    parser = common_arguments(__doc__, accumulate=2)
    parser.add_argument("--bf16", action="store_true", help="unsharded parameters in bfloat16")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--resume", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(1)
    trainer: L.Trainer | None = None
    batch_size_fn = failing_batch_size_fn(args, lambda: trainer)
    monitor = SNRMonitor(ema_decay=args.ema_decay, groups=2, batch_size_fn=batch_size_fn)
    reference = Reference(monitor, steps=3)
    callbacks: list[L.Callback] = [monitor, reference]
    if args.checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, every_n_train_steps=args.steps))
    trainer = L.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        devices=2,
        accelerator="cpu",
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        callbacks=callbacks,
        logger=False,
        log_every_n_steps=args.steps,  # the last step is a logging step
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=args.checkpoint_dir is not None,
    )
    module = ShardedLeastSquares(args)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, ckpt_path=args.resume)
    estimator = monitor._estimator
    result = {
        "global_rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "disabled": monitor._disabled,
        "latest": monitor.latest,
        "updates": float(estimator.updates),
        "skipped": float(estimator.skipped),
        "hook_calls": HOOK_CALLS[0],
        "small": reference.small,
        "applied": reference.applied,
        "warnings": [str(w.message) for w in record if "SNRMonitor" in str(w.message)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
