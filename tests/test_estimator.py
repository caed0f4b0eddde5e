"""Unit tests of GradientNoiseEstimator on squared norms simulated from a known gradient distribution.

Per-sample gradients are G + A·u with u i.i.d., zero mean, unit variance and *skewed* (a centred
exponential), so Σ = A·Aᵀ and nothing relies on Gaussian noise. A small gradient is the explicit mean of
b_k such samples and the applied gradient is Σ_k w_k g_k, exactly what the optimizer sees. The truth is
|G|² and tr Σ = ‖A‖²_F.

Independent repetitions are run side by side as estimator *groups*: each group row is estimated on its
own (the estimator only ever sums a group's coordinates), so R groups fed R independent squared norms
give R independent estimates from one estimator at the cost of one.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from snrmon import GradientNoiseEstimator

DIM = 8
F64 = torch.float64


class GradientModel:
    """A known per-sample gradient distribution: g = G + A·u, E u = 0, E u uᵀ = I."""

    def __init__(self, seed: int = 0, signal_scale: float = 1.0):
        generator = torch.Generator().manual_seed(seed)
        self.mean = signal_scale * torch.randn(DIM, generator=generator, dtype=F64)
        self.mix = torch.randn(DIM, DIM, generator=generator, dtype=F64) / math.sqrt(DIM)
        self.generator = torch.Generator().manual_seed(seed + 1)

    @property
    def signal(self) -> float:
        return float(self.mean.square().sum())

    @property
    def noise(self) -> float:
        return float(self.mix.square().sum())  # tr(A Aᵀ)

    def samples(self, *shape: int) -> torch.Tensor:
        u = torch.empty(*shape, DIM, dtype=F64).exponential_(generator=self.generator) - 1.0
        # A 2-D matmul: the batched float64 one is two orders of magnitude slower on CPU.
        return self.mean + (u.reshape(-1, DIM) @ self.mix.T).reshape(u.shape)

    def step(self, reps: int, sizes: list[int], weights: list[float]):
        """Squared norms of one step for ``reps`` independent repetitions.

        Returns ``small`` [reps, K] = |g_k|² and ``applied`` [reps] = |Σ_k w_k g_k|².
        """
        small = torch.stack([self.samples(reps, size).mean(1) for size in sizes], 1)
        applied = (torch.tensor(weights, dtype=F64)[:, None] * small).sum(1)
        return small.square().sum(-1), applied.square().sum(-1)

    def steps(self, count: int, reps: int, sizes: list[int], weights: list[float]):
        """``count`` steps at once (one draw): an iterator of what :meth:`step` returns."""
        small, applied = self.step(count * reps, sizes, weights)
        return zip(small.view(count, reps, -1), applied.view(count, reps), strict=True)


def feed(estimator: GradientNoiseEstimator, small, applied, sizes, weights, all_reduce=None):
    for k, (size, weight) in enumerate(zip(sizes, weights, strict=True)):
        estimator.add_small(small[:, k], size=size)
        estimator.add_applied(size=size, weight=weight)
    estimator.step(applied, all_reduce=all_reduce)


def weighted_formula(small, applied, sizes, weights):
    """W3/W4 of docs/theory.md, written out independently of the implementation."""
    b = torch.tensor(sizes, dtype=F64)
    w = torch.tensor(weights, dtype=F64)
    v = w / w.sum()
    x_small = (small * b).sum(1) / b.sum()
    x_big = applied / w.sum() ** 2
    inv_small, inv_big = len(sizes) / b.sum(), (v.square() / b).sum()
    noise = (x_small - x_big) / (inv_small - inv_big)
    signal = (x_big * inv_small - x_small * inv_big) / (inv_small - inv_big)
    return signal, noise


def naive_formula(small, applied, sizes, weights):
    """T2/T3 with the mean microbatch size b̄ and B = Σ b_k, equal weighting of |g_k|²: biased if ragged."""
    b_mean, b_total = sum(sizes) / len(sizes), sum(sizes)
    x_small = small.mean(1)
    x_big = applied / sum(weights) ** 2
    noise = (x_small - x_big) / (1 / b_mean - 1 / b_total)
    signal = (b_total * x_big - b_mean * x_small) / (b_total - b_mean)
    return signal, noise


RAGGED = [3, 8, 1, 16]
CASES = {
    "equal": ([4, 4, 4, 4], [0.25] * 4),
    "ragged_lightning_1_over_K": (RAGGED, [0.25] * 4),
    "ragged_size_weighted": (RAGGED, [float(b) for b in RAGGED]),
    "ragged_arbitrary_weights": (RAGGED, [0.5, 2.0, 1.0, 0.25]),
}


def per_step_estimates(model: GradientModel, sizes, weights, reps=4000, steps=5):
    """Per-step estimates (ema_decay = 0) over ``reps × steps`` independent steps, and naive noise."""
    estimator = GradientNoiseEstimator(num_groups=reps, ema_decay=0.0)
    signal, noise, naive_noise = [], [], []
    for _ in range(steps):
        small, applied = model.step(reps, sizes, weights)
        feed(estimator, small, applied, sizes, weights)
        values = estimator.compute()
        signal.append(values["signal"])
        noise.append(values["noise"])
        expected_signal, expected_noise = weighted_formula(small, applied, sizes, weights)
        torch.testing.assert_close(values["signal"], expected_signal, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(values["noise"], expected_noise, rtol=1e-9, atol=1e-9)
        naive_noise.append(naive_formula(small, applied, sizes, weights)[1])
    return {
        "signal": torch.cat(signal),
        "noise": torch.cat(noise),
        "naive_noise": torch.cat(naive_noise),
    }


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


# ---------------------------------------------------------------------- (a) unbiasedness, (b) power


@pytest.mark.parametrize("case", list(CASES))
def test_per_step_estimates_are_unbiased(case):
    sizes, weights = CASES[case]
    model = GradientModel(seed=1)
    estimates = per_step_estimates(model, sizes, weights)
    for key, truth in (("signal", model.signal), ("noise", model.noise)):
        mean, se = mean_and_se(estimates[key])
        assert se < 0.1 * truth, f"{key}: the check has no power (se {se:.3g} vs truth {truth:.3g})"
        assert abs(mean - truth) < 4 * se, f"{key}: mean {mean:.4g} vs truth {truth:.4g} (se {se:.3g})"


@pytest.mark.parametrize("case", ["ragged_lightning_1_over_K", "ragged_arbitrary_weights"])
def test_naive_equal_weight_estimator_is_biased_on_ragged_steps(case):
    """The same check rejects T3 with the mean size and equal weights: the test above has power.

    (The naive *signal* happens to be unbiased under Lightning's 1/K weights, since B/K² = b̄/K; the
    noise, and hence the noise scale, is not.)
    """
    sizes, weights = CASES[case]
    model = GradientModel(seed=1)
    estimates = per_step_estimates(model, sizes, weights)
    mean, se = mean_and_se(estimates["naive_noise"])
    assert abs(mean - model.noise) > 4 * se, f"naive noise {mean:.4g} matches {model.noise:.4g}"


def test_smoothed_estimate_over_many_steps_is_unbiased():
    """One group, many sequential steps through the EMA: the long-run average converges to the truth."""
    sizes, weights = CASES["ragged_lightning_1_over_K"]
    model = GradientModel(seed=2)
    estimator = GradientNoiseEstimator(num_groups=1, ema_decay=0.999)
    per_step = GradientNoiseEstimator(num_groups=1, ema_decay=0.0)
    steps, signal, noise = 2000, [], []
    for small, applied in model.steps(steps, 1, sizes, weights):
        feed(estimator, small, applied, sizes, weights)
        feed(per_step, small, applied, sizes, weights)
        values = per_step.compute()
        signal.append(values["signal"])
        noise.append(values["noise"])
    values = estimator.compute()
    for key, history, truth in (
        ("signal", torch.cat(signal), model.signal),
        ("noise", torch.cat(noise), model.noise),
    ):
        # The smoothed value is a weighted mean of the per-step values: its se is the reported one.
        se = float(values[f"{key}_se"][0])
        assert 0 < se < 0.2 * truth
        assert abs(float(values[key][0]) - truth) < 4 * se
        assert abs(float(history.mean()) - truth) < 4 * float(history.std()) / math.sqrt(steps)


# ---------------------------------------------------------------------- (c) bias correction


def test_bias_correction_first_steps_equal_weighted_mean_of_per_step_values():
    sizes, weights = CASES["ragged_size_weighted"]
    model = GradientModel(seed=3)
    smoothed = GradientNoiseEstimator(num_groups=3, ema_decay=0.9)
    per_step = GradientNoiseEstimator(num_groups=3, ema_decay=0.0)

    small, applied = model.step(3, sizes, weights)
    feed(smoothed, small, applied, sizes, weights)
    feed(per_step, small, applied, sizes, weights)
    first = per_step.compute()
    values = smoothed.compute()
    for key in ("signal", "noise", "noise_scale", "ratio"):
        torch.testing.assert_close(values[key], first[key], rtol=1e-12, atol=0)
    # A single step has no spread to measure: its standard error is unknown, not zero.
    assert torch.isnan(values["signal_se"]).all()

    small, applied = model.step(3, sizes, weights)
    feed(smoothed, small, applied, sizes, weights)
    feed(per_step, small, applied, sizes, weights)
    second = per_step.compute()
    values = smoothed.compute()
    # Bias-corrected EMA of two steps: (β(1−β)·x₁ + (1−β)·x₂) / (1 − β²) = (0.9·x₁ + x₂) / 1.9.
    for key in ("signal", "noise"):
        expected = (0.9 * first[key] + second[key]) / 1.9
        torch.testing.assert_close(values[key], expected, rtol=1e-12, atol=1e-12)


def test_nan_before_first_valid_step():
    values = GradientNoiseEstimator(num_groups=2).compute()
    for key in ("signal", "noise", "noise_scale", "signal_se"):
        assert torch.isnan(values[key]).all(), key


# ---------------------------------------------------------------------- (d) calibrated standard errors


def test_reported_standard_errors_are_calibrated():
    """Across 200 independent runs, the spread of the smoothed values matches the reported se (±20%)."""
    sizes, weights = CASES["ragged_lightning_1_over_K"]
    reps, steps = 200, 200
    model = GradientModel(seed=4, signal_scale=1.5)
    estimator = GradientNoiseEstimator(num_groups=reps, ema_decay=0.9)  # window ≈ 19 steps ≪ 200
    for small, applied in model.steps(steps, reps, sizes, weights):
        feed(estimator, small, applied, sizes, weights)
    values = estimator.compute()
    keys = ["signal", "noise", "noise_scale"]
    for key in keys:
        spread = float(values[key].std())
        reported = float(values[f"{key}_se"].mean())
        assert 0.8 < spread / reported < 1.25, f"{key}: spread {spread:.4g}, reported se {reported:.4g}"
    # The runs also agree with the truth, within the spread of their mean.
    for key, truth in (("signal", model.signal), ("noise", model.noise)):
        mean, se = mean_and_se(values[key])
        assert abs(mean - truth) < 4 * se


# ---------------------------------------------------------------------- (e) bad steps


def _state(estimator: GradientNoiseEstimator) -> dict[str, torch.Tensor]:
    return {
        name: getattr(estimator, name).clone() for name in ("moments", "updates", "skipped", "batch_size")
    }


def _assert_same_state(before: dict[str, torch.Tensor], estimator: GradientNoiseEstimator, **changed):
    for name, value in before.items():
        expected = value + changed.get(name, 0)
        assert torch.equal(getattr(estimator, name), expected), name


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["small", "applied"])
def test_non_finite_step_is_skipped_and_counted(bad, where):
    sizes, weights = CASES["equal"]
    model = GradientModel(seed=5)
    estimator = GradientNoiseEstimator(num_groups=2, ema_decay=0.9)
    reference = GradientNoiseEstimator(num_groups=2, ema_decay=0.9)
    small, applied = model.step(2, sizes, weights)
    feed(estimator, small, applied, sizes, weights)
    feed(reference, small, applied, sizes, weights)
    before = _state(estimator)

    small, applied = model.step(2, sizes, weights)
    if where == "small":
        small[1, 2] = bad
    else:
        applied[0] = bad
    feed(estimator, small, applied, sizes, weights)
    _assert_same_state(before, estimator, skipped=1)

    # The bad step's statistics do not leak into the next step.
    small, applied = model.step(2, sizes, weights)
    feed(estimator, small, applied, sizes, weights)
    feed(reference, small, applied, sizes, weights)
    for key, value in reference.compute().items():
        torch.testing.assert_close(estimator.compute()[key], value, rtol=1e-12, atol=0, msg=key)
    assert float(estimator.skipped) == 1 and float(reference.skipped) == 0


def test_single_small_gradient_leaves_state_untouched_and_is_not_skipped():
    model = GradientModel(seed=6)
    estimator = GradientNoiseEstimator(num_groups=2, ema_decay=0.9)
    small, applied = model.step(2, [4, 4], [0.5, 0.5])
    feed(estimator, small, applied, [4, 4], [0.5, 0.5])
    before = _state(estimator)
    small, applied = model.step(2, [8], [1.0])
    feed(estimator, small, applied, [8], [1.0])
    _assert_same_state(before, estimator)


def test_fresh_estimator_with_single_small_gradient_reports_nan():
    model = GradientModel(seed=6)
    estimator = GradientNoiseEstimator(num_groups=1)
    small, applied = model.step(1, [8], [1.0])
    feed(estimator, small, applied, [8], [1.0])
    assert float(estimator.updates) == 0 and float(estimator.skipped) == 0
    assert math.isnan(float(estimator.compute()["signal"][0]))


# ---------------------------------------------------------------------- (f) persistence


def _run(estimators, model: GradientModel, steps: int, sizes, weights, reps: int = 2):
    for _ in range(steps):
        small, applied = model.step(reps, sizes, weights)
        for estimator in estimators:
            feed(estimator, small, applied, sizes, weights)


def _assert_same_compute(a: GradientNoiseEstimator, b: GradientNoiseEstimator):
    values_a, values_b = a.compute(), b.compute()
    for key in values_a:
        torch.testing.assert_close(
            values_a[key], values_b[key], rtol=0, atol=0, msg=lambda message, key=key: f"{key}: {message}"
        )


def test_state_dict_round_trip_continues_identically():
    """Restore a state dict in memory, then keep feeding both the original and the restored copy."""
    sizes, weights = CASES["ragged_lightning_1_over_K"]
    model = GradientModel(seed=7)
    original = GradientNoiseEstimator(num_groups=2, ema_decay=0.9)
    uninterrupted = GradientNoiseEstimator(num_groups=2, ema_decay=0.9)
    _run([original, uninterrupted], model, 5, sizes, weights)
    restored = GradientNoiseEstimator(num_groups=2, ema_decay=0.9)
    restored.load_state_dict(original.state_dict())
    _run([original, restored, uninterrupted], model, 5, sizes, weights)
    _assert_same_compute(restored, uninterrupted)
    _assert_same_compute(original, uninterrupted)
    assert float(restored.updates) == float(uninterrupted.updates) == 10


def test_ema_decay_is_configuration_not_state():
    """The saved decay is recorded (the callback warns on a mismatch) but the constructor's decay is kept."""
    original = GradientNoiseEstimator(num_groups=1, ema_decay=0.9)
    restored = GradientNoiseEstimator(num_groups=1, ema_decay=0.5)
    restored.load_state_dict(original.state_dict())
    assert original.state_dict()["ema_decay"] == 0.9 and restored.ema_decay == 0.5


def test_state_dict_is_a_snapshot():
    """A saved state must not change when the estimator keeps training (e.g. a checkpoint kept in memory)."""
    sizes, weights = CASES["equal"]
    model = GradientModel(seed=8)
    estimator = GradientNoiseEstimator(num_groups=1, ema_decay=0.9)
    _run([estimator], model, 3, sizes, weights, reps=1)
    state = estimator.state_dict()
    saved = {key: value.clone() for key, value in state.items() if isinstance(value, torch.Tensor)}
    _run([estimator], model, 2, sizes, weights, reps=1)
    for key, value in saved.items():
        assert torch.equal(state[key], value), f"state_dict()[{key!r}] changed after more steps"


def test_state_dict_round_trip_through_a_file(tmp_path):
    sizes, weights = CASES["ragged_size_weighted"]
    model = GradientModel(seed=9)
    original = GradientNoiseEstimator(num_groups=2, ema_decay=0.8)
    _run([original], model, 4, sizes, weights)
    torch.save(original.state_dict(), tmp_path / "estimator.pt")
    restored = GradientNoiseEstimator(num_groups=2, ema_decay=0.8)
    restored.load_state_dict(torch.load(tmp_path / "estimator.pt"))
    _assert_same_compute(original, restored)
    _run([original, restored], model, 4, sizes, weights)
    _assert_same_compute(original, restored)


def test_load_state_dict_with_other_group_count_raises():
    state = GradientNoiseEstimator(num_groups=3).state_dict()
    with pytest.raises(ValueError, match="groups"):
        GradientNoiseEstimator(num_groups=2).load_state_dict(state)


# ---------------------------------------------------------------------- (g) distributed reduction


def test_all_reduce_over_two_simulated_ranks_matches_one_estimator():
    """Two ranks, two microbatches each, w = 1/(K·W): summing the step statistics over the ranks (in
    threads that meet in an all-reduce) gives exactly what one estimator fed all four gradients gives."""
    sizes, weights = [5, 7, 6, 2], [0.25] * 4  # ranks own microbatches [0, 1] and [2, 3]
    model = GradientModel(seed=10)
    ranks = [GradientNoiseEstimator(num_groups=3, ema_decay=0.9) for _ in range(2)]
    single = GradientNoiseEstimator(num_groups=3, ema_decay=0.9)

    barrier = threading.Barrier(2)
    shared: list[torch.Tensor | None] = [None, None]

    def all_reduce_for(rank: int):
        def all_reduce(stats: torch.Tensor) -> torch.Tensor:
            shared[rank] = stats.clone()
            barrier.wait()
            total = shared[0] + shared[1]
            barrier.wait()
            return total

        return all_reduce

    def rank_step(rank: int, small, applied, errors: list):
        try:
            own = slice(2 * rank, 2 * rank + 2)
            feed(ranks[rank], small[:, own], applied, sizes[own], weights[own], all_reduce_for(rank))
        except BaseException as error:  # surfaced in the main thread
            errors.append(error)
            barrier.abort()

    for _ in range(6):
        small, applied = model.step(3, sizes, weights)
        feed(single, small, applied, sizes, weights)
        errors: list = []
        threads = [threading.Thread(target=rank_step, args=(r, small, applied, errors)) for r in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors

    expected = single.compute()
    for estimator in ranks:
        for key, value in estimator.compute().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-12, atol=1e-12, msg=key)
    assert torch.equal(ranks[0].batch_size, single.batch_size)


# ---------------------------------------------------------------------- (h) derived values, validation


def test_noise_scale_and_ratio_are_ratios_of_smoothed_values():
    sizes, weights = CASES["ragged_lightning_1_over_K"]
    model = GradientModel(seed=11)
    estimator = GradientNoiseEstimator(num_groups=2, ema_decay=0.9)
    per_step = GradientNoiseEstimator(num_groups=2, ema_decay=0.0)
    per_step_scales = []
    for _ in range(20):
        small, applied = model.step(2, sizes, weights)
        feed(estimator, small, applied, sizes, weights)
        feed(per_step, small, applied, sizes, weights)
        per_step_scales.append(per_step.compute()["noise_scale"])
    values = estimator.compute()
    torch.testing.assert_close(values["noise_scale"], values["noise"] / values["signal"])
    # B_eff = 1 / Σ v_k²/b_k: Lightning's 1/K weights on ragged sizes give less than Σ b_k.
    b_eff = 1.0 / sum((1 / len(sizes)) ** 2 / b for b in sizes)
    assert b_eff < sum(sizes)
    torch.testing.assert_close(estimator.batch_size, torch.tensor(b_eff, dtype=F64))
    torch.testing.assert_close(values["ratio"], b_eff / values["noise_scale"])
    # Not an EMA of per-step ratios.
    ema_of_ratios = sum(0.9 ** (19 - i) * 0.1 * s for i, s in enumerate(per_step_scales)) / (1 - 0.9**20)
    assert not torch.allclose(values["noise_scale"], ema_of_ratios, rtol=1e-3)


@pytest.mark.parametrize("num_groups", [0, -1])
def test_rejects_bad_num_groups(num_groups):
    with pytest.raises(ValueError, match="num_groups"):
        GradientNoiseEstimator(num_groups=num_groups)


@pytest.mark.parametrize("ema_decay", [-0.1, 1.0, 1.5])
def test_rejects_ema_decay_out_of_range(ema_decay):
    with pytest.raises(ValueError, match="ema_decay"):
        GradientNoiseEstimator(num_groups=1, ema_decay=ema_decay)


def test_reset_forgets_history():
    model = GradientModel(seed=12)
    estimator = GradientNoiseEstimator(num_groups=1)
    _run([estimator], model, 3, [4, 4], [0.5, 0.5], reps=1)
    estimator.reset()
    assert float(estimator.updates) == 0 and torch.isnan(estimator.compute()["signal"]).all()
