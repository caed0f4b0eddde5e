"""What a perturbation probe costs per validation, against the plain validation it rides on.

A small character-level transformer (2 layers, d = 128, 4 heads, sequences of 64, batches of 32, ~0.4 M
parameters) trains on random tokens for a few epochs with a validation of ``--val-batches`` batches after
each. Timed inside ``Trainer.fit``: the plain validation (its first batch to its last) and the probe's work at
the end of it (perturb, forward passes, restore). Prints the median ratio probe / plain validation over the
validations, per probe configuration, and the same ratio predicted by counting forward passes.

    python benchmarks/probe_cost.py [--threads 1] [--val-batches 16] [--epochs 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snrmon.callbacks import GaussianNoiseProbe, PerturbationProbe, QuantizationProbe

VOCAB, SEQ, BATCH = 64, 64, 32


class CharTransformer(L.LightningModule):
    def __init__(self, d: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.zeros(SEQ, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ - 1))

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens[:, :-1]) + self.pos[: SEQ - 1]
        logits = self.head(self.body(h, mask=self.mask, is_causal=True))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        return self._loss(batch[0])

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch[0])
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Timer(Callback):
    """Plain validation time (start of validation to just before the probe) and the probe's own time."""

    def __init__(self, probe: PerturbationProbe | None) -> None:
        self.probe, self.plain, self.probed = probe, [], []
        if probe is not None:  # time the probe's hook from inside, so only its own work is counted
            hook = probe.on_validation_epoch_end

            def timed(trainer, pl_module):
                start = time.perf_counter()
                hook(trainer, pl_module)
                self.probed.append(time.perf_counter() - start)

            probe.on_validation_epoch_end = timed

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._last = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.plain.append(self._last - self._start)


def measure(probe: PerturbationProbe | None, val_batches: int, epochs: int) -> tuple[float, float]:
    torch.manual_seed(0)
    tokens = torch.randint(VOCAB, (BATCH * 8, SEQ))
    val = torch.randint(VOCAB, (BATCH * val_batches, SEQ))
    timer = Timer(probe)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[timer] + ([probe] if probe is not None else []),  # the timer's hooks run first
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        CharTransformer(),
        DataLoader(TensorDataset(tokens), batch_size=BATCH, shuffle=True),
        DataLoader(TensorDataset(val), batch_size=BATCH),
    )
    plain = statistics.median(timer.plain[1:])  # the first validation warms up
    return plain, statistics.median(timer.probed[1:]) if timer.probed else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = [
        (
            "gaussian 10 dB, 4 draws x 4 batches",
            lambda: GaussianNoiseProbe(snr_db=10, draws=4, num_batches=4),
        ),
        ("gaussian 10 dB, 1 draw x 4 batches", lambda: GaussianNoiseProbe(snr_db=10, draws=1, num_batches=4)),
        ("int4, 4 batches", lambda: QuantizationProbe(bits=4, num_batches=4)),
    ]
    print(f"validation: {args.val_batches} batches of {BATCH} x {SEQ} tokens; {args.threads} thread(s)")
    print(f"{'probe':40} {'plain val (s)':>14} {'probe (s)':>10} {'ratio':>7} {'passes ratio':>13}")
    for name, make in configs:
        probe = make()
        plain, probed = measure(probe, args.val_batches, args.epochs)
        passes = probe.perturbation.draws * probe.num_batches / args.val_batches
        print(f"{name:40} {plain:14.4f} {probed:10.4f} {probed / plain:7.3f} {passes:13.3f}")


if __name__ == "__main__":
    main()
