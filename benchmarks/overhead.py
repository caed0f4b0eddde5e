"""What SNRMonitor costs per optimizer step on the demo GPT, measured inside one fit.

Two fits of the example byte-level GPT with gradient accumulation:

1. *Ratio*: ``SNRMonitor(every_n_steps=2)`` measures every other step and installs nothing on the others, so
   the ratio of the median CPU time of measured to unmeasured steps is the monitor's cost, free of the drift
   between separate fits (several percent on a shared VM).
2. *Breakdown*: an instrumented ``SNRMonitor()`` that times, per step, its norm reads (the tensor hooks, one
   norm kernel per parameter per microbatch, and the one fused norm of the applied gradient: each gradient
   read once), the rest of its callback hooks (the bookkeeping), and its logging (on logging steps only,
   reported per logging step).

The target of the hot path is bookkeeping + norm reads ≤ 1.5 × the norm reads.

    python benchmarks/overhead.py                # CPU, one thread: the figures in docs/performance.md
    python benchmarks/overhead.py --device cuda  # GPU (CPU times then measure the host side only)
    python benchmarks/overhead.py --fsdp         # the ratio under FSDP2 on 2 CPU processes (gloo)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from char_gpt import CharDataModule, CharGPT  # noqa: E402
from snrmon.callbacks import SNRMonitor  # noqa: E402
from snrmon.measure.taps import GradientTaps  # noqa: E402

CALLBACK_HOOKS = (
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_zero_grad",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
)


class StepTimer(L.Callback):
    """CPU time of each optimizer step (all its microbatches and the optimizer step), device work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[tuple[int, float]] = []  # (global step, seconds)
        self._last: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop._should_accumulate():
            return
        now = self._now()
        if self._last is not None:
            self.steps.append((trainer.global_step - 1, now - self._last))
        self._last = now


class Stopwatch:
    """Seconds spent in wrapped callables, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


class ResetAfterWarmup(L.Callback):
    def __init__(self, stopwatch: Stopwatch, warmup: int):
        self.stopwatch, self.warmup = stopwatch, warmup

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup and not trainer.fit_loop._should_accumulate():
            self.stopwatch.seconds.clear()


def instrument(monitor: SNRMonitor, stopwatch: Stopwatch) -> None:
    """Time the monitor's callback hooks, its logging, every tensor hook its taps install, and the read of
    the applied gradient."""
    for name in CALLBACK_HOOKS:
        setattr(monitor, name, stopwatch.wrap("hooks", getattr(monitor, name)))
    monitor._log = stopwatch.wrap("logging", monitor._log)
    original = GradientTaps._hook
    GradientTaps._hook = lambda taps, index: stopwatch.wrap("tensor hooks", original(taps, index))
    GradientTaps.accumulated_sq_norms = stopwatch.wrap("applied read", GradientTaps.accumulated_sq_norms)


class ShardedCharGPT(CharGPT):
    """The demo GPT with ``fully_shard`` applied to each block and to the whole (FSDP2)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)


def fit(args, monitor: SNRMonitor, *extra: L.Callback) -> StepTimer:
    device = torch.device(args.device)
    timer = StepTimer(device)
    strategy, devices, model_class = "auto", 1, CharGPT
    if args.fsdp:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        devices, model_class = 2, ShardedCharGPT
    trainer = L.Trainer(
        accelerator=device.type,
        devices=devices,
        strategy=strategy,
        precision=args.precision,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        limit_val_batches=0,
        log_every_n_steps=args.log_every,
        logger=False,
        callbacks=[timer, monitor, *extra],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    L.seed_everything(0, verbose=False)
    model = model_class(n_layer=args.n_layer, n_embd=args.n_embd)
    data = CharDataModule(batch_size=args.batch_size, train_samples=args.batch_size * args.accumulate * 400)
    trainer.fit(model, datamodule=data)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped at the start of each fit")
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 on 2 processes: the step-time ratio only")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    # 1. measured against unmeasured steps of one fit
    timer = fit(args, SNRMonitor(every_n_steps=2))
    steps = timer.steps[args.warmup :]
    measured = [seconds for step, seconds in steps if step % 2 == 0]
    unmeasured = [seconds for step, seconds in steps if step % 2 == 1]
    base, with_monitor = statistics.median(unmeasured), statistics.median(measured)
    if args.fsdp:  # (each rank gets here; one prints)
        if torch.distributed.get_rank() == 0:
            print(f"FSDP2, 2 processes, rank 0: {len(measured)} measured, {len(unmeasured)} unmeasured steps;"
                  f" median CPU unmeasured {base * 1e3:.1f} ms, measured {with_monitor * 1e3:.1f} ms;"
                  f" step-time ratio {with_monitor / base:.4f}")  # fmt: skip
        return

    # 2. where the time goes
    stopwatch = Stopwatch()
    monitor = SNRMonitor()
    instrument(monitor, stopwatch)
    fit(args, monitor, ResetAfterWarmup(stopwatch, args.warmup))
    n_steps = args.steps - args.warmup
    n_logs = sum(1 for step in range(args.warmup, args.steps) if (step + 1) % args.log_every == 0)
    seconds = stopwatch.seconds
    reads = (seconds["tensor hooks"] + seconds["applied read"]) / n_steps
    logging = seconds["logging"]
    bookkeeping = (seconds["hooks"] - seconds["applied read"] - logging) / n_steps

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    parameters = sum(p.numel() for p in CharGPT(n_layer=args.n_layer, n_embd=args.n_embd).parameters())
    print(f"device            {args.device} ({device_name}, {torch.get_num_threads()} threads),"
          f" precision {args.precision}, torch {torch.__version__}")  # fmt: skip
    print(f"model             {parameters:,} parameters, {args.n_layer} layers,"
          f" microbatch {args.batch_size}x128, accumulate {args.accumulate}")  # fmt: skip
    print(f"steps             {len(measured)} measured, {len(unmeasured)} unmeasured (every_n_steps=2)")
    print(f"median step       unmeasured {base * 1e3:.1f} ms, measured {with_monitor * 1e3:.1f} ms CPU")
    print(f"step-time ratio   {with_monitor / base:.4f}")
    hooks, applied = (seconds[key] / n_steps * 1e3 for key in ("tensor hooks", "applied read"))
    print(f"norm reads        {reads * 1e3:.3f} ms/step (tensor hooks {hooks:.3f}, applied {applied:.3f})")
    print(f"bookkeeping       {bookkeeping * 1e3:.3f} ms/step (callback hooks, logging excluded)")
    print(f"logging           {logging / max(n_logs, 1) * 1e3:.3f} ms per logging step")
    print(f"hot path / reads  {(reads + bookkeeping) / reads:.3f} (target <= 1.5)")


if __name__ == "__main__":
    main()
