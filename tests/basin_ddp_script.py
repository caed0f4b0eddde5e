"""Worker for tests/test_basin_early_stopping.py: BasinEarlyStopping under CPU DDP (gloo, 2 ranks).

The overfitting regression of the test module (a 128-unit MLP on 64 noisy samples, validated on 512):
Lightning shards the training set, so each rank sees its own 32 samples and its own training loss, and the
ranks' forecasts can differ; the validation loss is averaged across ranks (``sync_dist``). Every rank
writes its final global step, the callback's ``stopped_step``, ``stopping_reason`` and its decisions to
``<out>/rank<global_rank>.json``.

``--per-rank``: the callback checks every step a metric each rank logs for itself (no sync): on rank 0 a
curve that falls, then turns up (its basin at step 70), on rank 1 a value that repeats on consecutive steps;
rank 1's forecaster never forecasts (``min_points`` out of reach), so only rank 0 can decide to stop.

    python tests/basin_ddp_script.py --out DIR [--per-rank]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from test_basin_early_stopping import Regressor
from test_basin_early_stopping import _data as data
from torch.utils.data import DataLoader

from snrmon.callbacks import BasinEarlyStopping, SNRMonitor


class PerRank(Regressor):
    """Logs ``rank_metric``, a different curve on each rank (not synced)."""

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step + 1  # the step the callback sees after this batch
        if self.global_rank == 0:
            value = 1.0 + 10.0 / step + 0.002 * step  # falls, then turns up: its minimum at step 70
        else:
            value = 2.0 + 0.01 * (step // 2)  # the same value at two consecutive steps
        self.log("rank_metric", value)
        return super().training_step(batch, batch_idx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--per-rank", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.per_rank:
        rank = int(os.environ.get("LOCAL_RANK", 0))  # (Lightning sets it when it relaunches for rank 1)
        callback = BasinEarlyStopping(
            monitor="rank_metric", check_every_n_steps=1, min_points=10 if rank == 0 else 10**9
        )
        model = PerRank()
    else:
        callback = BasinEarlyStopping(monitor="val_loss")
        model = Regressor()
    # With an SNRMonitor (two ranks: two batch sizes a step), read at each check though it logs every
    # 1000 steps only: its estimate is brought up to date on every rank alike.
    monitors = [] if args.per_rank else [SNRMonitor()]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=args.max_epochs,
        callbacks=[*monitors, callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1 if args.per_rank else 1000,
    )
    train = DataLoader(data(64, 0), batch_size=16, shuffle=True)
    trainer.fit(model, train, DataLoader(data(512, 1), batch_size=256))
    result = {
        "global_rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "stopped_step": callback.stopped_step,
        "stopping_reason": callback.stopping_reason,
        "x": callback.forecaster.points.x,
        "stops": [f.stop for f in callback.forecaster.history],
        "val": callback.forecaster.points.loss,
        "train": callback.forecaster.points.train,
        "snr_streak": callback.forecaster.snr_streak,
        "fed_snr": callback.watch.fed_dataset_snr,
        "monitor_steps": monitors[0].latest_steps if monitors else None,
    }
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
