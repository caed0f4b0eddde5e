"""GradientMeter on 2 gloo ranks under DDP, against one process running the same microbatches.

Each step draws 4 microbatches; rank r runs microbatches 2r and 2r + 1 (K = 2 per rank, DDP averages the
ranks), the reference runs all 4 on one process (K = 4). The applied gradient and the small gradients are the
same, so the values must agree. Writes ``reference.json`` and ``rank<r>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from snrmon import GradientMeter

STEPS, MICRO, SIZE, LR = 6, 4, 8, 0.1


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))


def microbatches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [
        (torch.randn(SIZE, 5, generator=generator), torch.randn(SIZE, 1, generator=generator))
        for _ in range(MICRO)
    ]


def train(net: nn.Module, meter: GradientMeter, mine: list[int]) -> dict[str, float]:
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(STEPS):
        batches = microbatches(step)
        for index in mine:
            x, y = batches[index]
            (nn.functional.mse_loss(net(x), y) / len(mine)).backward()
            meter.after_backward(batch_size=len(x))
        meter.before_step()
        optimizer.step()
        optimizer.zero_grad()
    return meter.compute()


def rank_main(rank: int, out: Path, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = model()
        with GradientMeter(net) as meter:  # on the module's own parameters: DDP shares them
            values = train(DistributedDataParallel(net), meter, [2 * rank, 2 * rank + 1])
        (out / f"rank{rank}.json").write_text(json.dumps(values))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--port", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with GradientMeter(reference := model()) as meter:
        (args.out / "reference.json").write_text(json.dumps(train(reference, meter, list(range(MICRO)))))
    mp.spawn(rank_main, args=(args.out, args.port), nprocs=2)
