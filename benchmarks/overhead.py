"""What SNRMonitor costs per optimizer step on the example GPT, measured inside one fit, and where it goes.

Two models (``--preset``): ``named``, the model the overhead target is named for (4 layers, 128 wide,
``accumulate_grad_batches=4``, one thread, the demo script's microbatch of 8 x 64 bytes: a short step, where a
fixed cost weighs most), and ``demo``, the same GPT on 16 x 128-byte microbatches (the figures
docs/performance.md quoted before; a step about 4 times longer). ``--preset both`` (the default) runs one
after the other; ``--n-layer``, ``--n-embd``, ``--batch-size``, ``--block-size``, ``--accumulate`` and
``--threads`` override a preset. For each, fits of the example byte-level GPT with gradient accumulation:

1. *Ratio* (``--repeat`` fits): ``SNRMonitor(every_n_steps=2)`` measures every other step and installs nothing
   on the others, so the ratio of the median CPU time of measured to unmeasured steps is the monitor's cost,
   free of the drift between separate fits (several percent on a shared VM). Each fit gives one ratio; the
   spread over fits says how far to trust one.
2. *Breakdown*: an instrumented ``SNRMonitor(every_n_steps=2)`` that times each of its callback hooks, the
   tensor hooks' bodies (one norm kernel per parameter per microbatch), the parts of the step's close (the
   applied-gradient read, one fused norm; the estimator's update), attaching and detaching the hooks, and the
   logging (on logging steps only, reported per logging step); measured steps only, after the warm-up.
3. *Hook calls*: what autograd's call into a Python tensor hook costs outside its body (not in the
   breakdown's timers): backward passes to as many one-element leaves as the model has parameter tensors, with
   a do-nothing hook on each against none, interleaved.

The targets: bookkeeping + norm reads ≤ 1.5 × the norm reads, and a step-time ratio ≤ 1.015 on the named
model.

    python benchmarks/overhead.py                   # CPU, one thread, both presets: docs/performance.md
    python benchmarks/overhead.py --preset named --repeat 5
    python benchmarks/overhead.py --device cuda     # GPU (CPU times then measure the host side only)
    python benchmarks/overhead.py --fsdp            # the ratio under FSDP2 on 2 CPU processes (gloo)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from char_gpt import CharDataModule, CharGPT  # noqa: E402
from snrmon.callbacks import SNRMonitor  # noqa: E402
from snrmon.measure.estimator import GradientNoiseEstimator  # noqa: E402
from snrmon.measure.taps import GradientTaps  # noqa: E402
from snrmon.measure.trainable import TrainableParameters  # noqa: E402

# Per microbatch: the callback hooks Lightning calls around each backward, and the tensor hooks' bodies.
PER_MICROBATCH = ("on_train_batch_start", "on_before_backward", "on_after_backward", "tensor hooks")
# Per step: the callback hooks of the window's start and close, and what they spend their time on.
PER_STEP = ("on_before_zero_grad", "on_before_optimizer_step", "on_train_batch_end")
PARTS = {  # (class, method) -> the line it is reported on, inside the callback hook that calls it
    (TrainableParameters, "read"): "  trainable read",
    (GradientTaps, "attach"): "  attach hooks",
    (GradientTaps, "detach"): "  detach hooks",
    (GradientTaps, "add_backward_to_window"): "  window add",
    (GradientNoiseEstimator, "add_applied"): "  estimator add",
    (GradientTaps, "take_window"): "  window sums",
    (GradientTaps, "accumulated_sq_norms"): "  applied read",
    (GradientNoiseEstimator, "step"): "  estimator step",
}
PRESETS = {
    "named": dict(n_layer=4, n_embd=128, accumulate=4, threads=1, batch_size=8, block_size=64),
    "demo": dict(n_layer=4, n_embd=128, accumulate=4, threads=1, batch_size=16, block_size=128),
}


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


class Stopwatch(L.Callback):
    """Seconds spent in wrapped callables, by name, and how often each ran, on measured steps after the
    warm-up only (the timers run on every step; a step's figures are kept once it is known to count)."""

    def __init__(self, warmup: int, every_n_steps: int):
        self.warmup, self.every_n_steps = warmup, every_n_steps
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._step_seconds: dict[str, float] = defaultdict(float)
        self._step_calls: dict[str, int] = defaultdict(int)
        self.steps = 0  # counted steps
        self.logging_steps = 0  # steps that logged after the warm-up, measured or not
        self.logging = 0.0  # their logging's seconds
        self.unmeasured, self.unmeasured_steps = 0.0, 0  # the callback hooks' seconds on the other steps

    def wrap(self, name: str, function):
        # The thread's CPU time, not wall time, which on a shared machine also counts other processes' turns.
        # (On CPU, autograd runs the backward and its hooks on the calling thread.)
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self._step_seconds[name] += time.thread_time() - start
                self._step_calls[name] += 1

        return timed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # After the monitor's own on_train_batch_end (this callback is listed after it).
        if trainer.fit_loop._should_accumulate():
            return
        step = trainer.global_step - 1  # the step this window closed
        if step >= self.warmup and self._step_calls.get("logging"):  # (logging steps may be unmeasured ones)
            logging = self._step_seconds.pop("logging")
            self._step_seconds["on_train_batch_end"] -= logging  # (the logging runs inside it)
            self.logging += logging
            self.logging_steps += 1
        if step >= self.warmup and step % self.every_n_steps == 0:
            for name, seconds in self._step_seconds.items():
                self.seconds[name] += seconds
                self.calls[name] += self._step_calls[name]
            self.steps += 1
        elif step >= self.warmup:
            hooks = PER_MICROBATCH[:-1] + PER_STEP
            self.unmeasured += sum(self._step_seconds[name] for name in hooks)
            self.unmeasured_steps += 1
        self._step_seconds.clear()
        self._step_calls.clear()


@contextmanager
def instrumented(monitor: SNRMonitor, stopwatch: Stopwatch):
    """Time the monitor's callback hooks, its logging, every tensor hook its taps install, and the parts of
    :data:`PARTS`; the classes are restored on exit."""
    for name in PER_MICROBATCH[:-1] + PER_STEP:
        setattr(monitor, name, stopwatch.wrap(name, getattr(monitor, name)))
    monitor._log = stopwatch.wrap("logging", monitor._log)
    originals = {(GradientTaps, "_hook"): GradientTaps._hook}
    original_hook = GradientTaps._hook
    GradientTaps._hook = lambda taps, index: stopwatch.wrap("tensor hooks", original_hook(taps, index))
    for (cls, method), name in PARTS.items():
        if not hasattr(cls, method):  # (an older snrmon, for a comparison)
            continue
        originals[cls, method] = getattr(cls, method)
        setattr(cls, method, stopwatch.wrap(name, getattr(cls, method)))
    try:
        yield
    finally:
        for (cls, method), function in originals.items():
            setattr(cls, method, function)


class ShardedCharGPT(CharGPT):
    """The demo GPT with ``fully_shard`` applied to each block and to the whole (FSDP2)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)


def make_model(args, model_class=CharGPT) -> CharGPT:
    return model_class(n_layer=args.n_layer, n_embd=args.n_embd, block_size=args.block_size)


def make_data(args) -> CharDataModule:
    samples = args.batch_size * args.accumulate * (args.steps + 10)
    return CharDataModule(block_size=args.block_size, batch_size=args.batch_size, train_samples=samples)


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
    trainer.fit(make_model(args, model_class), datamodule=make_data(args))
    return timer


def step_ratio(args) -> tuple[float, float, float, int, int]:
    """One fit with ``every_n_steps=2``: (ratio, median unmeasured, median measured, counts of each)."""
    steps = fit(args, SNRMonitor(every_n_steps=2)).steps[args.warmup :]
    measured = [seconds for step, seconds in steps if step % 2 == 0]
    unmeasured = [seconds for step, seconds in steps if step % 2 == 1]
    base, with_monitor = statistics.median(unmeasured), statistics.median(measured)
    return with_monitor / base, base, with_monitor, len(measured), len(unmeasured)


def hook_call_cost(tensors: int, rounds: int = 200) -> float:
    """Seconds per microbatch that autograd spends calling a do-nothing Python hook on each of ``tensors``
    parameters, outside the hooks' bodies: backward passes to that many one-element leaves with and without
    such hooks (interleaved; the median difference). On one-element leaves the backward itself is tiny, so the
    difference is not lost in the noise of a shared machine, as it is on the model's own backward."""
    leaves = [torch.zeros(1, requires_grad=True) for _ in range(tensors)]

    def backward(hooked: bool) -> float:
        handles = [leaf.register_hook(lambda grad: None) for leaf in leaves] if hooked else []
        loss = torch.cat(leaves).sum()
        start = time.thread_time()
        loss.backward()
        seconds = time.thread_time() - start
        for handle in handles:
            handle.remove()
        return seconds

    for _ in range(10):
        backward(True), backward(False)
    return statistics.median(backward(True) - backward(False) for _ in range(rounds))


def run_preset(args) -> None:
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = make_model(args)
    parameters = sum(p.numel() for p in model.parameters())
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    threads = torch.get_num_threads()
    print(f"== preset {args.preset}: {parameters:,} parameters in {tensors} tensors, {args.n_layer} layers,"
          f" {args.n_embd} wide, microbatch {args.batch_size}x{args.block_size},"
          f" accumulate {args.accumulate}; {args.device} ({device_name}, {threads} threads),"
          f" precision {args.precision},"
          f" torch {torch.__version__}")  # fmt: skip

    # 1. measured against unmeasured steps of one fit, repeated
    results = [step_ratio(args) for _ in range(args.repeat)]
    if args.fsdp:  # (each rank gets here; one prints)
        if torch.distributed.get_rank() == 0:
            for ratio, base, with_monitor, n_measured, n_unmeasured in results:
                print(f"FSDP2, 2 processes, rank 0: {n_measured} measured, {n_unmeasured} unmeasured steps;"
                      f" median CPU unmeasured {base * 1e3:.1f} ms, measured {with_monitor * 1e3:.1f} ms;"
                      f" step-time ratio {ratio:.4f}")  # fmt: skip
        return
    for ratio, base, with_monitor, n_measured, n_unmeasured in results:
        print(f"fit               {n_measured} measured, {n_unmeasured} unmeasured steps (every_n_steps=2):"
              f" median CPU unmeasured {base * 1e3:.1f} ms, measured {with_monitor * 1e3:.1f} ms,"
              f" ratio {ratio:.4f}")  # fmt: skip
    ratios = sorted(result[0] for result in results)
    base = statistics.median(result[1] for result in results)
    print(f"step-time ratio   median {statistics.median(ratios):.4f} over {len(ratios)} fit(s),"
          f" range {ratios[0]:.4f}-{ratios[-1]:.4f} (target <= 1.015 on the named model)")  # fmt: skip
    if args.ratio_only:
        return

    # 2. where the time goes, on measured steps
    stopwatch = Stopwatch(args.warmup, every_n_steps=2)
    monitor = SNRMonitor(every_n_steps=2)
    with instrumented(monitor, stopwatch):
        fit(args, monitor, stopwatch)
    seconds, calls, n_steps = stopwatch.seconds, stopwatch.calls, max(stopwatch.steps, 1)
    n_micro = n_steps * args.accumulate
    logging = stopwatch.logging
    print(f"breakdown         {stopwatch.steps} measured steps ({n_micro} microbatches), after {args.warmup}"
          f" warm-up steps; µs per microbatch and per step")  # fmt: skip
    total = 0.0
    for name in (*PER_MICROBATCH, *PER_STEP):
        total += seconds[name]
        parts = [part for part in PARTS.values() if part in seconds and _inside(part, name)]
        per_micro = (
            f"{seconds[name] / n_micro * 1e6:9.1f} /microbatch" if name in PER_MICROBATCH else " " * 21
        )
        print(f"  {name:<26}{per_micro} {seconds[name] / n_steps * 1e6:9.1f} /step")
        for part in parts:
            print(f"  {part:<26}{'':9} {'':11} {seconds[part] / n_steps * 1e6:9.1f} /step"
                  f"  ({calls[part] / n_steps:.0f} calls)")  # fmt: skip
    hook_calls = hook_call_cost(tensors)
    per_micro, per_step = hook_calls * 1e6, hook_calls * args.accumulate * 1e6
    print(f"  {'autograd -> tensor hooks':<26}{per_micro:9.1f} /microbatch {per_step:9.1f}"
          f" /step  (outside the hooks' bodies: do-nothing hooks on 1-element leaves)")  # fmt: skip
    total += hook_calls * n_micro
    reads = (seconds["tensor hooks"] + seconds["  applied read"]) / n_steps
    per_log = logging / max(stopwatch.logging_steps, 1) * 1e3
    per_step, fraction = total / n_steps * 1e6, total / n_steps / base
    print(f"  {'total':<26}{'':9} {'':11} {per_step:9.1f} /step = {fraction:.2%} of the unmeasured step;"
          f" logging {per_log:.2f} ms per logging step")  # fmt: skip
    per_step = stopwatch.unmeasured / max(stopwatch.unmeasured_steps, 1) * 1e6
    print(f"  {'on unmeasured steps':<26}{'':9} {'':11} {per_step:9.1f}"
          f" /step (the callback hooks; detaching the hooks is here)")  # fmt: skip
    bookkeeping = total / n_steps - hook_calls * args.accumulate - reads
    print(f"hot path / reads  {(reads + bookkeeping) / reads:.3f} (norm reads {reads * 1e3:.3f} ms/step,"
          f" the rest {bookkeeping * 1e3:.3f} ms/step, autograd's calls aside; target <= 1.5)")  # fmt: skip


def _inside(part: str, hook: str) -> bool:
    """Which callback hook calls a part (for the breakdown's indentation)."""
    where = {
        "on_before_zero_grad": ("  trainable read", "  attach hooks", "  detach hooks"),
        "on_after_backward": ("  window add",),
        "on_before_optimizer_step": (
            "  estimator add",
            "  window sums",
            "  applied read",
            "  estimator step",
        ),
    }
    return part in where.get(hook, ())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*PRESETS, "both"], default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (1)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped at the start of each fit")
    parser.add_argument("--repeat", type=int, default=1, help="fits measuring the step-time ratio")
    parser.add_argument("--accumulate", type=int)
    parser.add_argument("--batch-size", type=int, help="microbatch size")
    parser.add_argument("--block-size", type=int, help="bytes per sample")
    parser.add_argument("--n-layer", type=int)
    parser.add_argument("--n-embd", type=int)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 on 2 processes: the step-time ratio only")
    parser.add_argument("--ratio-only", action="store_true", help="the fits' ratios, no breakdown")
    args = parser.parse_args()
    for preset in PRESETS if args.preset == "both" else [args.preset]:
        options = argparse.Namespace(**vars(args))
        options.preset = preset
        for key, value in PRESETS[preset].items():  # a preset fills what was not given
            if getattr(options, key) is None:
                setattr(options, key, value)
        run_preset(options)


if __name__ == "__main__":
    main()
