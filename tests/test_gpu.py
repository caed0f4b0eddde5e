"""GPU checks: the monitor's hot path never synchronises with the host, and AMP scaling is divided out.

Skipped without CUDA. Run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import contextlib
import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from snrmon.callbacks import SNRMonitor
from snrmon.measure.taps import GradientTaps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DIM, NOISE_STD = 16, 0.5


class GaussianRegression(Dataset):
    """Fresh samples y = x·w* + ε, x ~ N(0, I): an infinite population, so T1 holds exactly."""

    def __init__(self, length: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.w_star = torch.randn(DIM, generator=generator)
        self.x = torch.randn(length, DIM, generator=generator)
        self.y = self.x @ self.w_star + NOISE_STD * torch.randn(length, generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


class LeastSquares(L.LightningModule):
    def __init__(self, fused: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(DIM))
        self.fused = fused

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((x @ self.weight - y) ** 2).mean()

    def configure_optimizers(self):
        if self.fused:
            return torch.optim.Adam(self.parameters(), lr=0.0, fused=True)
        return torch.optim.SGD(self.parameters(), lr=0.0)


def truth(w_star: torch.Tensor) -> tuple[float, float]:
    """|G|² and tr Σ at w = 0 for per-sample gradient 2(x·w − y)x (Gaussian x, see test_ground_truth)."""
    delta_sq = float((w_star**2).sum())
    signal = 4 * delta_sq
    second_moment = 4 * ((DIM + 2) * delta_sq + DIM * NOISE_STD**2)
    return signal, second_moment - signal


@contextlib.contextmanager
def sync_errors():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def guard(function):
    @functools.wraps(function)
    def guarded(*args, **kwargs):
        with sync_errors():
            return function(*args, **kwargs)

    return guarded


@pytest.mark.parametrize(
    "precision, fused", [("32-true", False), ("16-mixed", False), ("16-mixed", True), ("bf16-mixed", False)]
)
def test_hot_path_is_sync_free_and_correct_on_gpu(monkeypatch, precision, fused):
    original_hook = GradientTaps._hook
    monkeypatch.setattr(GradientTaps, "_hook", lambda self, slot: guard(original_hook(self, slot)))
    monitor = SNRMonitor(ema_decay=0.99)
    hooks = ("on_train_batch_start", "on_before_zero_grad", "on_before_backward", "on_after_backward")
    for name in hooks + ("on_before_optimizer_step", "on_train_batch_end"):
        setattr(monitor, name, guard(getattr(monitor, name)))
    data = GaussianRegression(length=400 * 4 * 16)
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        precision=precision,
        max_steps=400,
        accumulate_grad_batches=4,
        log_every_n_steps=10**9,  # logging steps sync on purpose; keep them out of this test
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(LeastSquares(fused=fused), DataLoader(data, batch_size=16))

    assert not monitor._disabled, "a host sync (or another error) inside the monitor disabled it"
    values = {key: value[0].item() for key, value in monitor._estimator.compute().items()}
    signal, noise = truth(data.w_star)
    # bf16 rounds the inputs themselves, so allow for its ~0.4% relative error on top of the statistics.
    slack = 0.02 if precision == "bf16-mixed" else 0.0
    assert abs(values["signal"] - signal) < 4 * values["signal_se"] + slack * signal
    assert abs(values["noise"] - noise) < 4 * values["noise_se"] + slack * noise
    assert values["noise_se"] < 0.1 * noise


def test_a_host_tensor_batch_size_is_taken_for_a_gpu_model():
    # A batch_size_fn may return torch.tensor(len(batch)) on the host: copied to the model's device, not
    # refused (a tensor on another accelerator is).
    from snrmon import GradientMeter

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).cuda()
    meter = GradientMeter(model)
    numbers, tensors = [], []
    for sizes, record in (((8, 8), numbers), ((torch.tensor(8.0), torch.tensor(8.0)), tensors)):
        torch.manual_seed(1)
        for _ in range(3):
            for size in sizes:
                x = torch.randn(8, 4, device="cuda")
                (model(x).square().mean() / 2).backward()
                meter.after_backward(size)
            meter.before_step()
            model.zero_grad()
        record.append(meter.compute())
    assert tensors[0]["batch_size"] == numbers[0]["batch_size"] == 16
