"""Step-time and memory overhead of SNRMonitor on the demo GPT, against a baseline in the same process.

Trains the example byte-level GPT with gradient accumulation, alternating fits without and with the monitor
(same initial weights, same data), and prints the median step time of each, their ratio, and the monitor's
extra peak memory (measured on CUDA; on CPU, the monitor's own tensors are counted).

    python benchmarks/overhead.py                # CPU, the figures in docs/performance.md
    python benchmarks/overhead.py --device cuda  # GPU
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from char_gpt import CharDataModule, CharGPT  # noqa: E402
from snrmon.callbacks import SNRMonitor  # noqa: E402


class StepTimer(L.Callback):
    """Wall time of each optimizer step (all its microbatches), device work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self._last: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop._should_accumulate():
            return
        now = self._now()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def fit(args, model: CharGPT, data: CharDataModule, monitor: SNRMonitor | None) -> tuple[list[float], int]:
    device = torch.device(args.device)
    timer = StepTimer(device)
    callbacks = [timer] + ([monitor] if monitor else [])
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        limit_val_batches=0,
        log_every_n_steps=args.log_every,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(model, datamodule=data)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return timer.times[args.warmup :], peak


def monitor_bytes(monitor: SNRMonitor) -> int:
    """Bytes of the tensors the monitor keeps (its whole persistent memory)."""
    taps, estimator = monitor._taps, monitor._estimator
    tensors = [taps.norms, taps.membership, estimator.moments, estimator._step_stats]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each fit")
    parser.add_argument("--reps", type=int, default=6, help="baseline/monitor pairs")
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--groups", type=int, default=None, help="SNRMonitor groups depth")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(torch.get_num_threads())

    L.seed_everything(0, verbose=False)
    data = CharDataModule(batch_size=args.batch_size, train_samples=args.batch_size * args.accumulate * 400)
    initial = CharGPT(n_layer=args.n_layer, n_embd=args.n_embd)
    gradient_bytes = sum(p.numel() * p.element_size() for p in initial.parameters())

    baseline_times: list[float] = []
    monitor_times: list[float] = []
    pair_ratios: list[float] = []
    peaks = {"baseline": 0, "monitor": 0}
    for rep in range(args.reps):
        monitor = SNRMonitor(groups=args.groups)
        if rep % 2 == 0:  # alternate which run goes first, so that drift does not favour either
            base, base_peak = fit(args, copy.deepcopy(initial), data, None)
            mon, mon_peak = fit(args, copy.deepcopy(initial), data, monitor)
        else:
            mon, mon_peak = fit(args, copy.deepcopy(initial), data, monitor)
            base, base_peak = fit(args, copy.deepcopy(initial), data, None)
        baseline_times += base
        monitor_times += mon
        pair_ratios.append(statistics.median(mon) / statistics.median(base))
        peaks["baseline"] = max(peaks["baseline"], base_peak)
        peaks["monitor"] = max(peaks["monitor"], mon_peak)
        print(
            f"rep {rep}: baseline {statistics.median(base) * 1e3:.1f} ms/step, "
            f"monitor {statistics.median(mon) * 1e3:.1f} ms/step, ratio {pair_ratios[-1]:.4f}"
        )

    base_median = statistics.median(baseline_times)
    mon_median = statistics.median(monitor_times)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print()
    print(
        f"device            {args.device} ({device_name}, "
        f"{torch.get_num_threads()} threads), precision {args.precision}, torch {torch.__version__}"
    )
    print(
        f"model             {sum(p.numel() for p in initial.parameters()):,} parameters, "
        f"{args.n_layer} layers, microbatch {args.batch_size}x128, accumulate {args.accumulate}"
    )
    print(f"steps measured    {len(baseline_times)} baseline, {len(monitor_times)} monitor")
    print(f"median step       baseline {base_median * 1e3:.1f} ms, monitor {mon_median * 1e3:.1f} ms")
    print(
        f"step-time ratio   {mon_median / base_median:.4f} (pooled), "
        f"{statistics.median(pair_ratios):.4f} (median of pairs)"
    )
    if args.device.startswith("cuda"):
        extra = peaks["monitor"] - peaks["baseline"]
        print(f"extra peak memory {extra:,} bytes = {100 * extra / gradient_bytes:.3f}% of the gradient size")
    print(
        f"monitor state     {monitor_bytes(monitor):,} bytes = "
        f"{100 * monitor_bytes(monitor) / gradient_bytes:.3f}% of the gradient ({gradient_bytes:,} bytes)"
    )


if __name__ == "__main__":
    main()
