"""SNRMonitor inside a real ``lightning.Trainer.fit`` on CPU, through the public API.

Each test trains a small model for a few steps. Helpers live in this file (it owns them); there is no
conftest. Tolerances on estimates come from the monitor's own standard errors (``*_se``), never from
numbers copied out of a run.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
import math
import pickle
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    Callback,
    GradientAccumulationScheduler,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import snrmon
import snrmon.callbacks
from snrmon import GradientNoiseEstimator, GradientTaps
from snrmon.callbacks import SNRMonitor

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

VALUE_KEYS = ["signal", "noise", "noise_scale", "ratio"]
VALUE_KEYS += [f"{key}_se" for key in VALUE_KEYS]
FINITE_KEYS = ["signal_beyond_chance", "signal_beyond_chance_se", "dataset_snr", "dataset_snr_se"]
COUNTERS = ["snr/batch_size", "snr/skipped_steps", "snr/dropped_windows"]
TOTAL_KEYS = [f"snr/{key}" for key in VALUE_KEYS] + COUNTERS
FINITE_TOTAL_KEYS = TOTAL_KEYS + [f"snr/{key}" for key in FINITE_KEYS] + ["snr/dataset_size"]
# What the loggers get without log_details: the values, not their standard errors nor the counters.
LOGGED_VALUES = ["signal", "noise", "noise_scale", "ratio"]
LOGGED_TOTAL_KEYS = [f"snr/{key}" for key in LOGGED_VALUES + ["signal_beyond_chance", "dataset_snr"]]


# ---------------------------------------------------------------------- helpers
class Regression(L.LightningModule):
    """A one-hidden-layer MLP on a regression task; the loss is a mean over the batch's samples.

    Top-level layers ``hidden`` and ``out`` make ``SNRMonitor(groups=1)`` report two groups.
    ``loss_factors`` maps a ``batch_idx`` to a factor the loss is multiplied by (fault injection).
    ``losses`` collects every training loss Lightning saw, one per microbatch.
    """

    def __init__(self, lr: float = 0.05, dropout: float = 0.0, fused_adam: bool = False):
        super().__init__()
        self.hidden = nn.Linear(4, 16)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(16, 1)
        self.lr = lr
        self.fused_adam = fused_adam
        self.loss_factors: dict[int, float] = {}
        self.losses: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.dropout(torch.tanh(self.hidden(x)))).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if batch_idx in self.loss_factors:
            loss = loss * self.loss_factors[batch_idx]
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Only Lightning's own training_step calls reach this hook (not the split-batch extra call).
        self.losses.append(outputs["loss"].detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.fused_adam:
            return torch.optim.Adam(params, lr=self.lr, fused=True)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9)


def regression_loader(n: int = 256, batch_size: int = 8, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.randn(4, generator=generator) + 0.5 * torch.randn(n, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def make_trainer(monitor: SNRMonitor | None = None, **kwargs: Any) -> L.Trainer:
    callbacks = list(kwargs.pop("callbacks", []))
    if monitor is not None:
        callbacks.insert(0, monitor)
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=10,
        logger=False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


@contextlib.contextmanager
def record_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning (repeats included), without requiring that there be any."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record


def train_with_and_without(
    make_model: Callable[[], Regression], monitor: SNRMonitor, **trainer_kwargs: Any
) -> tuple[Regression, Regression]:
    """Two 8-step fits from the same seeds (torch, Python, NumPy: init, dropout, shuffled order), without and
    with ``monitor``: the models, whose ``losses`` must be bit-identical."""
    import random

    import numpy as np

    def train(callback: SNRMonitor | None) -> Regression:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        model = make_model()
        make_trainer(callback, max_steps=8, **trainer_kwargs).fit(model, regression_loader(shuffle=True))
        return model

    return train(None), train(monitor)


def snr_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "SNRMonitor" in str(w.message)]


# snrmon's own source folders; snrmon.callbacks is installed from callbacks/ (pyproject's package-dir).
SNRMON_SOURCES = [Path(snrmon.__file__).resolve().parent, Path(snrmon.callbacks.__file__).resolve().parent]


def raised_by_snrmon(warning: warnings.WarningMessage) -> bool:
    """Whether ``warning`` comes from one of snrmon's modules, by where its file is, not by a substring of
    its path: a clone named ``snrmon`` holds ``.venv/lib/.../lightning`` too."""
    path = Path(warning.filename).resolve()
    return any(path.is_relative_to(source) for source in SNRMON_SOURCES)


def group_keys(group: str, finite: bool = False) -> list[str]:
    return [f"snr/{group}/{key}" for key in VALUE_KEYS + (FINITE_KEYS if finite else [])]


def assert_finite_estimates(latest: dict[str, float]) -> None:
    for key in ("snr/signal", "snr/noise", "snr/signal_se", "snr/noise_se", "snr/batch_size"):
        assert math.isfinite(latest[key]), (key, latest[key])


def assert_within_se(estimate: dict[str, float], reference: dict[str, float], sigmas=4.0) -> None:
    """Signal and noise of two runs agree within ``sigmas`` standard errors of the reference."""
    for key in ("snr/signal", "snr/noise"):
        se = reference[f"{key}_se"]
        assert se > 0
        assert abs(estimate[key] - reference[key]) < sigmas * se, (key, estimate, reference)


# ---------------------------------------------------------------------- 1, 2: what gets logged
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size_fn": 5}, "batch_size_fn must be None or a function"),
        ({"split_batch": "yes"}, "split_batch must be True or False"),
        ({"log_details": 1}, "log_details must be True or False"),
    ],
)
def test_bad_arguments_are_refused_when_the_monitor_is_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SNRMonitor(**kwargs)


def test_numpy_numbers_are_taken_as_the_numbers_they_are():
    monitor = SNRMonitor(every_n_steps=np.int64(2), ema_decay=np.float32(0.5), dataset_size=np.int64(1000))
    assert (monitor.every_n_steps, monitor.ema_decay, monitor.dataset_size) == (2, 0.5, 1000)
    assert type(monitor.every_n_steps) is int and type(monitor.dataset_size) is int


def test_tensorboard_names_steps_layout_and_latest(tmp_path: Path):
    monitor = SNRMonitor(groups=1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    max_steps, every = 20, 5
    trainer = make_trainer(
        monitor,
        logger=logger,
        log_every_n_steps=every,
        max_steps=max_steps,
        accumulate_grad_batches=2,
    )
    trainer.fit(Regression(), regression_loader())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    # A map-style dataset read in order: a finite training set, so the finite-set values are kept too.
    # `latest` holds every number; the loggers get the values (standard errors and counters: log_details).
    complete = FINITE_TOTAL_KEYS + group_keys("hidden", finite=True) + group_keys("out", finite=True)
    assert set(monitor.latest) == set(complete)
    groups = [f"snr/{group}/{key}" for group in ("hidden", "out") for key in LOGGED_VALUES]
    expected = LOGGED_TOTAL_KEYS + groups
    tags = events.Tags()["scalars"]
    assert {tag for tag in tags if tag.startswith("snr/")} == set(expected)

    # Logged exactly where Lightning logs the module's own on_step metrics.
    lightning_steps = [event.step for event in events.Scalars("train/loss")]
    assert lightning_steps == [s for s in range(max_steps) if (s + 1) % every == 0]
    for name in expected:
        scalars = events.Scalars(name)
        assert [event.step for event in scalars] == lightning_steps, name
        # `latest` holds the last logged values (TensorBoard stores float32).
        assert scalars[-1].value == pytest.approx(monitor.latest[name], rel=1e-6, nan_ok=True)

    # The custom-scalars layout is written, and each chart's regex matches logged SNR tags.
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    assert "custom_scalars__config__" in events.PluginTagToContent("custom_scalars")
    proto = events.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(proto).item())
    charts = [chart for category in layout.category for chart in category.chart]
    regexes = [regex for chart in charts for regex in chart.multiline.tag]
    regexes += [series.value for chart in charts for series in chart.margin.series]
    # (The SNR is drawn as its log, a TensorBoard-only series; more in test_tensorboard.py.)
    for tag in ("snr/signal", "snr/noise", "snr/noise_scale", "~snr/log10_ratio"):
        assert any(re.fullmatch(regex, tag) for regex in regexes), tag

    assert "snr/ratio" in trainer.progress_bar_metrics
    assert float(trainer.progress_bar_metrics["snr/ratio"]) == pytest.approx(
        monitor.latest["snr/ratio"], rel=1e-6
    )
    assert_finite_estimates(monitor.latest)


def test_csv_logger_receives_values_and_with_log_details_everything(tmp_path: Path):
    monitor = SNRMonitor(log_details=True)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(
        monitor, logger=logger, log_every_n_steps=4, max_steps=12, accumulate_grad_batches=2
    )
    trainer.fit(Regression(), regression_loader())

    with open(Path(logger.log_dir) / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    snr_rows = [row for row in rows if row.get("snr/signal")]
    loss_steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    expected_steps = [s for s in range(12) if (s + 1) % 4 == 0]
    assert [int(row["step"]) for row in snr_rows] == loss_steps == expected_steps
    assert {key for key in snr_rows[-1] if key.startswith("snr/")} == set(monitor.latest)
    for key in TOTAL_KEYS:
        assert float(snr_rows[-1][key]) == pytest.approx(monitor.latest[key], nan_ok=True), key
    assert_finite_estimates(monitor.latest)


def test_a_fit_shorter_than_log_every_n_steps_reports_its_values_at_the_end(tmp_path: Path):
    """Three steps, logging every 50: Lightning never reaches a logging step, the monitor reports once at
    the end (at the last step), so `latest` is not silently empty."""
    monitor = SNRMonitor()
    logger = CSVLogger(tmp_path, name="csv")
    make_trainer(monitor, logger=logger, log_every_n_steps=50, max_steps=3, accumulate_grad_batches=2).fit(
        Regression(), regression_loader()
    )
    assert_finite_estimates(monitor.latest)
    rows = [row for row in csv_rows(logger) if row.get("snr/signal")]
    assert [int(row["step"]) for row in rows] == [2]
    assert float(rows[0]["snr/signal"]) == pytest.approx(monitor.latest["snr/signal"])


def same_state(a: Any, b: Any) -> bool:
    """Whether two states (nested dicts and lists of tensors and plain values) hold the same values."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b or (a != a and b != b)  # (NaN equals NaN here)


def test_a_monitor_pickles_after_a_fit_carrying_its_state():
    """The meter of a fit (tensor hooks, the trainer's optimizers) is no state to pickle: a pickled copy
    carries the meter's state, as a checkpoint does, and goes on from it in a fit that goes on."""
    monitor = SNRMonitor()
    trainer = make_trainer(monitor, max_steps=6, accumulate_grad_batches=2)
    trainer.fit(Regression(), regression_loader())
    copy = pickle.loads(pickle.dumps(monitor))
    saved = monitor.state_dict()
    assert saved and same_state(copy.state_dict(), saved)
    assert copy.latest == monitor.latest
    make_trainer(copy, max_steps=6, accumulate_grad_batches=2).fit(Regression(), regression_loader())
    assert_finite_estimates(copy.latest)
    # The same trainer fitted on with the copy in the monitor's place: its EMAs go on from the carried state.
    model, loader = Regression(), regression_loader()
    trainer = make_trainer(monitor, max_steps=6, accumulate_grad_batches=2)
    trainer.fit(model, loader)
    copy = pickle.loads(pickle.dumps(monitor))
    trainer.callbacks = [copy if callback is monitor else callback for callback in trainer.callbacks]
    trainer.fit_loop.epoch_loop.max_steps = 10
    trainer.fit(model, loader)
    assert int(copy.state_dict()["estimator"]["updates"]) == 10  # 6 carried, 4 more


def test_a_fit_that_measured_no_step_says_why_latest_is_empty():
    """`fast_dev_run` with accumulation 2: one microbatch, the shorter last window of its epoch, measures no
    step; `latest` is empty, said once (not silently), and said again by the next fit of the same monitor
    that measures nothing (a warning is once per fit, not once per monitor)."""
    monitor = SNRMonitor()
    for _ in range(2):
        with record_warnings() as record:
            trainer = make_trainer(monitor, fast_dev_run=True, accumulate_grad_batches=2)
            trainer.fit(Regression(), regression_loader())
        assert monitor.latest == {}
        said = [m for m in snr_warnings(record) if "no optimizer step of this fit was measured" in m]
        assert len(said) == 1 and "shorter last window" in said[0]


class SkipsBatches(Regression):
    """`training_step` returns None for the batches in ``skipped`` (Lightning's documented way to skip)."""

    def __init__(self, skipped: set[int]):
        super().__init__()
        self.skipped = skipped

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return None if batch_idx in self.skipped else super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass  # (no loss to collect from a skipped batch)


@pytest.mark.parametrize(
    "options", [{"accumulate_grad_batches": 2}, {"split_batch": True}], ids=["accumulate", "split_batch"]
)
def test_a_window_whose_every_batch_is_skipped_is_left_out_and_the_others_measured(options: dict):
    """A window of batches whose `training_step` returned None has nothing to measure: left out, the monitor
    goes on (it switched itself off at such a step in a first version of the meter's stricter check)."""
    split = options.pop("split_batch", False)
    monitor = SNRMonitor(split_batch=split)
    skipped = {2, 3} if not split else {2}  # the second step's window
    with record_warnings() as record:
        trainer = make_trainer(monitor, max_steps=6, **options)
        trainer.fit(SkipsBatches(skipped), regression_loader())
    assert not snr_warnings(record) and monitor._disabled is False
    assert int(monitor._estimator.updates) == trainer.global_step - 1 >= 4
    assert_finite_estimates(monitor.latest)


# ---------------------------------------------------------------------- 3: training is unchanged
@pytest.mark.parametrize(
    ("accumulate", "split_batch"), [(4, False), (1, True)], ids=["accumulate4", "split_batch"]
)
def test_training_is_bit_identical_with_and_without_monitor(accumulate: int, split_batch: bool):
    monitor = SNRMonitor(split_batch=split_batch)
    plain, monitored = train_with_and_without(
        lambda: Regression(dropout=0.2), monitor, accumulate_grad_batches=accumulate
    )

    assert int(monitor._estimator.updates) == 8  # the monitor really measured every step
    assert len(plain.losses) == len(monitored.losses) == 8 * accumulate
    assert all(torch.equal(a, b) for a, b in zip(plain.losses, monitored.losses, strict=True))
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------- 4: every_n_steps
class HandleProbe(Regression):
    """Records (optimizer step, number of gradient hooks installed) as each backward starts: hooks cost only
    while a backward runs."""

    def __init__(self, monitor: SNRMonitor):
        super().__init__()
        self.monitor = monitor
        self.hooks_seen: list[tuple[int, int]] = []

    def on_before_backward(self, loss: Tensor) -> None:
        hooks = sum(len(p._backward_hooks or {}) for p in self.parameters())
        self.hooks_seen.append((self.trainer.global_step, hooks))


def test_every_n_steps_installs_hooks_only_on_measured_steps():
    monitor = SNRMonitor(every_n_steps=3)
    model = HandleProbe(monitor)
    max_steps, accumulate = 9, 2
    make_trainer(monitor, max_steps=max_steps, accumulate_grad_batches=accumulate).fit(
        model, regression_loader()
    )

    num_parameters = len(list(model.parameters()))
    expected = [
        (step, num_parameters if step % 3 == 0 else 0) for step in range(max_steps) for _ in range(accumulate)
    ]
    assert model.hooks_seen == expected
    measured = sum(1 for step in range(max_steps) if step % 3 == 0)
    assert int(monitor._estimator.updates) == measured
    assert not monitor._taps.attached  # removed at the end of fit
    assert_finite_estimates(monitor.latest)


# ---------------------------------------------------------------------- 5: changing accumulation
class LatestPerEpoch(Callback):
    def __init__(self, monitor: SNRMonitor):
        self.monitor = monitor
        self.per_epoch: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.per_epoch.append(dict(self.monitor.latest))


def test_gradient_accumulation_scheduler_changes_batch_size():
    monitor = SNRMonitor()
    recorder = LatestPerEpoch(monitor)
    batch_size, scheduling = 8, {0: 2, 1: 4}
    trainer = make_trainer(
        monitor,
        max_steps=-1,
        max_epochs=2,
        callbacks=[GradientAccumulationScheduler(scheduling), recorder],
    )
    with record_warnings() as record:
        trainer.fit(Regression(), regression_loader(n=128, batch_size=batch_size))

    assert not snr_warnings(record)
    assert [latest["snr/batch_size"] for latest in recorder.per_epoch] == [
        batch_size * scheduling[0],
        batch_size * scheduling[1],
    ]
    for latest in recorder.per_epoch:
        assert_finite_estimates(latest)


def test_the_training_set_is_announced_once_measuring_starts(caplog):
    """A scheduler that gives two batch sizes only from the second epoch: the training set N was never said,
    though the monitor's `dataset_snr` (the stopper's evidence) is corrected with it."""
    monitor = SNRMonitor()
    trainer = make_trainer(
        monitor, max_steps=-1, max_epochs=2, callbacks=[GradientAccumulationScheduler({0: 1, 1: 2})]
    )
    with record_warnings(), caplog.at_level(logging.INFO):
        trainer.fit(Regression(), regression_loader(n=64, batch_size=8))
    said = [r.getMessage() for r in caplog.records if "training set of N = 64 samples" in r.getMessage()]
    assert len(said) == 1
    assert_finite_estimates(monitor.latest)


# ---------------------------------------------------------------------- 6: resume
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_from_checkpoint_continues_the_estimates(tmp_path: Path):
    accumulate, batches_per_epoch = 2, 12  # 6 optimizer steps per epoch

    def fit(max_epochs: int, ckpt_path: str | None = None, checkpoint=None) -> SNRMonitor:
        torch.manual_seed(0)
        monitor = SNRMonitor(groups=1)
        callbacks = [checkpoint] if checkpoint is not None else []
        trainer = make_trainer(
            monitor,
            max_steps=-1,
            max_epochs=max_epochs,
            accumulate_grad_batches=accumulate,
            callbacks=callbacks,
            enable_checkpointing=checkpoint is not None,
        )
        trainer.fit(Regression(), regression_loader(n=8 * batches_per_epoch), ckpt_path=ckpt_path)
        return monitor

    uninterrupted = fit(max_epochs=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    first_half = fit(max_epochs=1, checkpoint=checkpoint)
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert len(saved) == 1 and "step=6" in saved[0].name
    assert int(first_half._estimator.updates) == 6
    resumed = fit(max_epochs=2, ckpt_path=str(saved[0]))

    a, b = uninterrupted._estimator, resumed._estimator
    assert int(b.updates) == 12
    for name in ("moments", "updates", "skipped", "batch_size"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert resumed.latest.keys() == uninterrupted.latest.keys()
    for key, value in uninterrupted.latest.items():
        assert resumed.latest[key] == pytest.approx(value, rel=1e-12, abs=0, nan_ok=True), key


# ---------------------------------------------------------------------- 7: mixed precision
def lr0_estimates(**trainer_kwargs: Any) -> tuple[dict[str, float], L.Trainer]:
    """Estimates at lr = 0 (fixed parameters) on a fixed data order: runs differ only in numerics."""
    fused_adam = trainer_kwargs.pop("fused_adam", False)
    torch.manual_seed(0)
    monitor = SNRMonitor()
    trainer = make_trainer(monitor, max_steps=30, accumulate_grad_batches=4, **trainer_kwargs)
    with record_warnings() as record:
        trainer.fit(Regression(lr=0.0, fused_adam=fused_adam), regression_loader(n=1024))
    assert not snr_warnings(record)
    assert_finite_estimates(monitor.latest)
    return monitor.latest, trainer


def fp16_plugin(init_scale: float = 2.0**10) -> MixedPrecision:
    """fp16 autocast with a real gradient scaler, on CPU (Lightning accepts the plugin as given)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return MixedPrecision("16-mixed", device="cpu", scaler=scaler)


def test_bf16_mixed_matches_fp32():
    reference, _ = lr0_estimates()
    bf16, trainer = lr0_estimates(precision="bf16-mixed")
    assert trainer.precision == "bf16-mixed"
    assert_within_se(bf16, reference)


@pytest.mark.parametrize("fused_adam", [False, True], ids=["sgd", "fused_adam"])
def test_fp16_loss_scale_is_divided_out(fused_adam: bool):
    if fused_adam:
        try:
            torch.optim.Adam([nn.Parameter(torch.zeros(1))], fused=True)
        except (RuntimeError, ValueError) as error:
            pytest.skip(f"fused Adam is not supported on CPU here: {error}")
    reference, _ = lr0_estimates(fused_adam=fused_adam)
    scaled, trainer = lr0_estimates(plugins=[fp16_plugin()], fused_adam=fused_adam)
    # The scale was really in play (no overflow shrank it to 1), so an un-divided scale would be
    # off by a factor 2**20 in signal and noise.
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**10
    assert_within_se(scaled, reference)


def test_fp16_overflow_step_is_skipped():
    torch.manual_seed(0)
    monitor = SNRMonitor()
    model = Regression()
    accumulate, overflow_step = 2, 3
    model.loss_factors = {overflow_step * accumulate: 1e30}  # first microbatch of step 3
    trainer = make_trainer(monitor, max_steps=10, accumulate_grad_batches=accumulate, plugins=[fp16_plugin()])
    with record_warnings() as record:
        trainer.fit(model, regression_loader())

    assert not snr_warnings(record)
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**9  # the scaler saw one overflow
    assert trainer.global_step == 10
    assert monitor.latest["snr/skipped_steps"] == 1
    assert int(monitor._estimator.updates) == 9
    assert torch.isfinite(monitor._estimator.moments).all()
    assert_finite_estimates(monitor.latest)


# ---------------------------------------------------------------------- 8: no host sync
class HostSyncGuard:
    """Makes ``Tensor.item`` & co. raise, but only while code wrapped by :meth:`wrap` runs."""

    SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.active = 0
        self.calls: dict[str, int] = {}
        self.violations: list[str] = []
        for name in self.SYNCING:
            monkeypatch.setattr(torch.Tensor, name, self._forbid(name, getattr(torch.Tensor, name)))

    def _forbid(self, name: str, original: Callable) -> Callable:
        def forbidden(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.violations.append(name)
                raise RuntimeError(f"host sync: Tensor.{name} called on the monitor's hot path")
            return original(tensor, *args, **kwargs)

        return forbidden

    def wrap(self, fn: Callable, label: str) -> Callable:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.calls[label] = self.calls.get(label, 0) + 1
            self.active += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.active -= 1

        return guarded


def test_no_host_sync_on_non_logging_steps(monkeypatch: pytest.MonkeyPatch):
    guard = HostSyncGuard(monkeypatch)
    with pytest.raises(RuntimeError, match="host sync"):  # the guard works
        guard.wrap(lambda: torch.ones(()).item(), "self-check")()
    guard.violations.clear()

    monitor = SNRMonitor()
    for hook in ("on_train_batch_start", "on_after_backward", "on_before_optimizer_step"):
        setattr(monitor, hook, guard.wrap(getattr(monitor, hook), hook))
    make_hook = GradientTaps._hook
    monkeypatch.setattr(GradientTaps, "_hook", lambda taps, slot: guard.wrap(make_hook(taps, slot), "tap"))

    trainer = make_trainer(monitor, max_steps=12, accumulate_grad_batches=2, log_every_n_steps=1000)
    with record_warnings() as record:
        trainer.fit(Regression(), regression_loader())

    assert guard.violations == []
    assert not snr_warnings(record)
    assert monitor._disabled is False
    assert trainer.global_step == 12
    assert guard.calls["tap"] == 12 * 2 * 4  # every microbatch, every parameter
    assert guard.calls["on_after_backward"] == 24
    assert int(monitor._estimator.updates) == 12
    values = monitor._estimator.compute()
    assert torch.isfinite(values["signal"]).all() and torch.isfinite(values["noise"]).all()


# ---------------------------------------------------------------------- 9: bad input never crashes
class SanitizedRegression(Regression):
    """Zeroes non-finite gradients after the monitor has seen them, so training can go on."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def test_nan_gradient_step_is_counted_and_skipped():
    torch.manual_seed(0)
    monitor = SNRMonitor()
    model = SanitizedRegression()
    model.loss_factors = {5: float("nan")}  # second microbatch of step 2
    trainer = make_trainer(monitor, max_steps=10, accumulate_grad_batches=2)
    with record_warnings() as record:
        trainer.fit(model, regression_loader())

    assert not snr_warnings(record)
    assert trainer.global_step == 10
    assert monitor.latest["snr/skipped_steps"] == 1
    assert int(monitor._estimator.updates) == 9
    assert_finite_estimates(monitor.latest)


def test_frozen_layer_is_left_out():
    monitor = SNRMonitor(groups=1)
    model = Regression()
    model.hidden.requires_grad_(False)
    with record_warnings() as record:
        make_trainer(monitor, accumulate_grad_batches=2).fit(model, regression_loader())

    assert not snr_warnings(record)
    assert set(monitor.latest) == set(FINITE_TOTAL_KEYS + group_keys("out", finite=True))
    assert len(monitor._taps.parameters) == 2
    assert_finite_estimates(monitor.latest)


class WithUnusedLayer(Regression):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(4, 4)  # never called: its parameters get no gradient


def test_parameter_without_gradient_counts_as_zero():
    monitor = SNRMonitor(groups=1)
    model = WithUnusedLayer()
    with record_warnings() as record:
        make_trainer(monitor, accumulate_grad_batches=2).fit(model, regression_loader())

    assert not snr_warnings(record)
    assert model.unused.weight.grad is None
    assert monitor.latest["snr/unused/signal"] == 0.0
    assert monitor.latest["snr/unused/noise"] == 0.0
    assert_finite_estimates(monitor.latest)


class ZeroGradients(Regression):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = batch
        return 0.0 * self(x).sum()


def test_all_zero_gradients_neither_crash_nor_warn():
    monitor = SNRMonitor()
    trainer = make_trainer(monitor, accumulate_grad_batches=2)
    with record_warnings() as record:
        trainer.fit(ZeroGradients(), regression_loader())

    assert not snr_warnings(record)
    assert not [w for w in record if raised_by_snrmon(w) or "snrmon" in str(w.message)]
    assert monitor._disabled is False
    assert trainer.global_step == 10
    assert monitor.latest["snr/signal"] == 0.0
    assert monitor.latest["snr/noise"] == 0.0
    assert monitor.latest["snr/skipped_steps"] == 0.0


def test_warnings_are_told_apart_by_module_not_by_path(tmp_path: Path):
    """A clone named ``snrmon`` keeps Lightning in ``snrmon/.venv/lib/...``: its warnings are not ours."""

    def warning_from(filename: Path) -> warnings.WarningMessage:
        return warnings.WarningMessage("deprecated", DeprecationWarning, str(filename), 1)

    clone = tmp_path / "snrmon"
    assert not raised_by_snrmon(warning_from(clone / ".venv/lib/python3.11/site-packages/lightning/x.py"))
    assert raised_by_snrmon(warning_from(Path(snrmon.callbacks.__file__).parent / "snr_monitor.py"))
    assert raised_by_snrmon(warning_from(Path(snrmon.__file__).parent / "measure" / "taps.py"))


def test_monitor_error_disables_it_and_training_finishes(monkeypatch: pytest.MonkeyPatch):
    def broken_step(self: GradientNoiseEstimator, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("estimator exploded")

    monkeypatch.setattr(GradientNoiseEstimator, "step", broken_step)
    monitor = SNRMonitor()
    trainer = make_trainer(monitor, max_steps=6, accumulate_grad_batches=2)
    with pytest.warns(UserWarning, match="SNRMonitor disabled itself") as record:
        trainer.fit(Regression(), regression_loader())

    messages = snr_warnings(record)
    assert len(messages) == 1 and "estimator exploded" in messages[0]
    assert trainer.global_step == 6
    assert monitor._disabled is True
    assert not monitor._taps.attached


# ---------------------------------------------------------------------- 10: setup errors
class ShardedGradientsStrategy(Strategy):
    """Stands in for FSDP & co.: any strategy that is neither single-device nor DDP.

    Lightning refuses ``FSDPStrategy`` on a CPU accelerator, and a subclass that slips past that check
    initialises a gloo process group inside the pytest process; a trivial strategy tests the same
    ``isinstance`` gate without either problem.
    """

    strategy_name = "sharded_gradients_stub"

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def is_global_zero(self) -> bool:
        return True

    def model_to_device(self) -> None:
        self.model.to(self.root_device)

    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    def all_gather(self, tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return tensor

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


def test_unsupported_strategy_is_refused():
    trainer = make_trainer(SNRMonitor(), strategy=ShardedGradientsStrategy())
    with pytest.raises(MisconfigurationException, match="single-device, DDP, and FSDP2"):
        trainer.fit(Regression(), regression_loader())


class ManualOptimization(Regression):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(F.mse_loss(self(batch[0]), batch[1]))
        optimizer.step()


def test_manual_optimization_is_refused():
    trainer = make_trainer(SNRMonitor())
    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        trainer.fit(ManualOptimization(), regression_loader())


def test_single_batch_size_warns_once_about_split_batch():
    monitor = SNRMonitor()
    trainer = make_trainer(monitor, max_steps=6)
    with pytest.warns(UserWarning, match="split_batch") as record:
        trainer.fit(Regression(), regression_loader())

    assert len(snr_warnings(record)) == 1
    assert trainer.global_step == 6


def test_single_batch_size_logs_nothing(tmp_path: Path):
    """The docstring and the warning promise that nothing is logged without a second batch size."""
    monitor = SNRMonitor()
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(monitor, max_steps=6, logger=logger)
    with record_warnings():
        trainer.fit(Regression(), regression_loader())

    with open(Path(logger.log_dir) / "metrics.csv") as file:
        columns = csv.DictReader(file).fieldnames
    assert "train/loss" in columns
    assert [name for name in columns if name.startswith("snr/")] == []
    assert monitor.latest == {}


# ---------------------------------------------------------------------- 11: token-weighted sizes
class TokenRegression(L.LightningModule):
    """Per-token regression over padded sequences; the loss is a mean over non-padding tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 1)
        self.token_counts: list[Tensor] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        mask = batch["mask"]
        self.token_counts.append(mask.sum())
        squared = (self.out(self.embed(batch["tokens"])).squeeze(-1) - batch["target"]) ** 2
        return (squared * mask).sum() / mask.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def token_loader(n: int = 128, length: int = 12, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, (n, length), generator=generator)
    lengths = torch.randint(1, length + 1, (n, 1), generator=generator)
    mask = (torch.arange(length) < lengths).float()
    target = tokens.float() / 10 + 0.3 * torch.randn(n, length, generator=generator)
    data = [{"tokens": t, "target": y, "mask": m} for t, y, m in zip(tokens, target, mask, strict=True)]
    return DataLoader(data, batch_size=batch_size)


def test_token_weighted_batch_size_fn():
    accumulate = 2
    monitor = SNRMonitor(batch_size_fn=lambda batch: batch["mask"].sum())  # a device tensor
    model = TokenRegression()
    with record_warnings() as record:
        make_trainer(monitor, max_steps=12, accumulate_grad_batches=accumulate).fit(model, token_loader())

    assert not snr_warnings(record)
    assert_finite_estimates(monitor.latest)
    assert int(monitor._estimator.updates) == 12
    # Effective batch size of the last step: 1/B = Σ v_k²/b_k with v_k = 1/K, b_k = token counts.
    last = [float(count) for count in model.token_counts[-accumulate:]]
    expected = 1.0 / sum(1.0 / (accumulate**2 * b) for b in last)
    assert monitor.latest["snr/batch_size"] == pytest.approx(expected, rel=1e-6)
    assert expected != 8 * accumulate  # tokens, not sequences, were counted


# ---------------------------------------------------------------------- 12: regressions of review fixes
def csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize(("every", "log_every"), [(2, 4), (5, 5)])
def test_values_logged_on_every_logging_step_whatever_every_n_steps(
    tmp_path: Path, every: int, log_every: int
):
    """Lightning's logging steps need not be measured steps (with 5/5 they never are)."""
    monitor = SNRMonitor(every_n_steps=every)
    logger = CSVLogger(tmp_path, name="csv")
    max_steps = 20
    trainer = make_trainer(
        monitor, logger=logger, log_every_n_steps=log_every, max_steps=max_steps,
        accumulate_grad_batches=2,
    )  # fmt: skip
    trainer.fit(Regression(), regression_loader())

    rows = csv_rows(logger)
    snr_steps = [int(row["step"]) for row in rows if row.get("snr/signal")]
    loss_steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert snr_steps == loss_steps == [s for s in range(max_steps) if (s + 1) % log_every == 0]
    assert int(monitor._estimator.updates) == len(range(0, max_steps, every))
    assert_finite_estimates(monitor.latest)


@pytest.mark.parametrize("strategy_class", ["DeepSpeedStrategy", "XLAStrategy", "SingleDeviceXLAStrategy"])
def test_sharded_ddp_subclasses_are_refused(strategy_class: str):
    """DeepSpeed and XLA subclass DDP/single-device strategies but shard or transform gradients."""
    import types

    from lightning.pytorch import strategies

    def setup_with(strategy: Strategy) -> None:
        SNRMonitor().setup(types.SimpleNamespace(strategy=strategy), Regression(), "fit")

    setup_with(object.__new__(strategies.DDPStrategy))  # the gate itself lets plain DDP through
    with pytest.raises(MisconfigurationException, match=strategy_class):
        setup_with(object.__new__(getattr(strategies, strategy_class)))


class NoneOnLastMicrobatch(Regression):
    """``training_step`` returns None (Lightning skips that backward) on the last microbatch of a step."""

    def __init__(self, accumulate: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.accumulate = accumulate

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % self.accumulate == self.accumulate - 1 else loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs:  # empty when training_step returned None
            super().on_train_batch_end(outputs, batch, batch_idx)


def test_fp16_step_whose_last_microbatch_skips_backward():
    """Lightning does not unscale such a step's gradients; the monitor must divide the scale out itself."""

    def estimates(**kwargs: Any) -> tuple[dict[str, float], L.Trainer]:
        torch.manual_seed(0)
        monitor = SNRMonitor()
        trainer = make_trainer(monitor, max_steps=30, accumulate_grad_batches=4, **kwargs)
        with record_warnings() as record:
            trainer.fit(NoneOnLastMicrobatch(4, lr=0.0), regression_loader(n=1024))
        assert not snr_warnings(record)
        assert int(monitor._estimator.updates) == 30
        assert_finite_estimates(monitor.latest)
        return monitor.latest, trainer

    reference, _ = estimates()
    scaled, trainer = estimates(plugins=[fp16_plugin()])
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**10  # the scale was in play
    assert_within_se(scaled, reference)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_with_the_same_monitor_instance(tmp_path: Path):
    batches_per_epoch = 12  # 6 optimizer steps per epoch with accumulation 2

    def fit(monitor: SNRMonitor, max_epochs: int, ckpt_path: str | None = None, checkpoint=None):
        torch.manual_seed(0)
        trainer = make_trainer(
            monitor, max_steps=-1, max_epochs=max_epochs, accumulate_grad_batches=2,
            callbacks=[checkpoint] if checkpoint else [], enable_checkpointing=checkpoint is not None,
        )  # fmt: skip
        trainer.fit(Regression(), regression_loader(n=8 * batches_per_epoch), ckpt_path=ckpt_path)

    uninterrupted = SNRMonitor(groups=1)
    fit(uninterrupted, max_epochs=2)

    monitor = SNRMonitor(groups=1)
    fit(monitor, max_epochs=1, checkpoint=ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1))
    assert int(monitor._estimator.updates) == 6
    (saved,) = tmp_path.glob("*.ckpt")
    fit(monitor, max_epochs=2, ckpt_path=str(saved))  # the same instance, resumed

    assert int(monitor._estimator.updates) == 12
    for name in ("moments", "updates", "skipped", "batch_size"):
        assert torch.equal(getattr(monitor._estimator, name), getattr(uninterrupted._estimator, name))
    assert monitor.latest == pytest.approx(uninterrupted.latest, rel=1e-12, abs=0, nan_ok=True)


class FailsOnce(Regression):
    """Raises from ``training_step`` at one ``batch_idx``, the first time only."""

    def __init__(self, fail_at: int | None, **kwargs: Any):
        super().__init__(**kwargs)
        self.fail_at = fail_at

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if batch_idx == self.fail_at:
            self.fail_at = None
            raise RuntimeError("user code failed mid-step")
        return super().training_step(batch, batch_idx)


def test_exception_mid_step_leaves_no_hooks_and_monitor_is_reusable():
    accumulate = 4

    def fit(monitor: SNRMonitor, model: Regression) -> None:
        make_trainer(monitor, max_steps=10, accumulate_grad_batches=accumulate).fit(
            model, regression_loader()
        )

    torch.manual_seed(0)
    model = FailsOnce(fail_at=2 * accumulate + 2, lr=0.0)  # third microbatch of step 2
    monitor = SNRMonitor()
    with pytest.raises(RuntimeError, match="user code failed mid-step"):
        fit(monitor, model)
    assert monitor._taps._handles == []
    assert all(not p._backward_hooks for p in model.parameters())

    with record_warnings() as record:
        fit(monitor, model)  # the same monitor and (lr = 0) the same parameters, from the first batch
    torch.manual_seed(0)
    fresh = SNRMonitor()
    fit(fresh, FailsOnce(fail_at=None, lr=0.0))

    assert not snr_warnings(record)
    assert int(monitor._estimator.updates) == 10
    for name in ("moments", "updates", "skipped", "batch_size"):
        assert torch.equal(getattr(monitor._estimator, name), getattr(fresh._estimator, name)), name
    assert all(not p._backward_hooks for p in model.parameters())


class CheckpointedSharedLayer(Regression):
    """Two activation-checkpointed segments that share one layer (``checkpoint=None``: no checkpointing)."""

    def __init__(self, use_reentrant: bool | None, **kwargs: Any):
        super().__init__(**kwargs)
        self.shared = nn.Linear(16, 16)
        self.use_reentrant = use_reentrant

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.hidden(x))  # requires grad, as reentrant checkpointing needs
        segment = lambda t: torch.tanh(self.shared(t))  # noqa: E731
        for _ in range(2):
            if self.use_reentrant is None:
                h = segment(h)
            else:
                h = torch.utils.checkpoint.checkpoint(segment, h, use_reentrant=self.use_reentrant)
        return self.out(h).squeeze(-1)


@pytest.mark.filterwarnings("ignore:.*torch.utils.checkpoint.*")
def test_reentrant_checkpointing_disables_the_monitor_and_non_reentrant_is_exact():
    def run(use_reentrant: bool | None) -> tuple[SNRMonitor, L.Trainer, list[str]]:
        torch.manual_seed(0)
        monitor = SNRMonitor()
        trainer = make_trainer(monitor, max_steps=6, accumulate_grad_batches=2)
        with record_warnings() as record:
            trainer.fit(CheckpointedSharedLayer(use_reentrant, lr=0.0), regression_loader())
        return monitor, trainer, snr_warnings(record)

    monitor, trainer, messages = run(use_reentrant=True)
    assert trainer.global_step == 6
    assert monitor._disabled
    assert len(messages) == 1 and "reentrant" in messages[0]

    plain, _, plain_messages = run(use_reentrant=None)
    checkpointed, _, messages = run(use_reentrant=False)
    assert not messages and not plain_messages
    assert not checkpointed._disabled
    assert_finite_estimates(checkpointed.latest)
    assert checkpointed.latest == pytest.approx(plain.latest, rel=1e-12, abs=0, nan_ok=True)


class PythonFloatBatches(Regression):
    """Each batch is a list of Python floats x; the target is a fixed function of x."""

    def training_step(self, batch: list[float], batch_idx: int) -> Tensor:
        x = torch.tensor(batch).unsqueeze(-1).expand(-1, 4)
        return F.mse_loss(self(x), torch.sin(3 * x[:, 0]))


@pytest.mark.parametrize("batch_size_fn", [None, len], ids=["default", "len"])
def test_batch_without_tensors(batch_size_fn: Callable | None):
    values = torch.randn(128, generator=torch.Generator().manual_seed(0)).tolist()
    loader = DataLoader(values, batch_size=8, collate_fn=list)
    monitor = SNRMonitor(batch_size_fn=batch_size_fn)
    model = PythonFloatBatches()
    trainer = make_trainer(monitor, max_steps=6, accumulate_grad_batches=2)
    with record_warnings() as record:
        trainer.fit(model, loader)

    assert trainer.global_step == 6
    assert all(not p._backward_hooks for p in model.parameters())
    if batch_size_fn is None:  # the leading dimension cannot be found: disabled, with a warning
        assert monitor._disabled
        assert any("disabled itself" in message for message in snr_warnings(record))
    else:
        assert not monitor._disabled and not snr_warnings(record)
        assert_finite_estimates(monitor.latest)


class BatchNormRegression(Regression):
    def __init__(self):
        super().__init__(dropout=0.2)
        self.norm = nn.BatchNorm1d(16)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.dropout(torch.tanh(self.norm(self.hidden(x))))).squeeze(-1)


def test_split_batch_leaves_batchnorm_buffers_and_training_unchanged():
    monitor = SNRMonitor(split_batch=True)
    plain, monitored = train_with_and_without(BatchNormRegression, monitor)

    assert int(monitor._estimator.updates) == 8
    assert all(torch.equal(a, b) for a, b in zip(plain.losses, monitored.losses, strict=True))
    buffers = {name for name, _ in plain.named_buffers()}
    assert {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"} <= buffers
    assert int(monitored.norm.num_batches_tracked) == 8  # one update per real training_step
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_float64_training_matches_fp32():
    reference, _ = lr0_estimates()
    wide, trainer = lr0_estimates(precision="64-true")
    assert trainer.precision == "64-true"
    assert_within_se(wide, reference)


class SparseEmbedding(L.LightningModule):
    """Bag of token embeddings regressed on a target; ``sparse=True`` gives sparse gradients."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.embed = nn.Embedding(50, 8, sparse=sparse)
        self.out = nn.Linear(8, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, target = batch
        return F.mse_loss(self.out(self.embed(tokens).mean(1)).squeeze(-1), target)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # SGD accepts sparse gradients


def test_sparse_embedding_gradients():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(50, (256, 6), generator=generator)
    target = (tokens % 7).float().mean(1) + 0.3 * torch.randn(256, generator=generator)
    loader = DataLoader(TensorDataset(tokens, target), batch_size=8)

    def run(sparse: bool) -> dict[str, float]:
        torch.manual_seed(0)
        monitor = SNRMonitor()
        with record_warnings() as record:
            make_trainer(monitor, max_steps=12, accumulate_grad_batches=2).fit(
                SparseEmbedding(sparse), loader
            )
        assert not snr_warnings(record) and not monitor._disabled
        assert_finite_estimates(monitor.latest)
        return monitor.latest

    # Same parameters and data: the norms of coalesced sparse gradients are those of the dense ones.
    assert run(sparse=True) == pytest.approx(run(sparse=False), rel=1e-4, nan_ok=True)


class Unfreeze(Callback):
    """Unfreezes ``hidden`` at the start of epoch 1 and hands it to the optimizer (as BackboneFinetuning)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            pl_module.hidden.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(pl_module.hidden.parameters())})


class TapsPerEpoch(LatestPerEpoch):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.taps = getattr(self, "taps", []) + [list(self.monitor._taps.parameters)]


@pytest.mark.parametrize("groups", [None, 1])
def test_parameters_unfrozen_between_epochs_are_watched(groups: int | None):
    monitor = SNRMonitor(groups=groups)
    recorder = TapsPerEpoch(monitor)
    model = Regression()
    model.hidden.requires_grad_(False)
    trainer = make_trainer(
        None, max_steps=-1, max_epochs=2, accumulate_grad_batches=2,
        callbacks=[Unfreeze(), monitor, recorder],  # the unfreezing runs before the monitor's hook
    )  # fmt: skip
    with record_warnings() as record:
        trainer.fit(model, regression_loader(n=64))  # 4 steps per epoch

    hidden = set(model.hidden.parameters())
    assert [len(hidden & set(taps)) for taps in recorder.taps] == [0, 2]
    assert len(recorder.taps[1]) == 4
    for latest in recorder.per_epoch:
        assert_finite_estimates(latest)
    assert not snr_warnings(record)
    # The total now sums over other tensors: a new quantity, so the EMAs restart (with an info line).
    assert int(monitor._estimator.updates) == 4
    if groups is not None:
        assert set(group_keys("hidden")) <= set(recorder.per_epoch[1])
        assert all(math.isfinite(recorder.per_epoch[1][f"snr/hidden/{key}"]) for key in ("signal", "noise"))


def test_first_logged_step_has_no_standard_error():
    """One step has no spread: its standard errors are unknown (NaN), not 0 or an arbitrary number."""
    monitor = SNRMonitor()
    make_trainer(monitor, max_steps=1, accumulate_grad_batches=2).fit(Regression(), regression_loader())

    assert int(monitor._estimator.updates) == 1
    assert math.isfinite(monitor.latest["snr/signal"]) and math.isfinite(monitor.latest["snr/noise"])
    for key in ("signal", "noise", "noise_scale", "ratio"):
        assert math.isnan(monitor.latest[f"snr/{key}_se"]), (key, monitor.latest[f"snr/{key}_se"])


# ---------------------------------------------------------------------- ordinary Lightning patterns
class TwoScalars(L.LightningModule):
    """Two scalar parameters of equal value; which one trains is swapped between epochs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(1.0))
        self.b.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.a * x[:, 0] + self.b * x[:, 1], y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class SwapTrainable(Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            pl_module.a.requires_grad_(False)
            pl_module.b.requires_grad_(True)


def test_swapping_trainable_tensors_of_equal_value_watches_the_new_one():
    monitor = SNRMonitor()
    model = TwoScalars()
    trainer = make_trainer(monitor, max_steps=-1, max_epochs=2, accumulate_grad_batches=2,
                           callbacks=[SwapTrainable()])  # fmt: skip
    with record_warnings() as record:
        trainer.fit(model, regression_loader(n=64))

    assert not snr_warnings(record) and not monitor._disabled
    assert len(monitor._taps.parameters) == 1 and monitor._taps.parameters[0] is model.b
    assert monitor.latest["snr/signal"] > 1e-3  # b's gradient, not the 0 of the frozen a


class Backbone(Regression):
    """``backbone`` is what Lightning's BackboneFinetuning freezes, then unfreezes."""

    def __init__(self):
        super().__init__()
        self.backbone = self.hidden


@pytest.mark.parametrize("monitor_first", [True, False])
def test_backbone_finetuning_is_watched_whatever_the_callback_order(monitor_first: bool):
    from lightning.pytorch.callbacks import BackboneFinetuning

    monitor = SNRMonitor()
    recorder = TapsPerEpoch(monitor)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    callbacks = [monitor, finetuning] if monitor_first else [finetuning, monitor]
    model = Backbone()
    trainer = make_trainer(None, max_steps=-1, max_epochs=2, accumulate_grad_batches=2,
                           callbacks=[*callbacks, recorder])  # fmt: skip
    trainer.fit(model, regression_loader(n=64))

    backbone = set(model.backbone.parameters())
    assert [len(backbone & set(taps)) for taps in recorder.taps] == [0, 2]
    assert int(monitor._estimator.updates) == 4  # the whole second epoch measured the new total
    assert_finite_estimates(recorder.per_epoch[1])


class LazyRegression(Regression):
    def __init__(self):
        super().__init__()
        self.hidden = nn.LazyLinear(16)


def test_lazy_parameters_are_watched_once_they_exist():
    monitor = SNRMonitor()
    model = LazyRegression()
    with record_warnings() as record:
        make_trainer(monitor, accumulate_grad_batches=2).fit(model, regression_loader())

    assert not snr_warnings(record) and not monitor._disabled
    assert set(monitor._taps.parameters) == set(model.parameters())
    assert int(monitor._estimator.updates) == 10
    assert_finite_estimates(monitor.latest)


class DrawsFromPythonAndNumpy(Regression):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        import random

        import numpy as np

        return super().training_step(batch, batch_idx) * (1 + 0.1 * random.random() + 0.1 * np.random.rand())


def test_split_batch_leaves_python_and_numpy_random_streams_alone():
    monitor = SNRMonitor(split_batch=True)
    plain, monitored = train_with_and_without(DrawsFromPythonAndNumpy, monitor)
    assert int(monitor._estimator.updates) == 8
    assert all(torch.equal(a, b) for a, b in zip(plain.losses, monitored.losses, strict=True))


class WithMetric(Regression):
    def __init__(self):
        super().__init__()
        import torchmetrics

        self.mae = torchmetrics.MeanAbsoluteError()


def test_split_batch_refuses_a_module_with_metrics():
    with pytest.raises(MisconfigurationException, match="torchmetrics"):
        make_trainer(SNRMonitor(split_batch=True)).fit(WithMetric(), regression_loader())


def test_split_batch_says_once_that_a_single_sample_cannot_be_split():
    monitor = SNRMonitor(split_batch=True)
    with record_warnings() as record:
        make_trainer(monitor, max_steps=5).fit(Regression(), regression_loader(batch_size=1))
    messages = [m for m in snr_warnings(record) if "cannot be split" in m]
    assert len(messages) == 1
    assert int(monitor._estimator.updates) == 0 and not monitor._disabled


@pytest.mark.parametrize("groups", [0, -2, True, "(", 1.5, {"total": "hidden"}, {"a": "("}, {"a": 3}, ["a"]])
def test_bad_groups_are_refused_when_the_monitor_is_made(groups: Any):
    with pytest.raises((ValueError, TypeError)):
        SNRMonitor(groups=groups)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("change", ["every_n_steps", "groups", "dataset_size"])
def test_resume_with_other_settings_keeps_the_state_or_says_why_not(tmp_path: Path, change: str):
    def fit(monitor: SNRMonitor, max_epochs: int, ckpt_path: str | None = None, checkpoint=None) -> None:
        torch.manual_seed(0)
        trainer = make_trainer(
            monitor, max_steps=-1, max_epochs=max_epochs, accumulate_grad_batches=2,
            callbacks=[checkpoint] if checkpoint else [], enable_checkpointing=checkpoint is not None,
        )  # fmt: skip
        trainer.fit(Regression(), regression_loader(n=96), ckpt_path=ckpt_path)  # 6 steps an epoch

    first = SNRMonitor(groups=1)
    fit(first, max_epochs=1, checkpoint=ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1))
    (saved,) = tmp_path.glob("*.ckpt")
    resumed = {
        "every_n_steps": SNRMonitor(every_n_steps=2, groups=1),
        "groups": SNRMonitor(groups=None),
        "dataset_size": SNRMonitor(groups=1, dataset_size=math.inf),  # (the first fit read N = 96)
    }[change]
    with record_warnings() as record:
        fit(resumed, max_epochs=2, ckpt_path=str(saved))

    if change == "every_n_steps":  # the EMAs go on: 6 restored updates and 3 new ones
        assert not snr_warnings(record)
        assert int(resumed._estimator.updates) == 9
    elif change == "dataset_size":  # they go on too, said to mix two corrections
        (said,) = snr_warnings(record)
        assert "N = 96, this run's is N = inf (inf: independent draws)" in said
        assert int(resumed._estimator.updates) == 12
    else:
        assert any("groups" in m and "differ" in m for m in snr_warnings(record))
        assert int(resumed._estimator.updates) == 6


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended")
def test_a_fit_resumed_inside_an_epoch_knows_its_training_set(tmp_path: Path):
    """Lightning runs no `on_train_epoch_start` for the epoch a fit resumes inside: N must still be read (a
    one-epoch LLM run resumed from a step checkpoint would otherwise go uncorrected to its end)."""

    def fit(monitor: SNRMonitor, ckpt_path: str | None = None, checkpoint=None) -> None:
        torch.manual_seed(0)
        trainer = make_trainer(
            monitor, max_steps=-1, max_epochs=1, accumulate_grad_batches=2,
            callbacks=[checkpoint] if checkpoint else [], enable_checkpointing=checkpoint is not None,
        )  # fmt: skip
        trainer.fit(Regression(), regression_loader(n=96), ckpt_path=ckpt_path)  # 6 steps, one epoch

    every_2 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    fit(SNRMonitor(), checkpoint=every_2)
    resumed = SNRMonitor()
    fit(resumed, ckpt_path=str(tmp_path / "step=2.ckpt"))
    assert int(resumed._estimator.updates) == 6  # 2 restored, 4 measured after the resume
    assert resumed.latest["snr/dataset_size"] == 96 and resumed.finite_training_set


class GradientNormLogging(Regression):
    """Calls ``torch.autograd.grad`` on the parameters inside ``training_step``: to log the gradient norm, or
    (``penalty``) to add a gradient penalty to the loss."""

    def __init__(self, penalty: bool):
        super().__init__(lr=0.0)
        self.penalty = penalty

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        parameters = list(self.parameters())
        grads = torch.autograd.grad(loss, parameters, retain_graph=True, create_graph=self.penalty)
        norm_sq = sum(g.square().sum() for g in grads)
        self.log("grad_norm", norm_sq.detach().sqrt())
        return loss + 0.1 * norm_sq if self.penalty else loss


@pytest.mark.parametrize("penalty", [False, True])
def test_autograd_grad_inside_training_step_is_not_mistaken_for_checkpointing(penalty: bool):
    def run(make_model: Callable[[], Regression]) -> SNRMonitor:
        torch.manual_seed(0)
        monitor = SNRMonitor()
        with record_warnings() as record:
            make_trainer(monitor, accumulate_grad_batches=2).fit(make_model(), regression_loader())
        assert not snr_warnings(record) and not monitor._disabled
        assert_finite_estimates(monitor.latest)
        return monitor

    monitored = run(lambda: GradientNormLogging(penalty))
    if not penalty:  # the same gradients reach `.grad` as without the extra autograd.grad call
        plain = run(lambda: Regression(lr=0.0))
        assert monitored.latest == pytest.approx(plain.latest, rel=1e-9, nan_ok=True)


class WithLBFGS(Regression):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)


def test_closure_reevaluating_optimizer_gets_a_clear_reason():
    monitor = SNRMonitor()
    trainer = make_trainer(monitor, max_steps=4, accumulate_grad_batches=2)
    with record_warnings() as record:
        trainer.fit(WithLBFGS(), regression_loader())
    assert trainer.global_step == 4
    assert any("closure more than once" in m for m in snr_warnings(record))


class ScalarFirstBatches(Regression):
    """Batches (temperature, x, y) whose first tensor is 0-dim."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        temperature, x, y = batch
        return F.mse_loss(self(x), y) * temperature


def scalar_first_loader() -> DataLoader:
    def collate(samples: list) -> tuple[Tensor, Tensor, Tensor]:
        x, y = torch.utils.data.default_collate(samples)
        return torch.tensor(1.0), x, y

    return DataLoader(regression_loader().dataset, batch_size=8, collate_fn=collate)


@pytest.mark.parametrize("split_batch", [False, True])
def test_batches_with_0_dim_tensors_count_the_samples_right(split_batch: bool):
    monitor = SNRMonitor(split_batch=split_batch)
    with record_warnings() as record:
        make_trainer(monitor, accumulate_grad_batches=1 if split_batch else 2).fit(
            ScalarFirstBatches(), scalar_first_loader()
        )
    assert not snr_warnings(record) and not monitor._disabled
    assert monitor.latest["snr/batch_size"] == (8 if split_batch else 16)


def test_two_monitors_need_different_prefixes(tmp_path: Path):
    with pytest.raises(RuntimeError, match="state_key"):  # Lightning refuses two that would write one state
        make_trainer(SNRMonitor(), callbacks=[SNRMonitor(groups=1)]).fit(Regression(), regression_loader())

    # Prefixes that compose to the same names with a group: refused, naming the shared folder.
    attention = SNRMonitor(prefix="snr/attn")
    with pytest.raises(MisconfigurationException, match="'snr/attn'/"):
        trainer = make_trainer(SNRMonitor(groups={"attn": "attn"}), callbacks=[attention])
        trainer.fit(Regression(), regression_loader())

    logger = CSVLogger(tmp_path, name="csv")
    fast, slow = SNRMonitor(), SNRMonitor(prefix="snr_slow", ema_decay=0.99)
    trainer = make_trainer(
        fast, callbacks=[slow], logger=logger, log_every_n_steps=5, accumulate_grad_batches=2
    )
    trainer.fit(Regression(), regression_loader())
    rows = csv_rows(logger)
    for prefix in ("snr", "snr_slow"):  # each monitor once per logging step, under its own names
        assert [int(row["step"]) for row in rows if row.get(f"{prefix}/signal")] == [4, 9]
    assert set(slow.latest) == {key.replace("snr/", "snr_slow/") for key in fast.latest}
    assert fast.latest["snr/signal"] != slow.latest["snr_slow/signal"]  # different smoothing


def test_nothing_to_measure_installs_no_hook(caplog):
    model = HandleProbe(SNRMonitor())
    with record_warnings() as record, caplog.at_level(logging.INFO):
        make_trainer(model.monitor, max_steps=4).fit(model, regression_loader())
    assert sum("single batch size" in m for m in snr_warnings(record)) == 1
    assert model.hooks_seen == [(step, 0) for step in range(4)]
    # No word on what `signal` will mean (the training set's case) for a run that measures nothing.
    assert not [r for r in caplog.records if "SNRMonitor:" in r.getMessage()]


class NoParameter(L.LightningModule):
    """Trains a plain tensor attribute, not a registered parameter: the monitor cannot see it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.zeros(4, requires_grad=True)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(x @ self.weight, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.weight], lr=0.05)


def test_no_trainable_parameter_is_warned_about_once():
    monitor = SNRMonitor()
    with record_warnings() as record:
        make_trainer(monitor, max_steps=4, accumulate_grad_batches=2).fit(NoParameter(), regression_loader())
    assert sum("no parameter trains" in m for m in snr_warnings(record)) == 1
    assert monitor.latest == {}


class WithTotalLayer(Regression):
    """A submodule named ``total``: ``groups=1`` would give it the name of the sum over all parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.total = nn.Linear(1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.total(super().forward(x).unsqueeze(-1)).squeeze(-1)


def test_depth_groups_that_would_name_a_group_total_are_refused():
    trainer = make_trainer(SNRMonitor(groups=1), accumulate_grad_batches=2)
    with pytest.raises(MisconfigurationException, match="would name a group 'total'.*total.weight"):
        trainer.fit(WithTotalLayer(), regression_loader())
    assert trainer.global_step == 0  # refused before training, not switched off at the first step
    monitor = SNRMonitor(groups=2)  # blocks named "total.weight", "total.bias": no clash
    make_trainer(monitor, accumulate_grad_batches=2).fit(WithTotalLayer(), regression_loader())
    assert "snr/total.weight/signal" in monitor.latest


def test_tensor_parallelism_is_refused_and_names_what_is_supported():
    import types

    from lightning.pytorch.strategies import ModelParallelStrategy

    def setup_with(tensor_parallel: int) -> None:
        strategy = object.__new__(ModelParallelStrategy)
        strategy._device_mesh = {"tensor_parallel": types.SimpleNamespace(size=lambda: tensor_parallel)}
        SNRMonitor().setup(types.SimpleNamespace(strategy=strategy), Regression(), "fit")

    setup_with(1)  # FSDP2 alone passes the gate
    with pytest.raises(MisconfigurationException, match="FSDP2.*not tensor parallelism"):
        setup_with(2)


@pytest.mark.parametrize("case", ["custom_batch_size_fn", "whole_batches"])
def test_no_finite_set_correction_when_n_is_in_another_unit(case: str):
    """N read off the loader counts the dataset's items; a custom batch_size_fn (tokens) or a dataset that
    yields whole batches counts samples in another unit: no correction then, unless dataset_size gives N."""
    loader = regression_loader(shuffle=True)
    if case == "whole_batches":
        x, y = loader.dataset.tensors
        batches = TensorDataset(x.view(32, 8, 4), y.view(32, 8))
        loader = DataLoader(batches, batch_size=None, shuffle=True)
    tokens = (lambda batch: 3 * len(batch[0])) if case == "custom_batch_size_fn" else None
    monitor = SNRMonitor(batch_size_fn=tokens)
    make_trainer(monitor, accumulate_grad_batches=2).fit(Regression(), loader)
    assert_finite_estimates(monitor.latest)
    assert "snr/dataset_size" not in monitor.latest and "snr/dataset_snr" not in monitor.latest

    told = SNRMonitor(dataset_size=256)
    make_trainer(told, accumulate_grad_batches=2).fit(Regression(), loader)
    assert told.latest["snr/dataset_size"] == 256


class HeadOnlyOptimizer(Regression):
    """Fine-tuning that hands only the head to the optimizer but leaves the backbone requiring gradients:
    Lightning never clears the backbone's `.grad`, which grows from step to step."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.out.parameters(), lr=0.0)


def test_parameters_outside_every_optimizer_are_left_out_with_a_warning():
    def run(model: Regression) -> tuple[SNRMonitor, list[str]]:
        torch.manual_seed(0)
        monitor = SNRMonitor()
        with record_warnings() as record:
            make_trainer(monitor, max_steps=20, accumulate_grad_batches=2).fit(model, regression_loader())
        return monitor, snr_warnings(record)

    torch.manual_seed(1)
    model = HeadOnlyOptimizer()
    frozen = HeadOnlyOptimizer()
    frozen.load_state_dict(model.state_dict())
    frozen.hidden.requires_grad_(False)
    monitor, messages = run(model)
    reference, _ = run(frozen)
    assert len(messages) == 1 and "in no optimizer" in messages[0] and "hidden.weight" in messages[0]
    assert set(monitor._taps.parameters) == set(model.out.parameters())
    assert monitor.latest == pytest.approx(reference.latest, rel=1e-12, nan_ok=True)


class SkipsOddWindows(Regression):
    """Steps the optimizer only on even windows; the logging steps below fall on skipped windows."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.trainer.global_step % 2:
            optimizer_closure()
        else:
            optimizer.step(closure=optimizer_closure)


def test_logging_steps_on_skipped_windows_still_log(tmp_path: Path):
    monitor = SNRMonitor()
    logger = CSVLogger(tmp_path, name="csv")
    make_trainer(monitor, logger=logger, max_steps=20, log_every_n_steps=4, accumulate_grad_batches=2).fit(
        SkipsOddWindows(), regression_loader()
    )
    rows = csv_rows(logger)
    loss_steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    snr_steps = [int(row["step"]) for row in rows if row.get("snr/signal")]
    assert loss_steps == snr_steps == [3, 7, 11, 15, 19]  # every one of them a skipped (odd) window
    assert monitor.latest["snr/dropped_windows"] == 9  # the tenth skipped window was still open at the end


def test_a_reused_monitor_does_not_report_an_earlier_fits_values():
    monitor = SNRMonitor()
    make_trainer(monitor, accumulate_grad_batches=2).fit(Regression(), regression_loader())
    assert monitor.latest
    # Nothing to measure in the second fit (one device, no accumulation): nothing to report either.
    make_trainer(monitor, accumulate_grad_batches=1).fit(Regression(), regression_loader())
    assert monitor.latest == {}


@pytest.mark.parametrize("state", [{"estimator": "garbage"}, [1, 2], "nan_moments"])
def test_unusable_checkpoint_state_starts_afresh_with_a_warning(state: Any):
    if state == "nan_moments":
        donor = SNRMonitor()
        make_trainer(donor, max_steps=3, accumulate_grad_batches=2).fit(Regression(), regression_loader())
        state = donor.state_dict()
        state["estimator"]["moments"].fill_(math.nan)
    monitor = SNRMonitor()
    monitor.load_state_dict(state)
    with record_warnings() as record:
        make_trainer(monitor, accumulate_grad_batches=2).fit(Regression(), regression_loader())
    assert any("could not be used" in m for m in snr_warnings(record))
    assert not monitor._disabled and int(monitor._estimator.updates) == 10
    assert_finite_estimates(monitor.latest)


@pytest.mark.parametrize("size", [0, -8, math.nan, math.inf])
def test_a_batch_size_fn_that_does_not_count_samples_is_named(size: float):
    monitor = SNRMonitor(batch_size_fn=lambda batch: size)
    with record_warnings() as record:
        make_trainer(monitor, accumulate_grad_batches=2).fit(Regression(), regression_loader())
    assert monitor._disabled
    assert any("batch_size_fn returned" in m for m in snr_warnings(record))


def test_a_dataset_size_smaller_than_a_step_is_named():
    monitor = SNRMonitor(dataset_size=10)
    with record_warnings() as record:
        make_trainer(monitor, accumulate_grad_batches=2).fit(Regression(), regression_loader(shuffle=True))
    assert monitor._disabled and any("more than dataset_size=10" in m for m in snr_warnings(record))


class ListOfSamples(Regression):
    """Batches ``([x_0, ..., x_7], y)``: a list of per-sample tensors beside the target."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        xs, y = batch
        return F.mse_loss(self(torch.stack(xs)), y)


def test_ambiguous_leading_dimensions_are_warned_about_once():
    dataset = regression_loader().dataset

    def collate(rows: list) -> tuple[list[Tensor], Tensor]:
        return [x for x, _ in rows], torch.stack([y for _, y in rows])

    loader = DataLoader(dataset, batch_size=8, collate_fn=collate)
    with record_warnings() as record:
        make_trainer(SNRMonitor(), accumulate_grad_batches=2).fit(ListOfSamples(), loader)
    assert sum("leading dimensions [4, 8]" in m for m in snr_warnings(record)) == 1


class ReplacesTheHead(Callback):
    """Replaces ``out`` by a new layer mid-epoch and hands it to the optimizer in place of the old one."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int):
        if trainer.global_step == 3 and idx % 2 == 0:
            pl_module.out = nn.Linear(16, 1)
            trainer.optimizers[0].param_groups[0]["params"] = list(pl_module.parameters())


def test_a_module_replaced_mid_epoch_is_watched_at_the_next_step():
    monitor = SNRMonitor()
    model = Regression()
    trainer = make_trainer(monitor, accumulate_grad_batches=2, callbacks=[ReplacesTheHead()])
    trainer.fit(model, regression_loader())
    assert set(monitor._taps.parameters) == set(model.parameters())
    assert int(monitor._estimator.updates) == 7  # steps 3..9 with the new head, the EMAs restarted


def test_the_same_trainer_fitted_again_goes_on_with_the_emas():
    monitor = SNRMonitor()
    model = Regression(lr=0.0)
    trainer = make_trainer(monitor, max_steps=4, accumulate_grad_batches=2)
    trainer.fit(model, regression_loader())
    trainer.fit_loop.epoch_loop.max_steps = 8
    with record_warnings() as record:
        trainer.fit(model, regression_loader())
    assert trainer.global_step == 8 and not snr_warnings(record)
    assert int(monitor._estimator.updates) == 8
