"""The capacity term (snrmon.forecast.capacity, docs/theory.md "The capacity term"): the arithmetic against a
hand computation, and ``snr/capacity`` logged through a real small ``Trainer.fit`` with an ``SNRMonitor``."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snrmon.callbacks import SNRMonitor
from snrmon.callbacks.capacity import CapacityLogger
from snrmon.forecast.capacity import CapacityMeter


def test_meter_matches_a_hand_computation() -> None:
    meter = CapacityMeter(dataset_size=1000)
    # 10 steps at η = 0.1, B = 32, |G|² = 2, tr(Σ) = 64; then 5 at η = 0.05, B = 32, |G|² = 1, tr(Σ) = 32.
    meter.update(10, signal=2.0, noise=64.0, lr=0.1, batch_size=32)
    terms = meter.update(5, signal=1.0, noise=32.0, lr=0.05, batch_size=32)
    signal_sum = 10 * 0.1 * 2.0 + 5 * 0.05 * 1.0  # 2.25
    noise_sum = 10 * 0.01 * 64 / 32 + 5 * 0.0025 * 32 / 32  # 0.2 + 0.0125
    assert terms.signal_sum == pytest.approx(signal_sum)
    assert terms.noise_sum == pytest.approx(noise_sum)
    assert terms.snr == pytest.approx(signal_sum / noise_sum)
    assert terms.capacity == pytest.approx(math.log2(1 + signal_sum / noise_sum))
    assert terms.steps == 15 and terms.tokens == 15 * 32
    assert terms.dataset_snr == pytest.approx(1000 * 1.0 / 32.0)  # from the latest measurement only
    assert terms.dataset_capacity == pytest.approx(math.log2(1 + 1000 / 32))


def test_meter_skips_non_finite_and_clamps_negative_signal() -> None:
    meter = CapacityMeter()
    assert meter.update(3, signal=math.nan, noise=1.0, lr=0.1, batch_size=4) is None
    assert meter.steps == 0  # left as it was
    terms = meter.update(2, signal=-0.5, noise=8.0, lr=0.1, batch_size=4, tokens=256)
    assert terms.signal_sum == 0 and terms.capacity == 0  # an unbiased |G|² below zero: no signal
    assert terms.tokens == 256
    assert math.isnan(terms.dataset_snr)  # fresh samples: no dataset SNR
    with pytest.raises(ValueError, match="dataset_size"):
        CapacityMeter(dataset_size=1)


class _Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    name, version = "recorder", 0

    @property
    def experiment(self):
        return self

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append((step, dict(metrics)))


def _fit(callbacks: list, max_steps: int, recorder: Logger | None = None) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x[:, :1] + 0.3 * torch.randn(256, 1)
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,  # two micro-batches per step: the monitor measures
        callbacks=callbacks,
        logger=recorder or False,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Model(), DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))


def test_capacity_logged_through_trainer_fit() -> None:
    monitor = SNRMonitor(log_details=True)  # the batch size is logged too: the sums are checked by hand below
    capacity = CapacityLogger(monitor, tokens_per_sample=10)
    recorder = _Recorder()
    _fit([monitor, capacity], max_steps=40, recorder=recorder)
    logged = [m for _, m in recorder.metrics if "snr/capacity" in m]
    assert len(logged) >= 5
    last = logged[-1]
    # The logged terms are consistent with one another and with the run: samples seen × tokens per sample.
    assert last["snr/capacity"] == pytest.approx(math.log2(1 + last["snr/capacity/snr"]))
    ratio = last["snr/capacity/signal_sum"] / last["snr/capacity/noise_sum"]
    assert last["snr/capacity/snr"] == pytest.approx(ratio)
    assert last["snr/capacity/tokens"] == pytest.approx(capacity.meter.steps * 32 * 10)
    assert capacity.meter.steps <= 40
    # A finite training set (read off the dataloader by the monitor): the dataset SNR is logged too.
    assert last["snr/capacity/dataset_snr"] >= 0
    # The sums grow from one estimate to the next: they accumulate every step's contribution.
    sums = [m["snr/capacity/noise_sum"] for m in logged]
    assert all(b > a for a, b in zip(sums, sums[1:], strict=False))
    # The first sums by hand from the monitor's values logged at the same step and the optimizer's η = 0.05.
    step, first = next((s, m) for s, m in recorder.metrics if "snr/capacity" in m)
    measured = next(m for s, m in recorder.metrics if s == step and "snr/noise" in m)
    steps = first["snr/capacity/tokens"] / (32 * 10)
    assert steps == int(steps) and steps >= 1
    expected_noise = steps * 0.05**2 * measured["snr/noise"] / measured["snr/batch_size"]
    assert first["snr/capacity/noise_sum"] == pytest.approx(expected_noise)
    assert first["snr/capacity/signal_sum"] == pytest.approx(steps * 0.05 * max(measured["snr/signal"], 0))


def test_logger_state_survives_a_resume() -> None:
    logger = CapacityLogger(SNRMonitor())
    logger.meter = CapacityMeter(dataset_size=500)
    logger.meter.update(4, signal=1.0, noise=10.0, lr=0.1, batch_size=8)
    logger._step = 4
    restored = CapacityLogger(SNRMonitor())
    restored.load_state_dict(logger.state_dict())
    assert restored.meter.state_dict() == logger.meter.state_dict()
    assert restored._step == 4
    # The next estimate continues the sums instead of starting over.
    terms = restored.meter.update(2, signal=1.0, noise=10.0, lr=0.1, batch_size=8)
    assert terms.signal_sum == pytest.approx(6 * 0.1 * 1.0)
    assert terms.dataset_snr == pytest.approx(500 * 1.0 / 10.0)


def test_tokens_from_a_counting_function() -> None:
    monitor = SNRMonitor()
    # Two loggers on one monitor (samples and tokens) are checkpointed side by side: distinct state keys.
    samples = CapacityLogger(monitor)
    tokens = CapacityLogger(monitor, count_tokens=lambda batch: 3 * len(batch[0]))
    assert samples.state_key != tokens.state_key
    _fit([monitor, samples, tokens], max_steps=15)
    assert tokens.meter.steps == samples.meter.steps >= 5
    assert tokens.latest["snr/capacity/tokens"] == pytest.approx(tokens.meter.steps * 32 * 3)
    assert samples.latest["snr/capacity/tokens"] == pytest.approx(samples.meter.steps * 32)
    assert tokens.latest["snr/capacity"] == pytest.approx(samples.latest["snr/capacity"])
