"""GradientMeter in a plain PyTorch loop: against the exact truth of a finite data set, against SNRMonitor on
the same microbatches, and its lifetime and errors.

The ground-truth helpers (the MLP problem, per-example gradients from ``torch.func``, the finite-set truth,
the lr = 0 Lightning fit) are those of ``test_ground_truth.py``, imported rather than copied.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_ground_truth import (
    MLP_EXAMPLES,
    RAGGED_SIZES,
    RaggedBatches,
    finite_set_truth,
    fit,
    mlp_problem,
    truth_for,
    with_replacement,
)
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import snrmon
from snrmon import GradientMeter
from snrmon.callbacks import SNRMonitor

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
        "ignore:.*does not have many workers.*",
        "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
    ),
    pytest.mark.usefixtures("one_thread"),
]

Z = 3.0  # the band, in the meter's own standard errors


def plain_loop(model: nn.Module, loader: DataLoader, meter: GradientMeter, accumulate: int, lr: float = 0.0):
    """What a user writes: K microbatches per step, each mean loss divided by K, then the step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = iter(loader)
    for _ in range(len(loader) // accumulate):
        for _ in range(accumulate):
            x, y = next(batches)
            (F.cross_entropy(model(x), y) / accumulate).backward()
            meter.after_backward(batch_size=len(x))
        meter.before_step()
        optimizer.step()
        optimizer.zero_grad()


def assert_within(values: dict[str, float], truth: dict[str, float], keys=("signal", "noise"), prefix=""):
    """|meter − truth| < Z·se, with se small against the truth so the band can reject a wrong estimate."""
    for key in keys:
        value, se, expected = values[prefix + key], values[f"{prefix}{key}_se"], truth[key]
        assert 0 < se < 0.1 * abs(expected), f"{prefix}{key}: se {se:.4g} vs truth {expected:.4g}"
        assert abs(value - expected) < Z * se, f"{prefix}{key}: {value:.5g} ± {se:.3g}, truth {expected:.5g}"


# ---------------------------------------------------------------------- (a) exact truth


@pytest.mark.parametrize("seed", [0, 1])
def test_independent_draws_match_the_exact_truth(seed):
    """Microbatches drawn with replacement from 256 examples: per-sample gradients are i.i.d. draws from the
    data set's empirical distribution, whose |G|² and tr(Σ) torch.func gives exactly; per group too."""
    module, dataset, grads = mlp_problem(seed=seed)
    steps, accumulate = 300, 4
    loader = with_replacement(dataset, batch_size=16, batches=steps * accumulate, seed=seed + 1)
    with GradientMeter(module, groups=1, ema_decay=0.99) as meter:
        plain_loop(module, loader, meter, accumulate)
        values = meter.compute()
    assert values["batch_size"] == pytest.approx(64)
    assert "dataset_size" not in values and "dataset_snr" not in values
    assert_within(values, truth_for(grads))
    for group in ("hidden", "out"):
        names = [name for name in grads if name.startswith(group + ".")]
        assert_within(values, truth_for(grads, names), prefix=f"{group}/")


@pytest.mark.parametrize("seed", [10, 12])
def test_disjoint_draws_with_dataset_size_match_the_training_sets_truth(seed):
    """A shuffled loader over N = 256: the finite-set correction (dataset_size) must hit the training set's
    |G|² and S², which the uncorrected value misses."""
    module, dataset, grads = mlp_problem(seed=seed)
    loader = DataLoader(
        dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed + 1)
    )
    meter = GradientMeter(module, dataset_size=MLP_EXAMPLES, ema_decay=0.99)
    for _ in range(200):  # 2 steps an epoch, each epoch a fresh permutation
        plain_loop(module, loader, meter, accumulate=4)
    values = meter.compute()
    meter.close()
    truth = finite_set_truth(grads)
    assert values["dataset_size"] == MLP_EXAMPLES
    assert_within(values, truth, keys=("signal", "noise", "signal_beyond_chance", "dataset_snr"))
    uncorrected = values["signal"] - values["noise"] / MLP_EXAMPLES
    assert abs(uncorrected - truth["signal"]) > Z * values["signal_se"], "the band misses the bias"


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numbers", "device_tensors"])
def test_weighted_microbatches_match_the_exact_truth(as_tensor):
    """Ragged microbatches whose losses are sums over samples divided by the step's sample count (the token
    weighting of Hugging Face's ``num_items_in_batch``): the applied gradient is the mean over all the step's
    samples, each microbatch weighted by its share. With those weights the meter hits the truth, and its
    batch size is the step's sample count."""
    module, dataset, grads = mlp_problem(seed=4)
    steps, accumulate = 300, len(RAGGED_SIZES)
    sampler = RaggedBatches(MLP_EXAMPLES, RAGGED_SIZES, batches=steps * accumulate, seed=5)
    batches = iter(DataLoader(dataset, batch_sampler=sampler))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    total = sum(RAGGED_SIZES)
    with GradientMeter(module, ema_decay=0.99) as meter:
        for _ in range(steps):
            for _ in range(accumulate):
                x, y = next(batches)
                (F.cross_entropy(module(x), y, reduction="sum") / total).backward()
                size, weight = len(x), len(x) / total
                if as_tensor:
                    size, weight = torch.tensor(float(size)), torch.tensor(weight)
                meter.after_backward(batch_size=size, weight=weight)
            meter.before_step()
            optimizer.step()
            optimizer.zero_grad()
        values = meter.compute()
    assert values["batch_size"] == pytest.approx(total)  # B_eff = 1 / Σ v_k²/b_k = Σ b_k for v_k = b_k/Σb
    assert_within(values, truth_for(grads))


def test_weights_for_some_microbatches_only_are_refused():
    model = small_model()
    with GradientMeter(model) as meter:
        (model(torch.randn(4, 3)).square().mean() / 2).backward()
        meter.after_backward(batch_size=4, weight=0.5)
        with pytest.raises(ValueError, match="every microbatch of a step or for none"):
            meter.after_backward(batch_size=4)
        with pytest.raises(ValueError, match="weight must be a finite number > 0"):
            meter.after_backward(batch_size=4, weight=0.0)


# ---------------------------------------------------------------------- (b) the same numbers as SNRMonitor


@pytest.mark.parametrize("shuffled", [False, True], ids=["with_replacement", "shuffled_finite_set"])
def test_same_numbers_as_snr_monitor_on_the_same_run(shuffled):
    """Trainer.fit with accumulate_grad_batches=4 and a plain loop with the meter over the same microbatches,
    from the same initial weights, with a learning rate that moves them: equal values, key for key (the same
    EMA settings; the meter's keys are the monitor's without "snr/")."""
    steps, accumulate, seed, lr = 12, 4, 3, 0.5

    def run_data():
        module, dataset, _ = mlp_problem(seed=seed)
        if shuffled:  # SNRMonitor reads N = 256 off the loader; the meter is told
            generator = torch.Generator().manual_seed(seed)
            return module, DataLoader(dataset, batch_size=16, shuffle=True, generator=generator)
        return module, with_replacement(dataset, batch_size=16, batches=steps * accumulate, seed=seed)

    module, loader = run_data()
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=lr)
    monitor = SNRMonitor(ema_decay=0.9, groups=1)
    with pytest.raises(AssertionError, match="lr = 0"):  # fit's check of lr = 0: here the weights move
        fit(module, loader, monitor, steps=steps, accumulate_grad_batches=accumulate)

    model, loader = run_data()
    with GradientMeter(
        model, groups=1, ema_decay=0.9, dataset_size=MLP_EXAMPLES if shuffled else None
    ) as meter:
        for _ in range(steps * accumulate // len(loader)):  # epochs: 3 of 4 steps for the shuffled set
            plain_loop(model, loader, meter, accumulate, lr=lr)
        values = meter.compute()

    for a, b in zip(module.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the two runs took the same steps
    expected = {key.removeprefix("snr/"): value for key, value in monitor.latest.items()}
    assert set(values) == set(expected)
    assert ("dataset_snr" in values) == shuffled
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key


@pytest.mark.parametrize("batch_size", [20, 24], ids=["single_last_window", "shorter_last_window"])
def test_lightnings_events_replayed_as_meter_calls_give_snr_monitors_numbers_exactly(batch_size):
    """SNRMonitor is an adapter over GradientMeter: the calls its Lightning hooks make (start_window with the
    global step, before_backward, after_backward, before_step with K), made by hand over the same
    microbatches, give its values and EMAs bit for bit. Covered on both sides by the one implementation:
    every_n_steps, K = 3 with each epoch's last window shorter (20: 13 batches, a single last microbatch,
    skipped; 24: 11 batches, 2 microbatches of 24 and 16), the finite set's N, the optimizer's parameters."""
    accumulate, every, epochs, lr, seed = 3, 3, 3, 0.5, 5

    def run_data():
        module, dataset, _ = mlp_problem(seed=seed)
        generator = torch.Generator().manual_seed(seed)
        return module, DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)

    module, loader = run_data()
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=lr)
    monitor = SNRMonitor(ema_decay=0.9, groups=1, every_n_steps=every)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, accumulate_grad_batches=accumulate,
        callbacks=[monitor], logger=False, log_every_n_steps=1000, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, loader)

    model, loader = run_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    meter = GradientMeter(
        model, groups=1, ema_decay=0.9, dataset_size=MLP_EXAMPLES, every_n_steps=every,
        optimizers=lambda: [optimizer],
    )  # fmt: skip
    step = 0
    for _ in range(epochs):
        batches = list(loader)
        for start in range(0, len(batches), accumulate):  # Lightning's windows end with the epoch
            meter.start_window(step)
            for x, y in batches[start : start + accumulate]:
                loss = F.cross_entropy(model(x), y) / accumulate  # K also in a shorter window, as Lightning
                meter.before_backward()
                loss.backward()
                meter.after_backward(len(x))
            meter.before_step(accumulation=accumulate)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
    values = meter.snapshot("snr")
    meter.close()

    assert step == trainer.global_step
    for a, b in zip(module.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)  # the two runs took the same steps
    windows = math.ceil(MLP_EXAMPLES / batch_size / accumulate)  # per epoch
    single = MLP_EXAMPLES % (batch_size * accumulate) <= batch_size  # a last window of one microbatch
    measured = [s for s in range(step) if s % every == 0 and not (single and s % windows == windows - 1)]
    assert int(monitor._estimator.updates) == len(measured) >= 2
    assert values.keys() == monitor.latest.keys() and "snr/dataset_snr" in values
    for key, value in monitor.latest.items():
        assert values[key] == value or (math.isnan(value) and math.isnan(values[key])), key
    for name in ("moments", "updates", "skipped", "dropped", "batch_size"):
        assert torch.equal(getattr(meter.estimator, name), getattr(monitor._estimator, name)), name


# ---------------------------------------------------------------------- (c) lifetime and errors


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def backward(model: nn.Module, meter: GradientMeter, k: int = 2, size: int = 5) -> None:
    for _ in range(k):
        (model(torch.randn(size, 3)).square().mean() / k).backward()
        meter.after_backward(batch_size=size)


def test_gradients_too_small_for_float32_norms_are_not_reported_as_numbers():
    """A loss scaled by 1e-21: its gradient entries (~1e-22) square to subnormal numbers in the float32 norms,
    which gave a noise a quarter of the truth, silently (smaller still: a negative noise scale with a standard
    error of 0). Scaled by 1e-19 (squares ~1e-40 an entry, still exact) the estimates are the unscaled ones
    times 1e-38, and a float64 model scaled by 1e-21 is measured in float64, exactly too."""

    def estimates(scale: float, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        model = small_model().to(dtype)
        torch.manual_seed(1)
        with GradientMeter(model) as meter:
            for _ in range(8):
                for _ in range(2):
                    (scale * model(torch.randn(5, 3, dtype=dtype)).square().mean() / 2).backward()
                    meter.after_backward(batch_size=5)
                meter.before_step()
                model.zero_grad()
            return meter.compute()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where the norms are exact
        plain, small = estimates(1.0), estimates(1e-19)
        wide, wide_small = estimates(1.0, torch.float64), estimates(1e-21, torch.float64)
    for key in ("signal", "noise"):
        assert small[key] == pytest.approx(plain[key] * 1e-38, rel=1e-4)
        assert wide_small[key] == pytest.approx(wide[key] * 1e-42, rel=1e-9)
    with pytest.warns(UserWarning, match="an entry, where their float32 norms lose their precision"):
        tiny = estimates(1e-21)
    assert all(math.isnan(tiny[key]) for key in ("signal", "noise", "noise_scale", "ratio", "noise_scale_se"))


def test_a_complex_parameter_is_measured_as_its_real_and_imaginary_parts():
    """A complex parameter's gradient norm is that of the real vector of its parts: the same numbers as a
    model holding the parts as a real parameter (the monitor used to switch itself off on one)."""

    class Complex(nn.Module):
        def __init__(self, parts: torch.Tensor) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.view_as_complex(parts.clone()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.to(torch.cfloat) @ self.weight).real + (x.to(torch.cfloat) @ self.weight).imag.square()

    class Parts(nn.Module):
        def __init__(self, parts: torch.Tensor) -> None:
            super().__init__()
            self.parts = nn.Parameter(parts.clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.parts[..., 0] + (x @ self.parts[..., 1]).square()

    def estimates(model: nn.Module) -> dict[str, float]:
        generator = torch.Generator().manual_seed(2)
        with GradientMeter(model) as meter:
            for _ in range(6):
                for _ in range(2):
                    x = torch.randn(5, 3, generator=generator)
                    (model(x) - 1.0).square().mean().div(2).backward()
                    meter.after_backward(batch_size=5)
                meter.before_step()
                model.zero_grad()
            return meter.compute()

    parts = torch.randn(3, 1, 2, generator=torch.Generator().manual_seed(1))
    complex_values, real_values = estimates(Complex(parts)), estimates(Parts(parts))
    for key in ("signal", "noise", "noise_scale"):
        assert math.isfinite(complex_values[key])
        assert complex_values[key] == pytest.approx(real_values[key], rel=1e-5)


def test_public_and_exported():
    assert "GradientMeter" in snrmon.__all__ and snrmon.GradientMeter is GradientMeter


def test_close_removes_the_hooks():
    model = small_model()
    meter = GradientMeter(model)
    taps = meter._taps  # the hooks count their calls here
    backward(model, meter)
    assert taps._calls == [0] * 4  # counted, then cleared for the next backward
    model(torch.randn(5, 3)).sum().backward()
    assert taps._calls == [1] * 4, "the hooks must run while the meter is open"
    meter.before_step()
    meter.close()
    assert meter.closed and not any(p._backward_hooks for p in model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    assert taps._calls == [0] * 4, "a hook ran after close()"
    meter.close()  # twice is fine
    for use in (lambda: meter.after_backward(5), meter.before_step, meter.compute, meter.__enter__):
        with pytest.raises(RuntimeError, match="closed"):
            use()


def test_sizes_as_device_tensors_give_the_values_of_numbers():
    """Token counts kept on the device (no sync to get them) weigh the microbatches as Python numbers do; a
    one-element tensor of any shape (a count summed with keepdim) is its one number."""

    def run(as_tensor) -> dict[str, float]:
        model = small_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(2)
        with GradientMeter(model) as meter:
            for _ in range(4):
                for size in (3, 7, 5):
                    (model(torch.randn(size, 3)).square().mean() / 3).backward()
                    meter.after_backward(as_tensor(size) if as_tensor else size)
                meter.before_step()
                optimizer.step()
                optimizer.zero_grad()
            return meter.compute()

    numbers = run(None)
    # The effective batch size of equal weights over ragged microbatches: 1 / Σ (1/K)² / b_k.
    assert numbers["batch_size"] == pytest.approx(9 / (1 / 3 + 1 / 7 + 1 / 5), rel=1e-12)
    for as_tensor in (torch.tensor, lambda size: torch.tensor([[float(size)]])):
        tensors = run(as_tensor)
        for key, value in numbers.items():  # float32 rounding apart: the window's weight is then a tensor
            assert tensors[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key


def test_size_tensors_that_are_not_positive_are_said_at_compute_and_left_out():
    """A size tensor's value is read only where the meter syncs: the steps with one that is 0, negative or NaN
    are refused there, once, and left out of the estimates, not counted as skipped (non-finite) steps. The
    values are then those of the good steps alone."""
    torch.manual_seed(3)
    good = [[torch.randn(5, 3) for _ in range(2)] for _ in range(3)]
    bad_sizes = {1: (-5.0, -5.0), 3: (5.0, math.nan), 4: (0.0, 5.0)}  # before the good step of that index

    def run(with_bad_steps: bool) -> tuple[GradientMeter, nn.Module]:
        model = small_model()
        meter = GradientMeter(model)
        steps = [(xs, (5.0, 5.0)) for xs in good]
        if with_bad_steps:
            for index, sizes in sorted(bad_sizes.items(), reverse=True):
                steps.insert(index, ([torch.randn(5, 3) for _ in range(2)], sizes))
        for xs, sizes in steps:
            for x, size in zip(xs, sizes, strict=True):
                (model(x).square().mean() / 2).backward()
                meter.after_backward(torch.tensor(size))
            meter.before_step()
            model.zero_grad()
        return meter

    meter, reference = run(True), run(False).compute()
    with pytest.raises(ValueError, match="3 measured steps had a batch_size or weight tensor that was not"):
        meter.compute()
    values = meter.compute()  # said once: the meter goes on
    assert int(meter.state_dict()["estimator"]["updates"]) == 3 and values["skipped_steps"] == 0
    assert values == pytest.approx(reference, rel=1e-12)
    meter.close()


def test_context_manager_closes():
    model = small_model()
    with GradientMeter(model) as meter:
        assert all(p._backward_hooks for p in model.parameters())
    assert meter.closed and not any(p._backward_hooks for p in model.parameters())


def test_errors_say_what_is_missing():
    model = small_model()
    meter = GradientMeter(model)
    with pytest.raises(RuntimeError, match="no step measured yet"):
        meter.compute()
    with pytest.raises(RuntimeError, match="no after_backward"):
        meter.before_step()
    backward(model, meter, k=1)
    with pytest.raises(ValueError, match="no noise estimate is possible"):
        meter.before_step()
    model.zero_grad()
    # The failed steps left nothing behind: a proper step now gives finite values.
    backward(model, meter, k=3)
    meter.before_step()
    values = meter.compute()
    assert math.isfinite(values["noise"]) and values["batch_size"] == pytest.approx(15)
    meter.close()
    other = small_model()
    finite = GradientMeter(other, dataset_size=8)
    with finite, pytest.raises(ValueError, match="more than dataset_size"):
        backward(other, finite, k=2, size=5)  # 10 samples in one step, of 8
        finite.before_step()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"dataset_size": 1}, ValueError),
        ({"dataset_size": 2.5}, ValueError),
        ({"dataset_size": "10"}, TypeError),
        ({"groups": 0}, ValueError),
        ({"ema_decay": 1.0}, ValueError),
    ],
)
def test_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        GradientMeter(small_model(), **kwargs)


@pytest.mark.parametrize(
    "size, weight, error",
    [
        (True, None, TypeError),  # not a count of 1
        ("5", None, TypeError),
        (torch.tensor([5.0, 5.0]), None, ValueError),
        (0, None, ValueError),
        (math.inf, None, ValueError),
        (5, float("nan"), ValueError),
        (5, torch.ones(2), ValueError),
        (torch.tensor(True), None, TypeError),  # as True
        (5, torch.tensor(True), TypeError),
        (torch.tensor(5.0, device="meta"), None, ValueError),  # not on the parameters' device
    ],
)
def test_a_bad_size_or_weight_is_refused_at_its_call(size, weight, error):
    model = small_model()
    with GradientMeter(model) as meter:
        (model(torch.randn(5, 3)).square().mean() / 2).backward()
        with pytest.raises(error, match="batch_size|weight"):
            meter.after_backward(batch_size=size, weight=weight)
        backward(model, meter, k=2)  # a loop that goes on: this step holds the refused microbatch ...
        meter.before_step()  # ... and goes unmeasured
        model.zero_grad()
        backward(model, meter, k=2)
        meter.before_step()
        values, updates = meter.compute(), int(meter.state_dict()["estimator"]["updates"])
    assert updates == 1 and values["batch_size"] == 10 and math.isfinite(values["noise"])


def test_after_backward_twice_or_before_its_backward_is_refused():
    """A call with no backward since the last one, while measuring, would record the same gradient twice, or
    a zero one (negative noise, silently): refused, the step left unmeasured, the next step measured. Also in
    the order of an adapter that calls before_backward (Lightning's)."""
    model = small_model()
    with GradientMeter(model) as meter:
        with pytest.raises(ValueError, match="before its backward"):
            meter.after_backward(5)  # no backward yet
        backward(model, meter, k=2)
        meter.before_step()  # the window of the refused call: unmeasured
        model.zero_grad()
        for adapter in (False, True):
            for k in range(2):
                if adapter:
                    meter.before_backward()
                (model(torch.randn(5, 3)).square().mean() / 2).backward()
                meter.after_backward(5)
                if k == 1:
                    with pytest.raises(ValueError, match="called twice for one backward"):
                        meter.after_backward(5)
            meter.before_step()
            model.zero_grad()
        assert int(meter.estimator.updates) == 0
        backward(model, meter, k=2)
        meter.before_step()
        values = meter.compute()
        assert int(meter.estimator.updates) == 1 and values["noise"] > 0 and values["batch_size"] == 10


@pytest.mark.parametrize("accumulation", [True, 2.5, 0, -2, "2"])
def test_a_bad_accumulation_is_refused_and_the_next_step_measured(accumulation):
    """K divides the window: a bool, a fraction or K < 1 would scale the numbers silently."""
    model = small_model()
    with GradientMeter(model) as meter:
        backward(model, meter, k=2)
        with pytest.raises(ValueError, match="accumulation must be None or an int >= 1"):
            meter.before_step(accumulation=accumulation)
        model.zero_grad()
        backward(model, meter, k=2)
        meter.before_step(accumulation=2)
        assert int(meter.estimator.updates) == 1 and meter.compute()["batch_size"] == 10


def test_a_step_without_backward_is_refused_or_with_accumulation_left_out():
    """No after_backward since the last step: a forgotten call (refused), or, with the K the loop divided by
    given, a window whose every microbatch was skipped (Lightning: training_step returned None): left out,
    not measured as an empty step, and counted in skipped_steps (as under several ranks, where every rank
    skips it)."""
    model = small_model()
    with GradientMeter(model) as meter:
        with pytest.raises(RuntimeError, match="no after_backward"):
            meter.before_step()
        meter.before_step(accumulation=2)
        with pytest.raises(RuntimeError, match="no step measured yet"):
            meter.compute()
        backward(model, meter, k=2)
        meter.before_step(accumulation=2)
        assert int(meter.estimator.updates) == 1 and meter.compute()["skipped_steps"] == 1


def test_compute_after_load_state_dict_gives_the_restored_values():
    model = small_model()
    with GradientMeter(model) as meter:
        for _ in range(3):
            backward(model, meter, k=2)
            meter.before_step()
            model.zero_grad()
        saved, state = meter.compute(), meter.state_dict()
    with GradientMeter(model) as restored:
        restored.load_state_dict(state)
        assert restored.compute() == saved


def test_a_failed_after_backward_says_what_happened_and_leaves_the_meter_usable():
    """Two backwards and one after_backward: named as such (not only as checkpointing). A failure after the
    input checks (here a hook's error) clears the hooks too: the next calls are not taken for a gradient in
    parts, and the next step is measured."""
    model = small_model()
    with GradientMeter(model) as meter:
        for _ in range(2):
            (model(torch.randn(5, 3)).square().mean() / 2).backward()
        with pytest.raises(RuntimeError, match="several backwards without GradientMeter.after_backward"):
            meter.after_backward(10)
        backward(model, meter, k=2)  # the rest of the step goes unmeasured, without an error
        meter.before_step()
        model.zero_grad()
        (model(torch.randn(5, 3)).square().mean() / 2).backward()
        meter.taps.error = RuntimeError("a hook failed")  # as a hook records an error it cannot raise
        with pytest.raises(RuntimeError, match="a hook failed"):
            meter.after_backward(5)
        backward(model, meter, k=1)
        meter.before_step()
        model.zero_grad()
        backward(model, meter, k=2)
        meter.before_step()
        values = meter.compute()
    assert int(meter.estimator.updates) == 1 and values["noise"] > 0 and values["batch_size"] == 10


def test_numpy_sizes_and_weights_are_numbers():
    model = small_model()
    with GradientMeter(model) as meter:
        for _ in range(2):
            (model(torch.randn(5, 3)).square().mean() / 2).backward()
            meter.after_backward(batch_size=np.int64(5), weight=np.float32(0.5))
        meter.before_step()
        values = meter.compute()
    assert values["batch_size"] == 10 and math.isfinite(values["noise"])


def test_a_change_in_which_parameters_train_is_said():
    """Without optimizers the meter watches the parameters that trained when it was made: a layer unfrozen
    later is not measured, so compute() says so (and not while nothing changed)."""
    model = small_model()
    model[0].requires_grad_(False)
    with GradientMeter(model) as meter:
        backward(model, meter, k=2)
        meter.before_step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            meter.compute()
        model[0].requires_grad_(True)  # gradual unfreezing
        backward(model, meter, k=2)
        meter.before_step()
        with pytest.warns(UserWarning, match=r"require a gradient changed .*\(2 tensors added, 0 removed\)"):
            meter.compute()


def test_rejects_a_model_without_trainable_parameters():
    model = small_model().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to measure"):
        GradientMeter(model)


def test_amp_scaler_norms_are_unscaled():
    """A GradScaler's scale must not change the values: the same steps with scale 2¹⁰, the applied gradient
    read before or after ``scaler.unscale_``, give the values of the loop without a scaler."""

    def run(scale: float | None, unscale_first: bool = False) -> dict[str, float]:
        model = small_model()
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        torch.manual_seed(1)
        with GradientMeter(model, scaler=scaler) as meter:
            for _ in range(5):
                for _ in range(4):
                    loss = model(torch.randn(6, 3)).square().mean() / 4
                    (scaler.scale(loss) if scaler else loss).backward()
                    meter.after_backward(6)
                if scaler and unscale_first:
                    scaler.unscale_(optimizer)
                meter.before_step()
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()
            return meter.compute()

    plain = run(None)
    for unscale_first in (False, True):
        scaled = run(2.0**10, unscale_first)
        assert scaled["skipped_steps"] == 0
        for key in ("signal", "noise", "noise_scale", "ratio"):
            assert scaled[key] == pytest.approx(plain[key], rel=1e-5), (key, unscale_first)


# ---------------------------------------------------------------------- several ranks


@pytest.mark.ddp
def test_two_ddp_ranks_give_the_values_of_one_process_with_their_microbatches(tmp_path):
    """2 gloo ranks with 2 microbatches each, and one process with the same 4: the ranks are joined in the
    step's all-reduce, every rank reports the same values, and they are the single process's."""
    from test_ddp import free_port

    script = Path(__file__).with_name("meter_ddp_script.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(script), "--out", str(tmp_path), "--port", str(free_port())]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    reference, *ranks = (
        json.loads((tmp_path / f"{n}.json").read_text()) for n in ("reference", "rank0", "rank1")
    )
    assert ranks[0] == ranks[1]
    assert set(ranks[0]) == set(reference) and math.isfinite(reference["noise"])
    for key, value in reference.items():
        assert ranks[0][key] == pytest.approx(value, rel=1e-5, abs=1e-12), key
