"""Worker for tests/test_basin_early_stopping.py: BasinEarlyStopping under CPU DDP (gloo, 2 ranks).

The overfitting regression of the test module (a 128-unit MLP on 64 noisy samples, validated on 512):
Lightning shards the training set, so each rank sees its own 32 samples and its own training loss, and the
ranks' forecasts can differ; the validation loss is averaged across ranks (``sync_dist``). Every rank
writes its final global step, the callback's ``stopped_step`` and its decisions to
``<out>/rank<global_rank>.json``.

    python tests/basin_ddp_script.py --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from test_basin_early_stopping import Regressor
from test_basin_early_stopping import _data as data
from torch.utils.data import DataLoader

from snrmon.callbacks import BasinEarlyStopping


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-epochs", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    callback = BasinEarlyStopping(monitor="val_loss")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=args.max_epochs,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    train = DataLoader(data(64, 0), batch_size=16, shuffle=True)
    trainer.fit(Regressor(), train, DataLoader(data(512, 1), batch_size=256))
    result = {
        "global_rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "stopped_step": callback.stopped_step,
        "stops": [f.stop for f in callback.forecaster.history],
        "val": callback.forecaster.points.loss,
        "train": callback.forecaster.points.train,
    }
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
