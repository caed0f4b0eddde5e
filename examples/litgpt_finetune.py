"""LitGPT's full fine-tuning loop in Lightning Fabric, with snrmon's gradient signal and noise measurement.

The loop is that of ``litgpt/finetune/full.py``: a ``CycleIterator`` over Fabric's data loader, K
microbatches a step (the first K − 1 under ``fabric.no_backward_sync``), each loss divided by K,
``fabric.clip_gradients``, AdamW. ``snrmon.callbacks.fabric_meter`` adds two calls: ``after_backward`` after
each ``fabric.backward``, ``before_step`` before the clipping. Nothing is downloaded: the model is a tiny
Pythia-shaped LitGPT ``GPT`` from ``litgpt.Config`` with random weights, the text a few thousand characters of
sums ("17+25=42") made here, tokenized by characters.

    .venv/bin/pip install -c constraints.txt litgpt
    .venv/bin/python examples/litgpt_finetune.py              # one CPU device, ~10 s
    .venv/bin/python examples/litgpt_finetune.py --devices 2  # DDP on 2 CPU processes (gloo)

Every ``--log-interval`` steps rank 0 prints the loss, the noise scale B_noise = tr Σ / |G|² (in sequences:
the batch size beyond which larger batches stop paying off), the SNR of the step's batch and the noise scale
per group of parameters. The data set is a fixed set of windows that the shuffled (under DDP: sharded) loader
draws without replacement, so the meter is told its size and reports the training set's values.
"""

from __future__ import annotations

import argparse
import random

import lightning as L
import torch
from litgpt import Config
from litgpt.model import GPT
from litgpt.utils import CycleIterator, chunked_cross_entropy
from torch.utils.data import DataLoader, Dataset

from snrmon.callbacks import fabric_meter

VOCAB = "0123456789+=\n"
GROUPS = {"embeddings": r"wte|lm_head", "attention": r"\.attn\.", "mlp": r"\.mlp\."}


def sums_text(lines: int, seed: int) -> str:
    """``a+b=c`` lines with a, b < 100: the model can learn the digits of c from a and b."""
    rng = random.Random(seed)
    pairs = ((rng.randrange(100), rng.randrange(100)) for _ in range(lines))
    return "".join(f"{a}+{b}={a + b}\n" for a, b in pairs)


class Windows(Dataset):
    """``count`` windows of ``length + 1`` tokens at fixed random offsets: (input, next-token targets)."""

    def __init__(self, tokens: torch.Tensor, length: int, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.tokens, self.length = tokens, length
        self.starts = torch.randint(len(tokens) - length - 1, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[self.starts[index] : self.starts[index] + self.length + 1]
        return window[:-1], window[1:]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1, help="CPU processes; more than 1 runs DDP")
    parser.add_argument("--precision", default="32-true", help="Fabric precision (bf16-mixed on the CPU)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--global-batch-size", type=int, default=32, help="sequences per step, all ranks")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per microbatch")
    parser.add_argument("--block-size", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=512, help="windows in the training set")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ema-decay", type=float, default=0.95, help="the meter's smoothing")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune; return the meter's last values, the logged training losses, the model and the training set
    (on every rank)."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead on a shared CPU
    fabric = L.Fabric(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        precision=args.precision,
    )
    fabric.launch()
    fabric.seed_everything(args.seed)

    tokens = torch.tensor([VOCAB.index(c) for c in sums_text(2000, args.seed)])
    train_set = Windows(tokens, args.block_size, args.sequences, args.seed)
    config = Config.from_name(
        "pythia-14m",
        n_layer=2,
        n_head=4,
        n_embd=64,
        block_size=args.block_size,
        vocab_size=len(VOCAB),
        padded_vocab_size=16,
    )
    with fabric.init_module():
        model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer = fabric.setup(model, optimizer)
    loader = DataLoader(train_set, batch_size=args.micro_batch_size, shuffle=True, drop_last=True)
    loader = fabric.setup_dataloaders(loader)  # a DistributedSampler under DDP: disjoint shards
    accumulate = args.global_batch_size // (args.micro_batch_size * fabric.world_size)  # LitGPT's arithmetic

    losses = []
    meter = fabric_meter(fabric, model, groups=GROUPS, dataset_size=len(train_set), ema_decay=args.ema_decay)
    with meter:
        batches = CycleIterator(loader)
        iteration = step = 0
        while step < args.steps:
            iteration += 1
            input_ids, targets = next(batches)
            is_accumulating = iteration % accumulate != 0
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                loss = chunked_cross_entropy(model(input_ids), targets)  # a mean over the microbatch
                fabric.backward(loss / accumulate)
            meter.after_backward(batch_size=len(input_ids))  # sequences, as dataset_size counts them
            if is_accumulating:
                continue
            meter.before_step()  # the applied gradient: before clipping changes it
            fabric.clip_gradients(model, optimizer, max_norm=1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == 1 or step % args.log_interval == 0:
                losses.append(fabric.all_reduce(loss.detach(), reduce_op="mean").item())
                values = meter.compute()
                per_group = "  ".join(f"{group} {values[f'{group}/noise_scale']:.0f}" for group in GROUPS)
                fabric.print(
                    f"step {step:3d}  loss {losses[-1]:.3f}  noise scale {values['noise_scale']:6.0f}"
                    f" ± {values['noise_scale_se']:.0f}  SNR {values['ratio']:.3f}  ({per_group})"
                )
        values = meter.compute()
    return {"values": values, "losses": losses, "model": model.module, "train_set": train_set}


if __name__ == "__main__":
    main()
