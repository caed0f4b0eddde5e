"""GradientMeter in Lightning Fabric loops (LitGPT's style: ``fabric.no_backward_sync`` accumulation), through
``snrmon.callbacks.fabric_meter``: against the closed-form truth of least squares and the exact truth of a
finite data set, on one device (fp32 and fp16 with Fabric's loss scaler) and on 2 gloo DDP ranks from a real
``fabric.launch()``; group names without Fabric's, DDP's or torch.compile's wrapper prefixes.

The truth helpers are those of ``test_ground_truth.py`` (one device) and ``test_ddp.py`` (2 ranks). The LitGPT
example (``examples/litgpt_finetune.py``) is run too, where LitGPT, an optional test extra, is installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import MixedPrecision
from lightning.fabric.strategies import DataParallelStrategy, ModelParallelStrategy
from lightning.fabric.utilities.exceptions import MisconfigurationException
from test_ddp import BATCH_SIZE, WORLD_SIZE, assert_closed_form, free_port, run_distributed
from test_ground_truth import (
    DIM,
    REGRESSION_BATCH,
    FreshGaussianBatches,
    assert_matches,
    finite_set_truth,
    least_squares_truth,
    mlp_problem,
    truth_for,
    with_replacement,
)
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from snrmon import GradientMeter
from snrmon.callbacks import SNRMonitor, fabric_meter

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
        "ignore:.*does not have many workers.*",
    ),
    pytest.mark.usefixtures("one_thread"),
]


def fabric_loop(fabric: L.Fabric, model: nn.Module, meter: GradientMeter, loader, loss_fn, steps, k):
    """LitGPT's loop at lr = 0: K microbatches a step, the first K − 1 without gradient sync, each mean loss
    divided by K; the meter's two calls where the docs put them."""
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.0))
    batches = iter(loader)
    for iteration in range(1, steps * k + 1):
        x, y = next(batches)
        is_accumulating = iteration % k != 0
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            fabric.backward(loss_fn(model(x), y) / k)
        meter.after_backward(batch_size=len(x))
        if not is_accumulating:
            meter.before_step()
            fabric.clip_gradients(model, optimizer, max_norm=1e9)  # unscales fp16 gradients; clips nothing
            optimizer.step()
            optimizer.zero_grad()


class Regression(nn.Module):
    """x·w, the least squares of test_ground_truth as a plain module."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def fp16_fabric() -> L.Fabric:
    """fp16 mixed precision on the CPU (Fabric's "16-mixed" turns into bf16 there unless given the plugin)."""
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    return L.Fabric(accelerator="cpu", devices=1, plugins=plugin)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_one_device_accumulation_matches_closed_form(precision):
    """K = 4 microbatches a step on one device: |G|² and tr Σ of least squares within 4 se. Under fp16 the
    meter divides out the scaler's 2¹² (a missing division would be 2²⁴ off)."""
    steps, k = 300, 4
    fabric = fp16_fabric() if precision == "16-mixed" else L.Fabric(accelerator="cpu", devices=1)
    generator = torch.Generator().manual_seed(k)
    w_star = torch.randn(DIM, generator=generator)
    delta = 0.4 * torch.randn(DIM, generator=generator)
    model = fabric.setup(Regression(w_star + delta))
    loader = DataLoader(FreshGaussianBatches(w_star, REGRESSION_BATCH, seed=k), batch_size=None)

    with fabric_meter(fabric, model, ema_decay=0.99) as meter:
        assert meter.scaler is getattr(fabric.strategy.precision, "scaler", None)
        assert (meter.scaler is not None) == (precision == "16-mixed")
        fabric_loop(fabric, model, meter, loader, lambda out, y: (out - y).square().mean(), steps, k)
        values = meter.compute()

    assert values["batch_size"] == pytest.approx(k * REGRESSION_BATCH) and values["skipped_steps"] == 0
    assert_matches(values, "", least_squares_truth(delta))


def test_group_names_are_the_models_and_match_the_exact_truth():
    """groups=1 on a Fabric-wrapped MLP: the groups are "hidden" and "out", not "_forward_module", and each
    matches the exact |G|² and tr Σ (torch.func, draws with replacement) restricted to its parameters."""
    module, dataset, grads = mlp_problem(seed=0)
    steps, k = 300, 4
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(module)
    loader = with_replacement(dataset, batch_size=16, batches=steps * k, seed=1)
    with fabric_meter(fabric, model, groups=1, ema_decay=0.99) as meter:
        assert meter.group_names == ["total", "hidden", "out"]
        fabric_loop(fabric, model, meter, loader, F.cross_entropy, steps, k)
        values = meter.compute()
    assert_matches(values, "", truth_for(grads))
    for group in ("hidden", "out"):
        names = [name for name in grads if name.startswith(group + ".")]
        assert_matches(values, f"{group}/", truth_for(grads, names))


def test_wrapped_models_are_named_as_the_model_inside():
    """torch.compile, Fabric around torch.compile, and Fabric: the model's own names. A ``.module`` that holds
    only part of the parameters is a submodule, not a wrapper, and keeps its name."""

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    fabric = L.Fabric(accelerator="cpu", devices=1)
    for wrapped in (torch.compile(net()), fabric.setup(torch.compile(net())), fabric.setup(net())):
        with GradientMeter(wrapped, groups=1) as meter:
            assert meter.group_names == ["total", "0", "2"], type(wrapped)

    class WithPart(nn.Module):
        def __init__(self):
            super().__init__()
            self.module, self.head = nn.Linear(3, 3), nn.Linear(3, 1)

    with GradientMeter(fabric.setup(WithPart()), groups=1) as meter:
        assert meter.group_names == ["total", "module", "head"]


@pytest.mark.parametrize(
    "strategy", [DataParallelStrategy(), ModelParallelStrategy(lambda m, mesh: m)], ids=["dp", "fsdp2"]
)
def test_strategies_whose_gradients_are_not_whole_are_refused(strategy):
    """DataParallel sums replicas' gradients inside the forward; ModelParallelStrategy (FSDP2, tensor
    parallelism) shards them. (Fabric's FSDPStrategy, refused alike, needs a GPU to be made.)"""
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=strategy)
    with pytest.raises(ValueError, match="supports one device and DDP"):
        fabric_meter(fabric, nn.Linear(3, 1))


def test_snr_monitor_in_a_fabric_loop_points_to_fabric_meter():
    """The issue's first attempt: SNRMonitor set up on a Fabric. Its strategy shares the name of the Trainer's
    SingleDeviceStrategy, so the refusal says what to use instead."""
    module, _, _ = mlp_problem(seed=0)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    with pytest.raises(MisconfigurationException, match="fabric_meter"):
        SNRMonitor().setup(fabric, module, "fit")


@pytest.mark.ddp
def test_fabric_launch_on_two_ddp_ranks_matches_closed_form(tmp_path: Path):
    """A real ``fabric.launch()`` on 2 gloo ranks, K = 2 each: the ranks agree (one all-reduce a step), the
    global batch is 2·2·8, the values are the closed forms of test_ddp's least squares within 4 se, and the
    group is the model's "head", not "_forward_module" (Fabric around DDP)."""
    accumulate = 2
    script = Path(__file__).with_name("fabric_ddp_script.py")
    ranks = run_distributed(script, tmp_path, accumulate)
    assert [r["world_size"] for r in ranks] == [WORLD_SIZE] * WORLD_SIZE
    assert ranks[0]["group_names"] == ranks[1]["group_names"] == ["total", "head"]
    values = ranks[0]["values"]
    assert ranks[1]["values"] == values
    global_batch = WORLD_SIZE * BATCH_SIZE * accumulate
    assert values["batch_size"] == pytest.approx(global_batch, rel=1e-12) and values["skipped_steps"] == 0
    assert_closed_form(values, global_batch)
    assert_closed_form(values, global_batch, prefix="head/")  # the one group holds every parameter


# ---------------------------------------------------------------------- the LitGPT example

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "litgpt_finetune.py"


@pytest.fixture(scope="module")
def litgpt_example():
    """The example's ``main`` (LitGPT is a test extra: skipped without it)."""
    pytest.importorskip(
        "litgpt", reason="LitGPT is an optional test extra: pip install -c constraints.txt litgpt"
    )
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from litgpt_finetune import main

        yield main
    finally:
        sys.path.remove(str(EXAMPLE.parent))


def per_sequence_gradients(model: nn.Module, train_set) -> dict[str, torch.Tensor]:
    """``{name: [N, size]}`` gradients of each training sequence's mean token loss, one backward each."""
    from litgpt.utils import chunked_cross_entropy

    rows = []
    for x, y in train_set:
        model.zero_grad()
        chunked_cross_entropy(model(x[None]), y[None]).backward()
        rows.append({name: p.grad.flatten().double() for name, p in model.named_parameters()})
    return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}


def test_litgpt_example_matches_the_training_sets_truth(litgpt_example):
    """The example at lr = 0: a LitGPT GPT, K = 4 microbatches of 8 sequences, a shuffled finite set of 512.
    Signal and noise, in total and per group (named as the model's parameters, not Fabric's wrapper's), match
    the training set's exact |G|² and S² from each sequence's own gradient."""
    from litgpt_finetune import GROUPS

    result = litgpt_example(["--lr", "0", "--steps", "100", "--ema-decay", "0.98", "--log-interval", "100"])
    values, model = result["values"], result["model"]
    assert values["batch_size"] == pytest.approx(32) and values["dataset_size"] == 512
    grads = per_sequence_gradients(model, result["train_set"])
    assert_matches(values, "", finite_set_truth(grads))
    for group, regex in GROUPS.items():
        members = {name: g for name, g in grads.items() if re.search(regex, name)}
        assert_matches(values, f"{group}/", finite_set_truth(members))


def test_litgpt_example_fine_tunes(litgpt_example):
    """The example as a user runs it, shortened: loss falls; the values are finite, with standard errors."""
    result = litgpt_example(["--steps", "30", "--log-interval", "10"])
    losses, values = result["losses"], result["values"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    for key in ("signal", "noise", "noise_scale", "ratio", "attention/noise_scale"):
        assert 0 < values[f"{key}_se"] < values[key], key
    assert values["skipped_steps"] == 0


@pytest.mark.ddp
@pytest.mark.slow
def test_litgpt_example_on_two_ddp_ranks(tmp_path: Path, litgpt_example):
    """The example's documented DDP command (``--devices 2``): a real ``fabric.launch()`` on 2 gloo ranks runs
    to the end, and rank 0 prints each logging step's measurement."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    command = [sys.executable, str(EXAMPLE), "--devices", "2", "--steps", "20", "--log-interval", "10"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in lines] == ["1", "10", "20"], done.stdout  # printed once, by rank 0
    assert "noise scale" in lines[-1] and "nan" not in lines[-1].split("±")[1]
