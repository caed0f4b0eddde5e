"""Demo: train a small byte-level GPT on the Python stdlib sources with SNRMonitor attached.

    .venv/bin/python examples/train_char_gpt.py            # ~2 min on 2 CPU cores
    .venv/bin/python examples/train_char_gpt.py --fast     # seconds; smoke test

(`make demo` from a clean clone on the 2-core VM, 200 steps of 8,192 tokens and 20 validations: 1 min 40 s
wall on a quiet machine, after 46 s for the first .venv build; 2 min 50 s and 3 min 10 s wall while other
jobs kept both cores busy.)

At the end it prints a short report (also written to ``report.md`` in the run's log directory) and the
commands that open the run in TensorBoard, fit a scaling law to its validation loss and replay the basin
forecast over it.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. With other processes busy on the same 2 cores, spinning
# threads made a step of this demo 7 times slower (12.3 s against 1.8 s). Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from char_gpt import CharDataModule, CharGPT  # noqa: E402
from snrmon.callbacks import SNRMonitor  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (200; 24 with --fast)")
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch size")
    p.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--block-size", type=int, default=128, help="context length in bytes")
    p.add_argument(
        "--val-every",
        type=int,
        default=None,
        help="validate every N optimizer steps (default 10; 2 with --fast): enough points for `snrmon fit`",
    )
    p.add_argument("--corpus-bytes", type=int, default=2_000_000, help="bytes of stdlib source to train on")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", type=int, default=2, help="SNRMonitor parameter-group prefix depth")
    p.add_argument("--out", default="runs", help="TensorBoard log root directory")
    p.add_argument("--fast", action="store_true", help="tiny model and a few steps: a smoke run for tests")
    return p.parse_args(argv)


class DemoLogger(TensorBoardLogger):
    """TensorBoard logs without Lightning's ``epoch`` scalar: this run is one epoch, so that chart would be a
    flat line at 0, and the first one TensorBoard's Scalars tab shows."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


def fmt(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def tool(name: str) -> str:
    """How to call the command ``name`` installed beside this interpreter (e.g. ``.venv/bin/tensorboard``)."""
    path = Path(os.path.abspath(sys.executable)).parent / name  # abspath, not resolve: keep the venv
    if not path.exists():
        return name
    try:
        relative = os.path.relpath(path)
    except ValueError:  # different drive (Windows)
        return str(path)
    return str(path) if relative.startswith("..") else relative


def tensorboard_command(root: str) -> str:
    """The command that opens the runs under ``root``; each run is named by its path below it."""
    return f"{tool('tensorboard')} --logdir {shlex.quote(root)}"


def fit_command(log_dir: str, tokens_per_step: int) -> str:
    """The command that fits the single-run Shannon law to the run's validation loss (D in tokens)."""
    return (
        f"{tool('snrmon')} fit {shlex.quote(log_dir)} --law shannon-run --tag val/loss"
        f" --tokens-per-step {tokens_per_step}"
    )


def forecast_command(log_dir: str) -> str:
    """The command that replays ``BasinEarlyStopping``'s forecast over the validation (and training) loss."""
    return f"{tool('snrmon')} forecast {shlex.quote(log_dir)} --tag val/loss --train-metric train/loss"


def build_report(
    metrics: dict[str, float],
    latest: dict[str, float],
    steps: int,
    seconds: float,
    log_dir: str,
    commands: dict[str, str],
    figure: str | None = None,
) -> str:
    g = latest.get
    lines = [
        "# snrmon demo: char-GPT on Python stdlib sources",
        "",
        f"- optimizer steps: {steps} ({seconds:.0f} s, {seconds / max(steps, 1):.2f} s/step)",
        f"- final train/loss: {fmt(metrics.get('train/loss'))}",
        f"- final val/loss: {fmt(metrics.get('val/loss'))}",
        f"- noise scale B_simple = tr(Σ)/|G|²: {fmt(g('snr/noise_scale'))} ± {fmt(g('snr/noise_scale_se'))}",
        f"- SNR (B/B_simple): {fmt(g('snr/ratio'))}",
        f"- signal |G|²: {fmt(g('snr/signal'))}",
        f"- noise tr(Σ): {fmt(g('snr/noise'))}",
        f"- log directory: {log_dir}",
    ]
    if figure:
        lines.append(f"- curves: {figure}")
    groups = sorted(
        k[len("snr/") : -len("/noise_scale")]
        for k in latest
        if k.endswith("/noise_scale") and k.count("/") >= 2
    )
    if groups:
        lines += ["", "| group | noise scale | SNR |", "| --- | --- | --- |"]
        for grp in groups:
            lines.append(f"| {grp} | {fmt(g(f'snr/{grp}/noise_scale'))} | {fmt(g(f'snr/{grp}/ratio'))} |")
    lines += [
        "",
        "Open the run in TensorBoard (then http://localhost:6006/#custom_scalars for the SNR charts):",
        "",
        f"    {commands['tensorboard']}",
        "",
        "Fit the single-run Shannon law to its validation loss (D in tokens; see docs/law.md):",
        "",
        f"    {commands['fit']}",
        "",
        "Replay what the basin forecast would have said during training (snrmon forecast --help):",
        "",
        f"    {commands['forecast']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Train and report; returns the final metrics and monitor values, and the printed "commands"."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    L.seed_everything(args.seed)

    if args.fast:
        model_kw = dict(n_layer=1, n_head=2, n_embd=32)
        args.block_size, args.batch_size = 32, 4
        args.corpus_bytes = min(args.corpus_bytes, 200_000)
        max_steps, val_every = args.max_steps or 24, args.val_every or 2
        val_samples, log_every = 4 * args.batch_size, 1
    else:
        model_kw = {}
        max_steps, val_every = args.max_steps or 200, args.val_every or 10
        # A fixed, small validation set: 20 validations cost about as much as 8 training steps.
        val_samples, log_every = 256, 5
    tokens_per_step = args.batch_size * args.accumulate * args.block_size

    batches_per_val = val_every * args.accumulate
    dm = CharDataModule(
        block_size=args.block_size,
        batch_size=args.batch_size,
        corpus_bytes=args.corpus_bytes,
        train_samples=max_steps * args.accumulate * args.batch_size,  # fresh windows every step
        val_samples=val_samples,
        seed=args.seed,
    )
    model = CharGPT(block_size=args.block_size, lr=args.lr, **model_kw)
    monitor = SNRMonitor(groups=args.groups)
    # No dummy hp_metric chart: it would be the first thing TensorBoard shows, at -1.
    logger = DemoLogger(args.out, name="char_gpt", default_hp_metric=False)
    # Where `snrmon fit` reads the model size (hparams.yaml, key n_params); tokens_per_step is for the record.
    n_params = sum(p.numel() for p in model.parameters())  # the tied embedding counts once
    logger.log_hyperparams({"n_params": n_params, "tokens_per_step": tokens_per_step})
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=args.accumulate,
        log_every_n_steps=log_every,
        val_check_interval=batches_per_val,
        check_val_every_n_epoch=None,
        callbacks=[monitor],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
    )

    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    latest = dict(monitor.latest)
    if trainer.global_step % val_every != 0:  # last validation is stale: refresh it
        trainer.validate(model, datamodule=dm, verbose=False)
        metrics["val/loss"] = float(trainer.callback_metrics["val/loss"])
    seconds = time.perf_counter() - t0

    log_dir = logger.log_dir
    try:
        from plot_run import plot_run

        figure = str(plot_run(log_dir, Path(log_dir) / "snr_curves.png"))
    except ImportError:  # matplotlib is optional (the `plot` extra)
        figure = None
    commands = {
        "tensorboard": tensorboard_command(args.out),
        "fit": fit_command(log_dir, tokens_per_step),
        "forecast": forecast_command(log_dir),
    }
    report = build_report(metrics, latest, trainer.global_step, seconds, log_dir, commands, figure)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    (Path(log_dir) / "report.md").write_text(report, encoding="utf-8")
    print("\n" + report)
    return {**metrics, **latest, "commands": commands}


if __name__ == "__main__":
    main()
