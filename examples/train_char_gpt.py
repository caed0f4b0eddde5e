"""Demo: train a small byte-level GPT on the Python stdlib sources with SNRMonitor attached.

    .venv/bin/python examples/train_char_gpt.py            # ~2-3 min on 2 CPU cores
    .venv/bin/python examples/train_char_gpt.py --fast     # seconds; smoke test

At the end it prints a short report (also written to ``report.md`` in the run's log
directory) and the command to open the run in TensorBoard.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from char_gpt import CharDataModule, CharGPT
from snrmon.callbacks import SNRMonitor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 200; 6 with --fast)")
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch size")
    p.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--block-size", type=int, default=128, help="context length in bytes")
    p.add_argument(
        "--val-every",
        type=int,
        default=50,
        help="validate every N optimizer steps (one 'epoch' of the dataset)",
    )
    p.add_argument("--corpus-bytes", type=int, default=2_000_000, help="bytes of stdlib source to train on")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", type=int, default=2, help="SNRMonitor parameter-group prefix depth")
    p.add_argument("--out", default="runs", help="TensorBoard log root directory")
    p.add_argument("--fast", action="store_true", help="tiny model and a few steps: a smoke run for tests")
    return p.parse_args(argv)


def fmt(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def tensorboard_command(log_dir: str) -> str:
    """The command that opens ``log_dir`` with this interpreter's TensorBoard."""
    tb = Path(sys.executable).parent / "tensorboard"
    if tb.exists():
        try:
            tb_str = os.path.relpath(tb)
        except ValueError:  # different drive (Windows)
            tb_str = str(tb)
        if tb_str.startswith(".."):
            tb_str = str(tb)
    else:
        tb_str = "tensorboard"
    return f"{tb_str} --logdir {log_dir}"


def build_report(
    metrics: dict[str, float], latest: dict[str, float], steps: int, seconds: float, log_dir: str
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
        f"- TensorBoard: `{tensorboard_command(log_dir)}`",
    ]
    groups = sorted(
        k[len("snr/") : -len("/noise_scale")]
        for k in latest
        if k.endswith("/noise_scale") and k.count("/") >= 2
    )
    if groups:
        lines += ["", "| group | noise scale | SNR |", "| --- | --- | --- |"]
        for grp in groups:
            lines.append(f"| {grp} | {fmt(g(f'snr/{grp}/noise_scale'))} | {fmt(g(f'snr/{grp}/ratio'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    L.seed_everything(args.seed)

    if args.fast:
        model_kw = dict(n_layer=1, n_head=2, n_embd=32)
        args.block_size, args.batch_size, args.val_every = 32, 4, 3
        args.corpus_bytes = min(args.corpus_bytes, 200_000)
        max_steps = args.max_steps or 6
        val_samples, log_every = 4 * args.batch_size, 1
    else:
        model_kw = {}
        max_steps = args.max_steps or 200
        val_samples, log_every = 512, 5

    batches_per_epoch = args.val_every * args.accumulate
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
    logger = TensorBoardLogger(args.out, name="char_gpt")
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=args.accumulate,
        log_every_n_steps=log_every,
        val_check_interval=batches_per_epoch,
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
    if trainer.global_step % args.val_every != 0:  # last validation is stale: refresh it
        trainer.validate(model, datamodule=dm, verbose=False)
        metrics["val/loss"] = float(trainer.callback_metrics["val/loss"])
    seconds = time.perf_counter() - t0

    report = build_report(metrics, latest, trainer.global_step, seconds, logger.log_dir)
    Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
    (Path(logger.log_dir) / "report.md").write_text(report, encoding="utf-8")
    try:
        from plot_run import plot_run

        figure = plot_run(logger.log_dir, Path(logger.log_dir) / "snr_curves.png")
        report += f"- curves: {figure}\n"
        (Path(logger.log_dir) / "report.md").write_text(report, encoding="utf-8")
    except ImportError:  # matplotlib is optional (the `plot` extra)
        pass
    print("\n" + report)
    return {**metrics, **latest}


if __name__ == "__main__":
    main()
