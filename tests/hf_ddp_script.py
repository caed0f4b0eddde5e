"""SNRMonitorCallback in a Hugging Face Trainer on 2 CPU ranks (gloo), launched by torch.distributed.run.

The least-squares problem of test_transformers.py at lr = 0 (its truth in closed form): each rank runs
``--accumulate`` microbatches of 16 per step, DDP averages the ranks; ``--weighting tokens`` makes the loss
token-weighted (num_items_in_batch summed over the ranks, the Trainer's default), with ragged microbatches.
Each rank writes ``rank<r>.json``: the monitor's last values, the truth and the Trainer's world size.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch
from test_ground_truth import DIM, least_squares_truth
from test_transformers import GaussianSamples, LeastSquares, TokenWeightedLeastSquares, training_arguments
from transformers import Trainer

from snrmon.callbacks.transformers import SNRMonitorCallback

BATCH, STEPS = 16, 200


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--weighting", choices=["mean", "tokens"], default="mean")
    options = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(4)  # the w*, Δ of test_least_squares_matches_closed_form
    w_star = torch.randn(DIM, generator=generator)
    delta = 0.4 * torch.randn(DIM, generator=generator)
    tokens = options.weighting == "tokens"
    model = (TokenWeightedLeastSquares if tokens else LeastSquares)(w_star + delta)
    world = int(os.environ["WORLD_SIZE"])
    data = GaussianSamples(w_star, STEPS * options.accumulate * BATCH * world, seed=2, masked=tokens)
    monitor = SNRMonitorCallback(ema_decay=0.99)
    args = training_arguments(
        options.out / "trainer",
        ddp_backend="gloo",
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=options.accumulate,
        max_steps=STEPS,
        learning_rate=0.0,
        logging_steps=STEPS,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    result = {
        "world_size": args.world_size,
        "latest": monitor.latest,
        "truth": least_squares_truth(delta),
        "weight_unchanged": bool(torch.equal(model.weight.detach(), w_star + delta)),
        "warnings": [str(w.message) for w in caught if "SNRMonitorCallback" in str(w.message)],
    }
    (options.out / f"rank{args.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
