"""End to end: SNRMonitor inside a real ``Trainer.fit`` against the true gradient signal and noise.

The optimizer is SGD with lr = 0, so the parameters stay fixed and every step measures the same |G|² and
tr Σ. Two kinds of ground truth:

* analytic: least squares with Gaussian inputs drawn fresh for every batch (an infinite population), where
  |G|² and tr Σ have closed forms;
* exact: a small MLP and a tiny transformer on a fixed finite dataset sampled *with replacement* (so the
  per-sample gradients are i.i.d. draws from the dataset's empirical distribution and T1 holds exactly),
  with per-example gradients over the whole dataset from ``torch.func``.

Every comparison is |monitor − truth| < 4·se with the monitor's own reported standard error, and each test
also checks that se is small against the value, so that the band can reject a wrong estimator.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler, TensorDataset

from snrmon.callbacks import SNRMonitor

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
        "ignore:.*does not have many workers.*",
        "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
    ),
    pytest.mark.usefixtures("one_thread"),
]

Z = 4.0  # the band, in reported standard errors


# ---------------------------------------------------------------------- shared machinery


def fit(module: L.LightningModule, loader: DataLoader, monitor: SNRMonitor, steps: int, **kwargs) -> None:
    """Train ``steps`` optimizer steps at lr = 0 and check that the parameters did not move."""
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[monitor],
        logger=False,
        log_every_n_steps=steps,  # the monitor logs, and fills `latest`, on the last step
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PossibleUserWarning)
        trainer.fit(module, loader)
    assert trainer.global_step == steps
    for old, new in zip(before, module.parameters(), strict=True):
        assert torch.equal(old, new), "lr = 0 must keep the parameters fixed"


class FixedParameters(L.LightningModule):
    """SGD with lr = 0: the gradient distribution is the same at every step."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def assert_matches(latest: dict[str, float], prefix: str, truth: dict[str, float], power: float = 0.1):
    """|estimate − truth| < Z·se for signal and noise, with se < ``power``·truth so the band is tight."""
    for key in ("signal", "noise"):
        value, se, expected = latest[f"{prefix}{key}"], latest[f"{prefix}{key}_se"], truth[key]
        assert 0 < se < power * abs(expected), f"{prefix}{key}: se {se:.4g} vs truth {expected:.4g}"
        assert abs(value - expected) < Z * se, (
            f"{prefix}{key}: monitor {value:.5g} ± {se:.3g}, truth {expected:.5g}"
        )


def truth_from_per_example(grads: torch.Tensor) -> dict[str, float]:
    """Signal |mean g|² and noise mean |g − mean g|² of per-example gradients [n, P] (float64)."""
    mean = grads.mean(0)
    return {"signal": float(mean.square().sum()), "noise": float((grads - mean).square().sum(1).mean())}


def per_example_gradients(module: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor):
    """``{name: [n, *shape]}`` gradients of the loss of each single example, via torch.func."""
    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss_of_one(p, x, y):
        return loss_fn(functional_call(module, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, targets)
    return {name: g.reshape(len(inputs), -1).double() for name, g in grads.items()}


def truth_for(grads: dict[str, torch.Tensor], names: list[str] | None = None) -> dict[str, float]:
    names = list(grads) if names is None else names
    return truth_from_per_example(torch.cat([grads[name] for name in names], 1))


def with_replacement(dataset: TensorDataset, batch_size: int, batches: int, seed: int) -> DataLoader:
    sampler = RandomSampler(
        dataset,
        replacement=True,
        num_samples=batch_size * batches,
        generator=torch.Generator().manual_seed(seed),
    )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


class RaggedBatches(Sampler[list[int]]):
    """Batches of cycling sizes, each drawn with replacement from ``n`` examples."""

    def __init__(self, n: int, sizes: list[int], batches: int, seed: int):
        self.n, self.sizes, self.batches, self.seed = n, sizes, batches, seed

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        for index in range(self.batches):
            size = self.sizes[index % len(self.sizes)]
            yield torch.randint(self.n, (size,), generator=generator).tolist()

    def __len__(self) -> int:
        return self.batches


# ---------------------------------------------------------------------- analytic: least squares

DIM, NOISE_STD, REGRESSION_BATCH = 8, 0.5, 32


class FreshGaussianBatches(IterableDataset):
    """Endless batches of fresh samples y = x·w* + ε, x ~ N(0, I_d), ε ~ N(0, σ²)."""

    def __init__(self, w_star: torch.Tensor, batch_size: int, seed: int):
        self.w_star, self.batch_size, self.seed = w_star, batch_size, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            x = torch.randn(self.batch_size, DIM, generator=generator)
            noise = NOISE_STD * torch.randn(self.batch_size, generator=generator)
            yield x, x @ self.w_star + noise


class LeastSquares(FixedParameters):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (x @ self.weight - y).square().mean()


def least_squares_truth(delta: torch.Tensor) -> dict[str, float]:
    """Closed forms at w = w* + Δ for the per-sample gradient g = 2(x·w − y)x = 2 r x, r = x·Δ − ε.

    G = E g = 2 E[x xᵀ] Δ = 2Δ, so |G|² = 4|Δ|². By Isserlis, E[(x·Δ)² |x|²] = (d + 2)|Δ|², and ε is
    independent with E ε² |x|² = dσ², so E|g|² = 4((d + 2)|Δ|² + dσ²) and tr Σ = E|g|² − |G|².
    """
    delta_sq = float(delta.double().square().sum())
    signal = 4 * delta_sq
    second_moment = 4 * ((DIM + 2) * delta_sq + DIM * NOISE_STD**2)
    return {"signal": signal, "noise": second_moment - signal}


@pytest.mark.parametrize("accumulate", [2, 4, 8])
def test_least_squares_matches_closed_form(accumulate):
    generator = torch.Generator().manual_seed(accumulate)
    w_star = torch.randn(DIM, generator=generator)
    delta = 0.4 * torch.randn(DIM, generator=generator)
    module = LeastSquares(w_star + delta)
    loader = DataLoader(FreshGaussianBatches(w_star, REGRESSION_BATCH, seed=accumulate), batch_size=None)
    monitor = SNRMonitor(ema_decay=0.99)
    fit(module, loader, monitor, steps=300, accumulate_grad_batches=accumulate)

    truth = least_squares_truth(delta)
    assert_matches(monitor.latest, "snr/", truth)
    assert monitor.latest["snr/batch_size"] == pytest.approx(accumulate * REGRESSION_BATCH)
    assert monitor.latest["snr/skipped_steps"] == 0
    # The derived values follow from the smoothed ones.
    noise_scale = monitor.latest["snr/noise"] / monitor.latest["snr/signal"]
    assert monitor.latest["snr/noise_scale"] == pytest.approx(noise_scale, rel=1e-9)
    assert monitor.latest["snr/ratio"] == pytest.approx(accumulate * REGRESSION_BATCH / noise_scale)
    true_scale = truth["noise"] / truth["signal"]
    assert abs(monitor.latest["snr/noise_scale"] - true_scale) < Z * monitor.latest["snr/noise_scale_se"]


# ---------------------------------------------------------------------- exact: MLP and transformer

MLP_EXAMPLES = 256


class MLP(FixedParameters):
    """6 → 16 → 3 classifier with tanh."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)  # a mean over the batch's samples


def mlp_problem(seed: int = 0) -> tuple[MLP, TensorDataset, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    module = MLP()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(MLP_EXAMPLES, 6, generator=generator)
    teacher = torch.randn(6, 3, generator=generator)
    y = (x @ teacher + torch.randn(MLP_EXAMPLES, 3, generator=generator)).argmax(1)
    grads = per_example_gradients(module, F.cross_entropy, x, y)
    return module, TensorDataset(x, y), grads


@pytest.fixture(scope="module")
def mlp_run():
    """One run: equal microbatches of 16, accumulation 4, groups by module (depth 1)."""
    module, dataset, grads = mlp_problem()
    steps, accumulate = 300, 4
    monitor = SNRMonitor(ema_decay=0.99, groups=1)
    loader = with_replacement(dataset, batch_size=16, batches=steps * accumulate, seed=1)
    fit(module, loader, monitor, steps=steps, accumulate_grad_batches=accumulate)
    return monitor.latest, grads


def test_mlp_matches_torch_func_truth(mlp_run):
    latest, grads = mlp_run
    assert_matches(latest, "snr/", truth_for(grads))
    assert latest["snr/batch_size"] == pytest.approx(64)


def test_mlp_groups_match_truth_restricted_to_their_coordinates(mlp_run):
    latest, grads = mlp_run
    for group in ("hidden", "out"):
        names = [name for name in grads if name.startswith(group + ".")]
        assert_matches(latest, f"snr/{group}/", truth_for(grads, names))


def test_mlp_group_values_sum_to_total(mlp_run):
    latest, _ = mlp_run
    for key in ("signal", "noise"):
        groups = latest[f"snr/hidden/{key}"] + latest[f"snr/out/{key}"]
        assert groups == pytest.approx(latest[f"snr/{key}"], rel=1e-9)


RAGGED_SIZES = [8, 3, 16, 5]


def test_ragged_microbatches_match_truth_and_naive_formula_does_not():
    """Lightning weights every microbatch by 1/K whatever its size; the weighted estimator (W3/W4)
    must still hit the truth, while T3 with the mean microbatch size is visibly outside the band."""
    module, dataset, grads = mlp_problem(seed=2)
    steps, accumulate = 300, len(RAGGED_SIZES)
    sampler = RaggedBatches(MLP_EXAMPLES, RAGGED_SIZES, batches=steps * accumulate, seed=3)
    monitor = SNRMonitor(ema_decay=0.99)
    fit(module, DataLoader(dataset, batch_sampler=sampler), monitor, steps, accumulate_grad_batches=4)

    truth = truth_for(grads)
    latest = monitor.latest
    assert_matches(latest, "snr/", truth)
    # B_eff = 1 / Σ v_k²/b_k with v_k = 1/K.
    inverse_sizes = sum(1 / b for b in RAGGED_SIZES)
    assert latest["snr/batch_size"] == pytest.approx(accumulate**2 / inverse_sizes)

    # What the naive estimator (mean size b̄, B = Σb, unweighted mean of |g_k|²) converges to, by T1:
    # E mean|g_k|² = S + N·mean(1/b_k) and E|G_B|² = S + N·Σ(1/b_k)/K².
    total = sum(RAGGED_SIZES)
    naive_noise = (
        truth["noise"]
        * (inverse_sizes / accumulate - inverse_sizes / accumulate**2)
        / (accumulate / total - 1 / total)
    )
    assert abs(naive_noise - latest["snr/noise"]) > Z * latest["snr/noise_se"], (
        "the band cannot tell the weighted estimator from the naive one"
    )


VOCAB, CONTEXT, WIDTH, TRANSFORMER_EXAMPLES = 12, 8, 16, 192


class TinyTransformer(FixedParameters):
    """Token + position embedding, one pre-LayerNorm causal self-attention block with an MLP, and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(0.1 * torch.randn(CONTEXT, WIDTH))
        self.attn_norm = nn.LayerNorm(WIDTH)
        self.attn_qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.attn_out = nn.Linear(WIDTH, WIDTH)
        self.mlp_norm = nn.LayerNorm(WIDTH)
        self.mlp_in = nn.Linear(WIDTH, 2 * WIDTH)
        self.mlp_out = nn.Linear(2 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", torch.ones(CONTEXT, CONTEXT).tril().bool(), persistent=False)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position[: tokens.shape[-1]]
        q, k, v = self.attn_qkv(self.attn_norm(h)).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(WIDTH)
        scores = scores.masked_fill(~self.mask, float("-inf"))
        h = h + self.attn_out(scores.softmax(-1) @ v)
        h = h + self.mlp_out(torch.tanh(self.mlp_in(self.mlp_norm(h))))
        return self.head(h)

    @staticmethod
    def loss(logits, targets):
        """Mean next-token loss; over equal-length sequences this is a mean over sequences (the samples)."""
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        return self.loss(self(tokens), targets)


def test_transformer_matches_torch_func_truth_per_group():
    torch.manual_seed(4)
    module = TinyTransformer()
    generator = torch.Generator().manual_seed(4)
    # Sequences with some structure (a noisy +1 counter) so the gradient has signal at init.
    start = torch.randint(VOCAB, (TRANSFORMER_EXAMPLES, 1), generator=generator)
    jumps = (torch.rand(TRANSFORMER_EXAMPLES, CONTEXT, generator=generator) < 0.8).long()
    sequence = torch.cat([start, start + jumps.cumsum(1)], 1) % VOCAB  # CONTEXT + 1 tokens
    tokens, targets = sequence[:, :-1], sequence[:, 1:]
    grads = per_example_gradients(module, TinyTransformer.loss, tokens, targets)
    assert 2000 < sum(p.numel() for p in module.parameters()) < 5000

    groups = {
        "attention": r"^attn_",
        "mlp": r"^mlp_",
        "embedding": r"^(embed|position)",
        "head": r"^head\.",
    }
    steps, accumulate = 250, 2
    monitor = SNRMonitor(ema_decay=0.99, groups=groups)
    loader = with_replacement(TensorDataset(tokens, targets), 16, steps * accumulate, seed=5)
    fit(module, loader, monitor, steps=steps, accumulate_grad_batches=accumulate)

    latest = monitor.latest
    assert_matches(latest, "snr/", truth_for(grads))
    prefixes = {"attention": "attn_", "mlp": "mlp_", "embedding": ("embed", "position"), "head": "head."}
    for group, prefix in prefixes.items():
        names = [name for name in grads if name.startswith(prefix)]
        assert names
        assert_matches(latest, f"snr/{group}/", truth_for(grads, names))
    # The groups partition the parameters, and signal and noise are sums over coordinates.
    for key in ("signal", "noise"):
        total = sum(latest[f"snr/{group}/{key}"] for group in groups)
        assert total == pytest.approx(latest[f"snr/{key}"], rel=1e-9)


# ---------------------------------------------------------------------- one batch size: the fallback


def test_split_batch_fallback_matches_truth():
    module, dataset, grads = mlp_problem(seed=6)
    steps = 600
    monitor = SNRMonitor(ema_decay=0.995, split_batch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "single batch size" warning when splitting
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        fit(module, with_replacement(dataset, 32, steps, seed=7), monitor, steps=steps)
    # Splitting gives close batch sizes (b_eff = 24, B = 32), so each step says less: a wider band.
    assert_matches(monitor.latest, "snr/", truth_for(grads), power=0.15)
    assert monitor.latest["snr/batch_size"] == pytest.approx(32)


def test_single_batch_without_split_warns_and_reports_nothing():
    module, dataset, _ = mlp_problem(seed=6)
    monitor = SNRMonitor(ema_decay=0.99)
    with pytest.warns(UserWarning, match="single batch size"):
        fit(module, with_replacement(dataset, 32, 10, seed=7), monitor, steps=10)
    signal = monitor.latest.get("snr/signal", math.nan)
    assert math.isnan(signal)
    assert monitor.latest.get("snr/skipped_steps", 0) == 0


# ---------------------------------------------------------------------- ragged epoch tail


@pytest.mark.parametrize(("samples_per_epoch", "tail"), [(80, 2), (72, 1)], ids=["tail_of_2", "tail_of_1"])
def test_ragged_epoch_tail_matches_truth_without_warning(samples_per_epoch, tail):
    """Batches of 8, accumulation 4: each epoch's last step has only ``tail`` microbatches. A tail of 2
    is a valid (smaller) step; a tail of 1 has no second batch size and is dropped, silently."""
    module, dataset, grads = mlp_problem(seed=8)
    batch, accumulate, epochs = 8, 4, 100
    steps_per_epoch = 3
    assert samples_per_epoch == batch * (2 * accumulate + tail)
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=samples_per_epoch, generator=torch.Generator().manual_seed(9)
    )
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler)  # fresh draws every epoch
    monitor = SNRMonitor(ema_decay=0.99)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(module, loader, monitor, steps=epochs * steps_per_epoch, accumulate_grad_batches=accumulate)

    assert [str(w.message) for w in record if "SNRMonitor" in str(w.message)] == []
    latest = monitor.latest
    valid_steps_per_epoch = steps_per_epoch if tail > 1 else steps_per_epoch - 1
    assert int(monitor._estimator.updates) == epochs * valid_steps_per_epoch
    assert latest["snr/skipped_steps"] == 0
    # The last step is an epoch's tail: B = 1 / Σ v_k²/b_k with v_k = 1/tail (a dropped tail keeps the
    # previous full step's value).
    assert latest["snr/batch_size"] == pytest.approx(batch * (tail if tail > 1 else accumulate))
    assert_matches(latest, "snr/", truth_for(grads))


# ---------------------------------------------------------------------- finite training sets (F1–F5)


def finite_set_truth(grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """The training set's own |G|², S² (per-sample variance, N − 1 denominator) and the finite-set values."""
    per_example = torch.cat(list(grads.values()), 1)
    n = len(per_example)
    mean = per_example.mean(0)
    signal = float(mean.square().sum())
    noise = float((per_example - mean).square().sum() / (n - 1))
    return {
        "signal": signal,
        "noise": noise,
        "signal_beyond_chance": signal - noise / n,
        "dataset_snr": n * signal / noise,
    }


def test_shuffled_finite_training_set_matches_exact_truth():
    """``DataLoader(shuffle=True)`` over N = 256 samples: the microbatches of a step are disjoint, so T2 alone
    is low by S²/N (F3). The monitor reads N off the loader and must hit the training set's exact |G|²; the
    uncorrected value must lie far outside its band, or the test could not tell the two apart."""
    module, dataset, grads = mlp_problem(seed=10)
    steps, accumulate, batch = 400, 4, 32  # 2 steps an epoch: 200 epochs, each a fresh permutation
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(11))
    monitor = SNRMonitor(ema_decay=0.99)
    fit(module, loader, monitor, steps=steps, accumulate_grad_batches=accumulate)

    truth, latest = finite_set_truth(grads), monitor.latest
    assert latest["snr/dataset_size"] == MLP_EXAMPLES
    assert_matches(latest, "snr/", truth)
    for key in ("signal_beyond_chance", "dataset_snr"):
        value, se = latest[f"snr/{key}"], latest[f"snr/{key}_se"]
        assert 0 < se < 0.1 * abs(truth[key]) and abs(value - truth[key]) < Z * se, (key, value, se, truth)
    uncorrected = latest["snr/signal"] - latest["snr/noise"] / MLP_EXAMPLES
    assert abs(uncorrected - truth["signal"]) > 2 * Z * latest["snr/signal_se"], "the band misses the bias"


@pytest.mark.parametrize(
    "shuffle, cut",
    [(False, {"limit_train_batches": 4}), (True, {"overfit_batches": 4})],  # (overfit: Lightning unshuffles)
)
def test_an_epoch_cut_to_its_first_batches_is_the_training_set(shuffle: bool, cut: dict):
    """An in-order loader cut to its first 4 batches of 32 (``limit_train_batches``; ``overfit_batches``, for
    which Lightning turns shuffling off) reads the same 128 samples every step: they are N, not the 256 of the
    data set. Each step's 4 microbatches are then the whole training set, so the corrected signal is its
    exact |G|² at every step; with N = 256 it would be low by S²/256."""
    module, dataset, grads = mlp_problem(seed=12)
    loader = DataLoader(dataset, batch_size=32, shuffle=shuffle)
    monitor = SNRMonitor(ema_decay=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # overfit_batches: "turning off the shuffling for you"
        fit(module, loader, monitor, steps=20, accumulate_grad_batches=4, **cut)

    truth = finite_set_truth({name: g[:128] for name, g in grads.items()})
    latest = monitor.latest
    assert latest["snr/dataset_size"] == 128
    assert latest["snr/signal"] == pytest.approx(truth["signal"], rel=1e-4)
    assert truth["noise"] / 256 > 0.01 * truth["signal"]  # what N = 256 would take off: well outside rel


# ---------------------------------------------------------------------- windows the optimizer never applies


class SkipsEveryOtherStep(LeastSquares):
    """Steps the optimizer on every other accumulation window only; on the others it runs the closure
    alone (the pattern Lightning documents), so those windows' gradients are zeroed without being applied."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.windows = 0

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self.windows += 1
        if self.windows % 2:
            optimizer_closure()
        else:
            optimizer.step(closure=optimizer_closure)


class FreshEveryEpoch(FreshGaussianBatches):
    def __iter__(self):
        self.seed += 1000  # each epoch a new stream
        return super().__iter__()


class CutsEveryEpochShort(LeastSquares):
    """``on_train_batch_start`` returns -1 at batch 6: each epoch is one full window of 4 microbatches and a
    window of 2 that never reaches the optimizer."""

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 6 else None


@pytest.mark.parametrize("pattern", ["skipped_optimizer_step", "epoch_cut_short"])
def test_windows_the_optimizer_never_applies_are_dropped_and_counted(pattern):
    generator = torch.Generator().manual_seed(5)
    w_star = torch.randn(DIM, generator=generator)
    delta = 0.4 * torch.randn(DIM, generator=generator)
    steps, accumulate = 200, 4
    if pattern == "skipped_optimizer_step":
        module = SkipsEveryOtherStep(w_star + delta)
        loader = DataLoader(FreshGaussianBatches(w_star, REGRESSION_BATCH, seed=6), batch_size=None)
    else:
        module = CutsEveryEpochShort(w_star + delta)
        loader = DataLoader(FreshEveryEpoch(w_star, REGRESSION_BATCH, seed=6), batch_size=None)
    monitor = SNRMonitor(ema_decay=0.99)
    fit(module, loader, monitor, steps=steps, accumulate_grad_batches=accumulate)

    latest = monitor.latest
    assert_matches(latest, "snr/", least_squares_truth(delta))
    assert latest["snr/batch_size"] == pytest.approx(accumulate * REGRESSION_BATCH)
    # Lightning counts a window whose optimizer_step skipped optimizer.step() as a step: half of the windows
    # are applied and measured, the other half dropped. A window cut short never reaches optimizer_step: one
    # per epoch is dropped, when the next epoch zeroes the gradients (the last epoch ends before its cut).
    if pattern == "skipped_optimizer_step":
        applied, dropped = steps // 2, steps // 2
    else:
        applied, dropped = steps, steps - 1
    assert int(monitor._estimator.updates) == applied
    assert latest["snr/dropped_windows"] == dropped
