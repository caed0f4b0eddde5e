"""Worker for tests/test_fabric.py: fabric_meter in a Lightning Fabric loop on 2 CPU DDP ranks (gloo).

The analytic least squares of ``tests/ddp_script.py`` (its data stream and arguments, imported), at lr = 0:
each rank draws its own stream and runs K = ``--accumulate`` microbatches a step, the first K − 1 under
``fabric.no_backward_sync``, as LitGPT's loops do. ``fabric.launch()`` relaunches this file for rank 1; every
rank writes the meter's values and group names to ``<out>/rank<global_rank>.json``.

    python tests/fabric_ddp_script.py --out DIR [--accumulate K] [--steps N] ...
"""

from __future__ import annotations

import argparse
import json
import math

import lightning as L
import torch
from ddp_script import GaussianLeastSquares, common_arguments
from torch import Tensor, nn
from torch.utils.data import DataLoader

from snrmon.callbacks import fabric_meter


class LeastSquares(nn.Module):
    """y_hat = x·w with w = Δ (w* = 0), |Δ|² = ``delta_sq`` spread evenly; in a submodule, so that its group
    name ("head") would show a wrapper's prefix."""

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.head = nn.Linear(args.dim, 1, bias=False)
        nn.init.constant_(self.head.weight, math.sqrt(args.delta_sq / args.dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x).squeeze(-1)


def main() -> None:
    args = common_arguments(__doc__, accumulate=2).parse_args()
    torch.set_num_threads(1)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    model = fabric.setup(LeastSquares(args))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.0))
    data = GaussianLeastSquares(args.dim, args.sigma, args.batch_size, args.seed + fabric.global_rank)
    batches = iter(DataLoader(data, batch_size=None))
    before = model.head.weight.detach().clone()

    with fabric_meter(fabric, model, groups=1, ema_decay=args.ema_decay) as meter:
        for iteration in range(1, args.steps * args.accumulate + 1):
            x, y = next(batches)
            is_accumulating = iteration % args.accumulate != 0
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                loss = (model(x) - y).square().mean()
                fabric.backward(loss / args.accumulate)
            meter.after_backward(batch_size=len(x))
            if not is_accumulating:
                meter.before_step()
                optimizer.step()
                optimizer.zero_grad()
        values = meter.compute()
        group_names = meter.group_names

    assert torch.equal(before, model.head.weight), "lr = 0 must keep the weight fixed"
    result = {"world_size": fabric.world_size, "group_names": group_names, "values": values}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{fabric.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
