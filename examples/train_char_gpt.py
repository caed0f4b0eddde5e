"""Demo: a small byte-level GPT overfits a small text of Python stdlib source, with snrmon's callbacks.

    .venv/bin/python examples/train_char_gpt.py            # ~2 min on 2 CPU cores
    .venv/bin/python examples/train_char_gpt.py --fast     # seconds; smoke test

``SNRMonitor`` measures the gradient signal and noise; ``BasinEarlyStopping`` forecasts where the validation
loss turns up (the text is small: the model soon learns it by heart, and the held-out loss rises), warns,
stops, and draws its forecast in TensorBoard; a ``ModelCheckpoint`` keeps the best weights.

At the end it prints a short report (also written to ``report.md`` in the run's log directory): where the
forecast warned and stopped, where the validation minimum and the best checkpoint are, and the commands that
open the run in TensorBoard, replay the basin forecast over it and fit a scaling law to its validation loss.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from char_gpt import CharDataModule, CharGPT  # noqa: E402
from snrmon.callbacks import BasinEarlyStopping, SNRMonitor  # noqa: E402

# The loss tags: under one folder "loss", which TensorBoard's Time Series tab sorts first and opens.
TRAIN, VAL = "loss/train", "loss/val"
# The demo's run (without --fast): 128 windows of 64 bytes from a 3.6 kB text, seen again every 2 steps at
# a high learning rate, so the model learns them by heart within the run and the held-out loss turns up
# (its minimum near step 180, checked on the 2-core VM; a validation every 10 steps, 64 windows, is cheap).
MAX_STEPS, VAL_EVERY, VAL_SAMPLES, CORPUS_BYTES, TRAIN_WINDOWS = 600, 10, 64, 4_000, 128
# SNRMonitor groups: by kind of layer (four groups), by block (depth 2: one per block, embedding and norm).
GROUPS = {
    "kind": {"embedding": r"_emb\.", "attention": r"\.attn\.", "mlp": r"\.mlp\.", "norm": r"ln"},
    "block": 2,
    "none": None,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = f"optimizer steps, at most ({MAX_STEPS}; 24 with --fast)"
    p.add_argument("--max-steps", type=int, default=None, help=steps)
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size")
    p.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--block-size", type=int, default=64, help="context length in bytes")
    p.add_argument(
        "--val-every",
        type=int,
        default=None,
        help=f"validate every N optimizer steps (default {VAL_EVERY}; 2 with --fast)",
    )
    corpus = "bytes of stdlib source to train on, the last 10%% held out"
    p.add_argument("--corpus-bytes", type=int, default=CORPUS_BYTES, help=corpus)
    p.add_argument("--train-windows", type=int, default=TRAIN_WINDOWS, help="training windows (a small set)")
    p.add_argument("--lr", type=float, default=8e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", choices=sorted(GROUPS), default="kind", help="SNRMonitor parameter groups")
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
        f"{tool('snrmon')} fit {shlex.quote(log_dir)} --law shannon-run --tag {VAL}"
        f" --tokens-per-step {tokens_per_step}"
    )


def forecast_command(log_dir: str) -> str:
    """The command that replays ``BasinEarlyStopping``'s forecast from the run's logs (the points it forecast
    from, logged with its forecasts)."""
    return f"{tool('snrmon')} forecast {shlex.quote(log_dir)} --tag {VAL}"


def replay_summary(log_dir: str, stopper: BasinEarlyStopping) -> str:
    """What ``snrmon forecast`` says of the run's logs, against what the callback said live."""
    from snrmon.cli import main as snrmon

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        status = snrmon(["forecast", log_dir, "--tag", VAL, "--json"])
    if status != 0:
        return f"- the replay of its logs failed (exit status {status}): run the command below to see why"
    replay = json.loads(out.getvalue())
    history = stopper.forecaster.history
    live_warning = next((f.x for f in history if f.warning or f.stop), None)
    live_stop = stopper.stopped_step or None
    same = replay["first_warning"] == live_warning and replay["stop"] == live_stop
    said = f"warning at step {_step(replay['first_warning'])}, stop at step {_step(replay['stop'])}"
    verdict = "the same as live" if same else "NOT the same as live"
    return f"- the replay of its logs (snrmon forecast, below): {said}: {verdict}"


def _step(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def basin_summary(stopper: BasinEarlyStopping, checkpoint: ModelCheckpoint, max_steps: int) -> list[str]:
    """Where the forecast warned and stopped, and where the validation minimum and the best weights are."""
    history = stopper.forecaster.history
    warned = next((f for f in history if f.warning or f.stop), None)
    points = stopper.forecaster.points
    lines = []
    if warned is not None:
        lines.append(f"- first warning: step {warned.x:.0f} ({warned.state})")
    else:
        lines.append("- no warning: the basin was never forecast within reach")
    if stopper.stopped_step:
        lines.append(f"- stopped: step {stopper.stopped_step}, {stopper.stopping_reason}")
    else:
        lines.append(f"- not stopped: trained all {max_steps} steps")
    if points.loss:
        best = min(range(len(points.loss)), key=points.loss.__getitem__)
        lines.append(f"- lowest {VAL}: {points.loss[best]:.4g} at step {points.x[best]:.0f}")
    if checkpoint.best_model_path:
        score = float(checkpoint.best_model_score)
        lines.append(f"- best checkpoint ({VAL} {score:.4g}): {checkpoint.best_model_path}")
    return lines


def build_report(
    metrics: dict[str, float],
    latest: dict[str, float],
    steps: int,
    seconds: float,
    log_dir: str,
    commands: dict[str, str],
    basin: list[str],
    figure: str | None = None,
) -> str:
    g = latest.get
    lines = [
        "# snrmon demo: char-GPT overfitting a small text of Python stdlib source",
        "",
        f"- optimizer steps: {steps} ({seconds:.0f} s, {seconds / max(steps, 1):.2f} s/step)",
        f"- final {TRAIN}: {fmt(metrics.get(TRAIN))}",
        f"- final {VAL}: {fmt(metrics.get(VAL))}",
        f"- noise scale B_simple = tr(Σ)/|G|²: {fmt(g('snr/noise_scale'))} ± {fmt(g('snr/noise_scale_se'))}",
        f"- SNR at the batch size: {fmt(g('snr/ratio'))}",
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
    lines += ["", "Basin early stopping:", "", *basin]
    lines += [
        "",
        "Open the run in TensorBoard, then http://localhost:6006/#custom_scalars for snrmon's charts (the",
        "forecast figure is in the Images tab, the warnings and the stop in the Text tab):",
        "",
        f"    {commands['tensorboard']}",
        "",
        "Replay what the basin forecast said during training (snrmon forecast --help):",
        "",
        f"    {commands['forecast']}",
        "",
        "Fit the single-run Shannon law to its validation loss (D in tokens; see docs/law.md):",
        "",
        f"    {commands['fit']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Train and report; returns the final metrics and monitor values, the printed "commands", and the
    callbacks ("stopper", "checkpoint")."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    # The basin's warnings are printed in the closing report (and kept in TensorBoard's Text tab).
    warnings.filterwarnings("ignore", "BasinEarlyStopping: .*")
    L.seed_everything(args.seed)

    if args.fast:
        model_kw = dict(n_layer=1, n_head=2, n_embd=32)
        args.block_size, args.batch_size = 32, 4
        max_steps, val_every = args.max_steps or 24, args.val_every or 2
        val_samples, log_every = 4 * args.batch_size, 1
    else:
        model_kw = {}
        max_steps, val_every = args.max_steps or MAX_STEPS, args.val_every or VAL_EVERY
        val_samples, log_every = VAL_SAMPLES, 5
    tokens_per_step = args.batch_size * args.accumulate * args.block_size

    batches_per_val = val_every * args.accumulate
    dm = CharDataModule(
        block_size=args.block_size,
        batch_size=args.batch_size,
        corpus_bytes=args.corpus_bytes,
        # --fast: fresh windows every step (a smoke run, too short to overfit)
        train_samples=max_steps * args.accumulate * args.batch_size if args.fast else args.train_windows,
        val_samples=val_samples,
        seed=args.seed,
    )
    model = CharGPT(block_size=args.block_size, lr=args.lr, **model_kw)
    monitor = SNRMonitor(groups=GROUPS[args.groups])
    # Forecasts where the validation loss turns up; warns, stops, and draws the forecast in TensorBoard.
    stopper = BasinEarlyStopping(monitor=VAL)
    # Stopping comes a little after the basin: the best weights are kept by a checkpoint.
    checkpoint = ModelCheckpoint(monitor=VAL, mode="min", save_top_k=1, filename="best-{step}")
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
        callbacks=[monitor, stopper, checkpoint],
        logger=logger,
        enable_progress_bar=not args.fast,
        enable_model_summary=False,
    )

    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    latest = dict(monitor.latest)
    if trainer.global_step % val_every != 0:  # last validation is stale: refresh it
        trainer.validate(model, datamodule=dm, verbose=False)
        metrics[VAL] = float(trainer.callback_metrics[VAL])
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
    basin = basin_summary(stopper, checkpoint, max_steps) + [replay_summary(log_dir, stopper)]
    report = build_report(metrics, latest, trainer.global_step, seconds, log_dir, commands, basin, figure)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    (Path(log_dir) / "report.md").write_text(report, encoding="utf-8")
    print("\n" + report)
    return {**metrics, **latest, "commands": commands, "stopper": stopper, "checkpoint": checkpoint}


if __name__ == "__main__":
    main()
