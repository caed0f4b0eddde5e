"""The training set's SNR live (issue 13): does the SNRMonitor's ``dataset_snr`` give the forecaster the same
evidence as the corpus's whole-set statistics?

The corpus (corpus.py) reads N|G|²/tr Σ over the whole training set, in eval mode, at every validation. Live,
the monitor estimates it from each step's microbatches (train mode) and smooths it with an EMA. This trains
tabular scenarios of the corpus's tuning split under Lightning (the same data, model, optimizer and
schedule; two microbatches of 16 a step, shuffled epochs instead of draws with replacement) with an
``SNRMonitor`` and a ``BasinEarlyStopping`` that never stops (``min_points`` out of reach: it only records
what it was fed), for 240 validations. Then it replays each run's own curve through the forecaster with and
without the fed SNR, and scores the warnings against the run's own minimum (window: the first 60), as the
corpus does.

    python benchmarks/live_snr.py [--ema 0.95] [--only NAME]   # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import math
import os
import warnings

import lightning as L
import numpy as np
import torch
from corpus import SCENARIOS, lr_factor, make_model, make_optimizer, make_task
from eval_record import TARGET_MIN_INDEX, label
from torch.utils.data import DataLoader, TensorDataset

from snrmon.callbacks import BasinEarlyStopping, SNRMonitor
from snrmon.forecast import BasinForecaster

VALIDATIONS, WINDOW, MICROBATCH = 240, 60, 16
CHOSEN = (
    "digits-linear-small", "digits-mlp-small", "digits-mlp-noise30", "digits-mlp-large-step",
    "digits-mlp-dropout-wd", "inpaint-mlp-small", "cancer-linear", "cancer-mlp-small", "cancer-mlp-slow-wd",
)  # fmt: skip


class Scenario(L.LightningModule):
    def __init__(self, s, task, total_steps: int) -> None:
        super().__init__()
        self.s, self.task, self.total = s, task, total_steps
        self.model = make_model(s, task)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.task.losses(self.model, x, y).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.task.losses(self.model, x, y).mean())

    def configure_optimizers(self):
        optimizer = make_optimizer(self.s, self.model)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(self.s.schedule, step + 1, self.total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def live_run(s, ema: float) -> dict:
    """Train ``s`` under Lightning; the points the callback forecast from and the SNR it was fed."""
    torch.manual_seed(s.seed)
    task = make_task(s.data, s.n_train, s.flip, s.seed)
    total = VALIDATIONS * s.val_every
    train = TensorDataset(*(torch.cat(part) for part in zip(*task.train_chunks, strict=True)))
    val = TensorDataset(*(torch.cat(part) for part in zip(*task.val_chunks, strict=True)))
    recorder = BasinEarlyStopping(monitor="val_loss", min_points=10**9)
    fed = []

    class Record(L.Callback):  # after the recorder: what it was fed at this check
        def on_validation_end(self, trainer, pl_module):
            if recorder.forecaster.points.x and recorder.forecaster.points.x[-1] == trainer.global_step:
                fed.append(recorder.watch.fed_dataset_snr)

    trainer = L.Trainer(
        max_steps=total, accumulate_grad_batches=2, val_check_interval=2 * s.val_every,
        check_val_every_n_epoch=None, callbacks=[SNRMonitor(ema_decay=ema), recorder, Record()],
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, log_every_n_steps=s.val_every,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(
            Scenario(s, task, total),
            DataLoader(train, batch_size=MICROBATCH, shuffle=True),
            DataLoader(val, batch_size=len(val)),
        )
    points = recorder.forecaster.points
    return {"x": points.x, "val": points.loss, "train": points.train, "snr": fed}


def judged(x, val, train, snr) -> dict:
    """The run's verdict over its first WINDOW validations (by its whole curve) and where the forecaster,
    with and without the fed SNR, first warns and stops."""
    whole = np.asarray(val)
    minimum = int(np.argmin(whole))
    kind = label(type("C", (), {"val": whole})())
    kind = "U" if kind == "U" and minimum < WINDOW else "improving"
    out = {"kind": kind, "min": minimum}
    n = min(WINDOW, len(x))
    for name, fed in (("alone", None), ("with the SNR", snr[:n])):
        history = BasinForecaster().replay(x[:n], val[:n], train[:n], fed)
        out[name] = tuple(
            next((i for i, f in enumerate(history) if getattr(f, decision)), None)
            for decision in ("warning", "stop")
        )
    values = [v for v in snr[:n] if v is not None and v >= 0]
    out["gate"] = next((i for i in range(1, n) if _low(snr[i]) and _low(_previous(snr, i))), None)
    out["lowest snr"] = min(values) if values else math.nan
    return out


def _low(value) -> bool:
    return value is not None and 0 <= value <= 1


def _previous(snr, i):
    """The measurement before index i (None: no measurement at a check)."""
    return next((v for v in reversed(snr[:i]) if v is not None and v == v and v >= 0), None)


def in_time(first: int | None, minimum: int) -> bool:
    return first is not None and first <= minimum and first >= minimum / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ema", type=float, default=0.95, help="the SNRMonitor's ema_decay")
    parser.add_argument("--only", default="", help="only the scenarios whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for s in SCENARIOS:
        if s.split != "tuning" or s.name not in CHOSEN or args.only not in s.name:
            continue
        run = live_run(s, args.ema)
        result = judged(run["x"], run["val"], run["train"], run["snr"])
        rows.append((s.name, result))
        print(f"{s.name:24s} {result['kind']:9s} min {result['min']:3d}  gate {result['gate']}  "
              f"alone {result['alone']}  with the SNR {result['with the SNR']}  "
              f"lowest SNR {result['lowest snr']:.3g}", flush=True)  # fmt: skip
    targets = [r for _, r in rows if r["kind"] == "U" and r["min"] >= TARGET_MIN_INDEX]
    improving = [r for _, r in rows if r["kind"] == "improving"]
    for name in ("alone", "with the SNR"):
        timely = sum(in_time(r[name][0], r["min"]) for r in targets)
        false = sum(r[name][0] is not None for r in improving)
        print(f"{name:13s} in time {timely} of {len(targets)} target U-runs; warnings on {false} of "
              f"{len(improving)} improving")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
