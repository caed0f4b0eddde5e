"""The capacity term (snrmon.forecast.capacity, docs/theory.md "The capacity term"): the arithmetic against a
hand computation, and ``snr/capacity`` logged through a real small ``Trainer.fit`` with an ``SNRMonitor``."""

from __future__ import annotations

import math
import sys

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
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


# --- finding the monitor; LightningCLI ------------------------------------------------------------------


def test_the_trainers_monitor_is_found_by_prefix() -> None:
    monitor = SNRMonitor()
    capacity = CapacityLogger()  # no monitor given: the trainer's only SNRMonitor
    _fit([monitor, capacity], max_steps=15)
    assert capacity.monitor is monitor and capacity.latest["snr/capacity"] >= 0
    # Two monitors: the prefix chooses.
    first, second = SNRMonitor(), SNRMonitor(prefix="grad")
    capacity = CapacityLogger(prefix="grad")
    _fit([first, second, capacity], max_steps=15)
    assert capacity.monitor is second and "grad/capacity" in capacity.latest
    with pytest.raises(ValueError, match="not both"):
        CapacityLogger(SNRMonitor(), prefix="snr")


@pytest.mark.parametrize(
    "callbacks, message",
    [
        (lambda: [CapacityLogger()], "needs an SNRMonitor: there is none among the trainer's callbacks"),
        (lambda: [SNRMonitor(), SNRMonitor(prefix="b"), CapacityLogger()], "2 among .*'snr', 'b'.*prefix"),
        (lambda: [SNRMonitor(), CapacityLogger(prefix="grad")], "none with prefix 'grad'.*prefixes: 'snr'"),
        # A monitor of its own that the trainer never runs: it would measure nothing, and log nothing.
        (lambda: [SNRMonitor(), CapacityLogger(SNRMonitor())], "not among the trainer's callbacks"),
    ],
)
def test_a_logger_without_its_monitor_is_refused(callbacks, message) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        _fit(callbacks(), max_steps=2)


def count_rows(batch) -> int:
    """A batch_size_fn as people write them: annotated with a plain int."""
    return len(batch[0])


def rows_untyped(batch):
    """A batch_size_fn as people write them most: no annotation at all."""
    return len(batch[0])


def _cli(callbacks: list[dict]) -> LightningCLI:
    """The callbacks built by LightningCLI from a config (as from a YAML file), on a trainer like _fit's."""
    trainer = {
        "max_steps": 15,
        "accumulate_grad_batches": 2,
        "callbacks": callbacks,
        "logger": False,
        "log_every_n_steps": 5,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return LightningCLI(
        _Model, run=False, args={"trainer": trainer}, save_config_callback=None, seed_everything_default=False
    )


def test_lightning_cli_builds_the_monitor_and_its_capacity_logger(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # the config below is the whole command line
    monitor = {
        "class_path": "snrmon.callbacks.SNRMonitor",
        "init_args": {"batch_size_fn": "test_capacity.count_rows"},
    }
    capacity = {
        "class_path": "snrmon.callbacks.capacity.CapacityLogger",
        "init_args": {"tokens_per_sample": 10},
    }
    cli = _cli([monitor, capacity])
    built_monitor, built_capacity = cli.trainer.callbacks[:2]  # (Lightning appends its own after them)
    assert built_monitor.batch_size_fn is count_rows
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    cli.trainer.fit(cli.model, DataLoader(TensorDataset(x, x[:, :1]), batch_size=16, shuffle=True))
    assert built_capacity.monitor is built_monitor
    assert built_capacity.latest["snr/capacity/tokens"] == pytest.approx(built_capacity.meter.steps * 32 * 10)
    # A monitor written into the logger's config is a second object, outside the trainer: refused.
    capacity["init_args"]["monitor"] = {"class_path": "snrmon.callbacks.SNRMonitor"}
    cli = _cli([{"class_path": "snrmon.callbacks.SNRMonitor"}, capacity])
    with pytest.raises(MisconfigurationException, match="not among the trainer's callbacks"):
        cli.trainer.fit(cli.model, DataLoader(TensorDataset(x, x[:, :1]), batch_size=16))


def test_lightning_cli_takes_an_unannotated_batch_size_fn_and_an_infinite_dataset_size(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])
    init_args = {"batch_size_fn": "test_capacity.rows_untyped", "dataset_size": math.inf}  # a YAML `.inf`
    cli = _cli([{"class_path": "snrmon.callbacks.SNRMonitor", "init_args": init_args}])
    monitor = cli.trainer.callbacks[0]
    assert monitor.batch_size_fn is rows_untyped and monitor.dataset_size == math.inf
    # A whole number comes from the command line as a float: kept as the int it is (said, logged so).
    whole = {"class_path": "snrmon.callbacks.SNRMonitor", "init_args": {"dataset_size": 1000}}
    told = _cli([whole]).trainer.callbacks[0].dataset_size
    assert told == 1000 and type(told) is int
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    cli.trainer.fit(cli.model, DataLoader(TensorDataset(x, x[:, :1]), batch_size=16, shuffle=True))
    # Independent draws as told, though the loader shuffles a finite set: no finite-set values.
    assert monitor.latest["snr/batch_size"] == 32 and "snr/dataset_size" not in monitor.latest  # 2 x 16
