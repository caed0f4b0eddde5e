"""BasinEarlyStopping through real (small, CPU, seconds) Trainer.fit runs.

The overfitting run: a 128-unit MLP regressing a smooth target with heavy label noise on 64 samples; its
validation loss (512 clean-distribution samples) falls, then rises as the noise is memorised. The improving
run: the same model on fresh samples every step (no memorisation, no basin).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from test_ddp import free_port
from test_forecast import SHANNON_FAMILY
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from snrmon.callbacks import BasinEarlyStopping


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(2 * x[:, :1]) + x[:, 1:2] + 0.5 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class _Fresh(Dataset):
    """A new sample at every index: training never sees a sample twice."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        self.count = getattr(self, "count", 0) + 1
        return tuple(t[0] for t in _data(1, 10_000 + self.count).tensors)


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)  # (DDP: the script)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Recorder(Logger):
    """Keeps every logged metric, text and figure: what TensorBoard would show."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []
        self.texts: list[tuple[str, str, int]] = []
        self.figures: list[tuple[str, object, int]] = []

    @property
    def experiment(self):
        return self

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append((tag, text, step))

    def add_figure(self, tag: str, figure, step: int) -> None:
        self.figures.append((tag, figure, step))

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def _fit(callback, train_data, max_epochs: int, logger=None, ckpt_path=None, model=None, **trainer_options):
    torch.manual_seed(0)
    model = model or Regressor()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=callback if isinstance(callback, list) else [callback],
        logger=logger or False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **trainer_options,
    )
    train = DataLoader(train_data, batch_size=32, shuffle=not isinstance(train_data, _Fresh))
    trainer.fit(model, train, DataLoader(_data(512, 1), batch_size=512), ckpt_path=ckpt_path)
    return trainer, model


pytestmark = pytest.mark.usefixtures("one_thread")


def test_stops_an_overfitting_run_near_its_minimum_and_logs_the_forecast():
    callback, recorder = BasinEarlyStopping(monitor="val_loss"), Recorder()
    max_epochs = 200
    with pytest.warns(UserWarning, match="basin") as caught:
        trainer, _ = _fit(callback, _data(64, 0), max_epochs, logger=recorder)
    steps = callback.forecaster.points.x
    assert trainer.should_stop and 0 < callback.stopped_step < 2 * max_epochs  # 2 steps an epoch
    assert callback.stopped_step == steps[-1] and "basin" in callback.stopping_reason
    # The same run to the end (a callback that never forecasts only records the curve): a real basin, and
    # the loss at the stop is within 1% of its minimum.
    reference = BasinEarlyStopping(monitor="val_loss", min_points=10**9)
    _fit(reference, _data(64, 0), max_epochs)
    full = np.array(reference.forecaster.points.loss)
    assert reference.forecaster.points.x[: len(steps)] == steps  # the same run up to the stop
    assert np.argmin(full) < len(full) - 1 and full[-1] > 1.01 * full.min()
    assert callback.forecaster.points.loss[-1] <= 1.01 * full.min()
    # The warning names the basin and is not repeated while the state stays the same.
    texts = [str(w.message) for w in caught if "BasinEarlyStopping" in str(w.message)]
    assert len(texts) == len(set(texts)) and all("step" in t for t in texts)
    # Each announced state is also a TensorBoard text entry with a figure, and the stop draws the last one;
    # the first forecast draws one too, and the others wait 30 s (more than this run takes); one figure per
    # step (a change of state at the stop draws once). The stop has a text of its own, under its own tag.
    stop = (
        "snr/forecast/val_loss/stop",
        f"BasinEarlyStopping: stopping at step {callback.stopped_step}: {callback.stopping_reason}",
        callback.stopped_step,
    )
    assert recorder.texts[-1] == stop
    assert [text for _, text, _ in recorder.texts[:-1]] == texts
    figure_steps = [step for _, _, step in recorder.figures]
    first = int(next(f.x for f in callback.forecaster.history if f.d_star is not None))
    assert figure_steps == sorted({first, callback.stopped_step} | {step for _, _, step in recorder.texts})
    assert all(tag == "snr/forecast/val_loss/figure" for tag, _, _ in recorder.figures)
    logged = {k for _, metrics in recorder.metrics for k in metrics}
    for name in ("d_star", "d_star_low", "d_star_high", "steps_to_basin"):
        assert f"snr/forecast/val_loss/{name}" in logged
    assert all(math.isfinite(v) for _, m in recorder.metrics for v in m.values())


def test_the_replay_of_a_live_run_warns_and_stops_where_it_did(tmp_path, capsys):
    """Replay equals live: the TensorBoard run of a stopped fit, replayed by `snrmon forecast`, warns and
    stops at the same steps, from the training-loss mean the callback logged with its forecasts."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from snrmon.cli import main

    callback = BasinEarlyStopping(monitor="val_loss")
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(callback, _data(64, 0), 200, logger=logger)
    history = callback.forecaster.history
    assert callback.stopped_step > 0
    assert main(["forecast", str(tmp_path / "run" / "version_0"), "--tag", "val_loss", "--json"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert "snr/forecast/val_loss/train_loss" in captured.err  # said where the training loss came from
    assert [p["x"] for p in document["points"]] == [f.x for f in history]
    assert document["first_warning"] == next(f.x for f in history if f.warning)
    assert document["stop"] == callback.stopped_step
    assert [p["d_star"] for p in document["points"]] == [
        f.d_star if f.d_star is not None and math.isfinite(f.d_star) else None for f in history
    ]
    # Replayed from the logged curves (Lightning logs val_loss at the global step − 1): the same steps, those
    # the callback said and checkpoints are named by, not one less.
    run = str(tmp_path / "run" / "version_0")
    assert main(["forecast", run, "--tag", "val_loss", "--train-metric", "train_loss", "--json"]) == 0
    curves = json.loads(capsys.readouterr().out)
    assert [p["x"] for p in curves["points"]] == [f.x for f in history]
    assert curves["minimum"]["x"] == document["minimum"]["x"]


def test_the_training_set_snr_of_an_snr_monitor_is_fed_logged_and_replayed(tmp_path, capsys):
    """With an SNRMonitor (two microbatches a step; a short EMA, so its estimate follows the run closely),
    each new estimate of the training set's SNR is fed to the forecaster, logged with the forecast, and
    read back by the replay, which warns and stops where the live run did."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from snrmon.callbacks import SNRMonitor
    from snrmon.cli import main

    def fit(gradient_evidence: bool, logger=None):
        callback = BasinEarlyStopping(monitor="val_loss", gradient_evidence=gradient_evidence)
        monitor = SNRMonitor(ema_decay=0.8)
        seen = []  # the monitor's dataset SNR at each check of the callback: what it could read

        class Watch(L.Callback):  # after both (callbacks run in the order given)
            def on_validation_end(self, trainer, pl_module):
                seen.append((trainer.global_step, monitor.latest.get("snr/dataset_snr")))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fit([monitor, callback, Watch()], _data(64, 0), 300, logger=logger, accumulate_grad_batches=2,
                 log_every_n_steps=2, limit_train_batches=4)  # fmt: skip
        return callback, seen

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    callback, seen = fit(True, logger)
    assert callback.forecaster.decider.memorising  # this run memorises its 64 noisy labels
    values = dict(seen)
    logged = _fed_snr(tmp_path / "run" / "version_0")
    assert logged and all(math.isclose(values[step], value, rel_tol=1e-6) for step, value in logged.items())
    assert min(logged.values()) <= 1 < max(logged.values())
    # The replay reads the same values and decides the same.
    history = callback.forecaster.history
    assert main(["forecast", str(tmp_path / "run" / "version_0"), "--tag", "val_loss", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [p["x"] for p in document["points"]] == [f.x for f in history]
    assert document["first_warning"] == next((f.x for f in history if f.warning), None)
    assert document["stop"] == (callback.stopped_step or None)
    # With --train-metric the replay is of the curves alone, and says so.
    assert main(["forecast", str(tmp_path / "run" / "version_0"), "--tag", "val_loss", "--train-metric",
                 "train_loss"]) == 0  # fmt: skip
    assert "--train-metric replays the curves alone" in capsys.readouterr().err
    # Without the evidence (gradient_evidence=False): nothing fed, the curves alone.
    alone, _ = fit(False, recorder := Recorder())
    assert not alone.forecaster.decider.memorising and alone.forecaster.snr_streak == 0
    keys = {key for _, metrics in recorder.metrics for key in metrics}
    assert "snr/forecast/val_loss/train_loss" in keys and "snr/forecast/val_loss/dataset_snr" not in keys


def test_one_estimate_of_the_training_set_snr_is_fed_once():
    """A monitor that measures every 4th step and logs every 2nd rebuilds `latest` with the same estimate:
    the callback feeds each estimate once (two checks reading it are one measurement, not two in a row)."""
    from snrmon.callbacks import SNRMonitor

    monitor, callback, recorder = (
        SNRMonitor(every_n_steps=4),
        BasinEarlyStopping(monitor="val_loss"),
        Recorder(),
    )
    counts = []

    class Watch(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            counts.append(monitor.latest_steps)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit([monitor, callback, Watch()], _data(64, 0), 40, logger=recorder, accumulate_grad_batches=2,
             log_every_n_steps=1, limit_train_batches=4)  # fmt: skip
    fed = [
        m["snr/forecast/val_loss/dataset_snr"]
        for _, m in recorder.metrics
        if "snr/forecast/val_loss/dataset_snr" in m
    ]
    estimates = sorted(set(c for c in counts if c > 0))
    assert len(counts) > len(estimates) > 3  # checks that read an estimate already fed
    assert len(fed) == len(estimates)


@pytest.mark.parametrize("order", ["monitor first", "monitor last"])
def test_the_training_set_snr_is_read_at_each_check_not_only_at_logging_steps(order):
    """A monitor that logs less often than the callback checks (here: never, log_every_n_steps beyond the
    fit) is brought up to date at each check, in either order of the callbacks: each validation feeds the
    estimate of the steps before it, the value the monitor logs at that check."""
    from snrmon.callbacks import SNRMonitor

    monitor, callback, recorder = SNRMonitor(ema_decay=0.8), BasinEarlyStopping(), Recorder()
    checks = []  # (step, the monitor's measured steps) at each validation, after both callbacks

    class Watch(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            checks.append((trainer.global_step, monitor.latest_steps))

    callbacks = [monitor, callback] if order == "monitor first" else [callback, monitor]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit([*callbacks, Watch()], _data(64, 0), 30, logger=recorder, accumulate_grad_batches=2,
             log_every_n_steps=1000, limit_train_batches=4)  # fmt: skip
    fed = {step: m["snr/forecast/val_loss/dataset_snr"] for step, m in recorder.metrics
           if "snr/forecast/val_loss/dataset_snr" in m}  # fmt: skip
    logged = [m["snr/dataset_snr"] for _, m in recorder.metrics if "snr/dataset_snr" in m]
    # Logged once a step, at the step Lightning logs the validation's metrics at (not one before it).
    steps = [step for step, m in recorder.metrics if "snr/dataset_snr" in m]
    assert steps == [step for step, m in recorder.metrics if "val_loss" in m]
    assert checks == [(i + 1, i + 1) for i in range(30)]  # one step an epoch, measured by each check
    assert len(fed) == 30 and list(fed.values()) == pytest.approx(logged[:30], rel=1e-6)
    assert all(math.isfinite(value) and value > 0 for value in fed.values())


def test_a_monitor_placed_after_a_periodic_check_logs_each_step_once():
    """The check brings the monitor's values up to date (and logs them) inside the batch's hooks; the
    monitor's own log at that logging step, after it, is not a second one at the same step."""
    from snrmon.callbacks import SNRMonitor

    recorder = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit([BasinEarlyStopping(monitor="train_loss", check_every_n_steps=2), SNRMonitor()], _data(64, 0),
             6, logger=recorder, accumulate_grad_batches=2, log_every_n_steps=1)  # fmt: skip
    steps = [step for step, m in recorder.metrics if "snr/signal" in m]
    assert len(steps) >= 4 and len(steps) == len(set(steps))


def test_which_of_several_monitors_is_read_is_said(caplog):
    from snrmon.callbacks import SNRMonitor

    with warnings.catch_warnings(), caplog.at_level("INFO"):
        warnings.simplefilter("ignore")
        _fit([SNRMonitor(prefix="a"), SNRMonitor(prefix="b"), BasinEarlyStopping()], _data(64, 0), 2,
             accumulate_grad_batches=2)  # fmt: skip
    assert "2 SNRMonitors: the training-set SNR of the first (prefix 'a')" in caplog.text


def test_a_fit_too_short_for_a_forecast_says_so(caplog):
    from snrmon.callbacks import SNRMonitor

    callback = BasinEarlyStopping(monitor="val_loss")
    with warnings.catch_warnings(), caplog.at_level("INFO"):
        warnings.simplefilter("ignore")
        _fit([SNRMonitor(), callback], _data(64, 0), 4, accumulate_grad_batches=2)
    assert len(callback.forecaster.points.x) == 4
    assert "after 4 checks of `val_loss`, before the first forecast (10 points needed)" in caplog.text
    assert "gave no training-set SNR" not in caplog.text


def test_a_monitor_that_gives_no_training_set_snr_is_said_at_the_end(caplog):
    from snrmon.callbacks import SNRMonitor

    callback = BasinEarlyStopping(monitor="val_loss")
    with warnings.catch_warnings(), caplog.at_level("INFO"):
        warnings.simplefilter("ignore")  # (the monitor's own: one batch size a step)
        _fit([SNRMonitor(), callback], _data(64, 0), 12)  # no accumulation: the monitor measures nothing
    assert callback.forecaster.points.x and not callback.forecaster.decider.memorising
    assert "the SNRMonitor gave no training-set SNR" in caplog.text


def _fed_snr(run: Path) -> dict[float, float]:
    """The training set's SNR a BasinEarlyStopping(monitor="val_loss") logged as fed, by step."""
    from snrmon.logs.tables import read_table

    table = read_table(run, tag="snr/forecast/val_loss/dataset_snr")
    return dict(zip(table["step"].tolist(), table["loss"].tolist(), strict=True))


def test_a_warning_that_lapses_is_withdrawn_on_the_loggers_too():
    """The callback says the withdrawal as it says a warning: a line and a text entry (the forecasts here are
    scripted on top of the real ones, so that a warning comes and goes within a short fit)."""
    callback, recorder = BasinEarlyStopping(monitor="val_loss"), Recorder()
    ahead = dict(d_star=120.0, d_star_low=110.0, d_star_high=130.0, steps_to_basin=20.0, p_basin=0.7)
    lapsed = "no warning: the monitored loss still falls significantly"
    script = iter(
        [
            dict(d_star=500.0, p_basin=0.1, state="improving"),
            dict(ahead, warning=True, state="basin ahead"),
            dict(ahead, warning=False, state="improving", note=lapsed),
        ]
    )
    real = callback.watch.update  # (the watch's forecaster is made anew at fit start)

    def scripted(*args, **kwargs):
        forecast = real(*args, **kwargs)
        for name, value in next(script, {}).items():
            setattr(forecast, name, value)
        return forecast

    callback.watch.update = scripted
    with pytest.warns(UserWarning, match="basin ahead") as caught:
        _fit(callback, _data(64, 0), 3, logger=recorder)
    said = [str(w.message) for w in caught if "BasinEarlyStopping" in str(w.message)]
    withdrawn = (
        "BasinEarlyStopping: val_loss: warning withdrawn at step 6: improving again (the monitored loss still"
    )
    assert len(said) == 2 and said[1].startswith(withdrawn)
    assert [text for _, text, _ in recorder.texts] == said


def test_an_improving_run_is_not_stopped():
    callback = BasinEarlyStopping(monitor="val_loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no basin warning either
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|log_every_n_steps).*")
        trainer, _ = _fit(callback, _Fresh(), max_epochs=40)
    assert callback.stopped_step == 0 and callback.stopping_reason is None
    assert trainer.current_epoch == 40
    assert len(callback.forecaster.history) == 40


def test_a_missing_metric_names_the_logged_ones():
    with pytest.raises(RuntimeError, match="`val_los`.*`val_loss`"):
        _fit(BasinEarlyStopping(monitor="val_los"), _data(64, 0), max_epochs=2)
    callback = BasinEarlyStopping(monitor="val_los", strict=False)
    with pytest.warns(RuntimeWarning, match="not available"):
        _fit(callback, _data(64, 0), max_epochs=2)
    assert not callback.forecaster.points.x


def test_checks_every_n_steps_on_a_training_metric():
    callback = BasinEarlyStopping(monitor="train_loss", check_every_n_steps=3)
    _fit(callback, _data(64, 0), max_epochs=5, log_every_n_steps=1)
    assert callback.forecaster.points.x == [3.0, 6.0, 9.0]
    for bad in (0, 1.5, True):  # (1.5 checked every third step, True every step)
        with pytest.raises(ValueError, match="check_every_n_steps must be a positive integer"):
            BasinEarlyStopping(check_every_n_steps=bad)
    assert BasinEarlyStopping(check_every_n_steps=np.int64(5)).check_every_n_steps == 5
    # A validation metric checked every step adds a point once per validation (not its stale value again),
    # and a periodic check before it is first logged waits instead of failing.
    per_step = BasinEarlyStopping(monitor="val_loss", check_every_n_steps=1)
    _fit(per_step, _data(64, 0), max_epochs=4, check_val_every_n_epoch=2)
    assert len(per_step.forecaster.points.x) == 1  # validations after epochs 2 and 4; the last at its step
    # A metric still missing after a validation is an error, as for the check after each validation.
    with pytest.raises(RuntimeError, match="`val_los`, which is not available"):
        _fit(BasinEarlyStopping(monitor="val_los", check_every_n_steps=1), _data(64, 0), max_epochs=1)
    # Without validation, a training metric not logged in the fit's first whole epoch is likely misnamed:
    # a warning then (not an error: a metric may be logged every k steps, k beyond an epoch), the error at
    # the end of training as before.
    epochs = []

    class Epochs(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            epochs.append(trainer.current_epoch)

    misnamed = BasinEarlyStopping(monitor="train_los", check_every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="`train_los` was not logged in a whole epoch") as said:
        with pytest.raises(RuntimeError, match="`train_los`, which is not available"):
            _fit([misnamed, Epochs()], _data(64, 0), max_epochs=4, limit_val_batches=0)
    early = [w for w in said if "whole epoch" in str(w.message)]
    assert len(early) == 1 and epochs == [0, 1, 2, 3]

    # A metric logged every 5 steps (epochs of 2 steps) is no mistake: no error, its points taken.
    class Sparse(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_step > 0 and self.global_step % 5 == 0:  # (first at step 5, in epoch 2)
                self.log("sparse_loss", loss.detach())
            return loss

    sparse = BasinEarlyStopping(monitor="sparse_loss", check_every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="was not logged in a whole epoch"):
        _fit(sparse, _data(64, 0), max_epochs=12, limit_val_batches=0, model=Sparse())
    assert sparse.forecaster.points.x


def test_a_periodic_check_resumed_without_validation_goes_on(tmp_path):
    """A checkpoint's epoch is restored after on_fit_start: the first-epoch warning counts from the epoch the
    resumed fit starts at, and the metric, logged again in it, is no mistake."""
    first = BasinEarlyStopping(monitor="train_loss", check_every_n_steps=1)
    trainer, model = _fit(first, _data(64, 0), max_epochs=2, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = BasinEarlyStopping(monitor="train_loss", check_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer, _ = _fit(
            resumed, _data(64, 0), max_epochs=5, limit_val_batches=0, ckpt_path=tmp_path / "two.ckpt"
        )
    assert trainer.current_epoch == 5 and resumed.forecaster.points.x[-1] == trainer.global_step


def test_forecast_history_survives_resume(tmp_path):
    first = BasinEarlyStopping(monitor="val_loss")
    trainer, model = _fit(first, _data(64, 0), max_epochs=12)
    assert any(f.d_star is not None for f in first.forecaster.history)  # past min_points: forecasts to save
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    torch.load(path, weights_only=True)  # torch's default: plain Python values and tensors only
    resumed = BasinEarlyStopping(monitor="val_loss")
    _fit(resumed, _data(64, 0), max_epochs=16, ckpt_path=str(path), model=Regressor())
    before = first.forecaster.state_dict()["points"]
    after = resumed.forecaster.points
    assert after.x[: len(before["x"])] == before["x"] and after.loss[: len(before["loss"])] == before["loss"]
    assert len(after.x) == 16  # the four new validations continue the same curve
    history = [f.as_dict() for f in first.forecaster.history]
    assert [f.as_dict() for f in resumed.forecaster.history[:12]] == history


def test_a_non_finite_training_loss_is_left_out_of_the_interval_mean():
    """One batch whose returned loss is NaN (its gradient finite: a NaN constant added) is left out of the
    training-loss mean of its interval; the ratio forecast goes on (it was lost for a window of checks)."""

    class OneNaN(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            bad = self.global_step == 30 and batch_idx == 0
            return loss + torch.tensor(math.nan if bad else 0.0)

    callback = BasinEarlyStopping()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(callback, _data(64, 0), 24, model=OneNaN())
    train = callback.forecaster.points.train
    assert len(train) == 24 and all(math.isfinite(value) for value in train)
    assert all(f.method == "ratio" for f in callback.forecaster.history[10:])


def test_a_checkpoint_loaded_to_validate_is_no_curve_for_the_next_fit(tmp_path):
    first = BasinEarlyStopping()
    trainer, model = _fit(first, _data(64, 0), 14)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    callback = BasinEarlyStopping()
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer = L.Trainer(max_epochs=6, callbacks=[callback], enable_checkpointing=False, **quiet)
    validation = DataLoader(_data(512, 1), batch_size=512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(model, validation, ckpt_path=str(tmp_path / "mid.ckpt"), verbose=False)
        trainer.fit(model, DataLoader(_data(64, 0), batch_size=32), validation)
    assert callback.forecaster.points.x == [2.0 * (i + 1) for i in range(6)]  # this fit's own curve
    # Nor does it replace what a finished fit holds: its curve and its stop stay the callback's.
    held = callback.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(model, validation, ckpt_path=str(tmp_path / "mid.ckpt"), verbose=False)
    assert json.dumps(callback.state_dict()) == json.dumps(held)


def test_a_monitor_checkpoint_loaded_to_validate_is_no_state_for_the_next_fit(tmp_path):
    from snrmon.callbacks import SNRMonitor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, model = _fit(SNRMonitor(), _data(64, 0), 8, accumulate_grad_batches=2)
        trainer.save_checkpoint(tmp_path / "mid.ckpt")
        monitor = SNRMonitor()
        quiet = dict(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer = L.Trainer(max_epochs=3, callbacks=[monitor], logger=False, enable_checkpointing=False,
                            accumulate_grad_batches=2, **quiet)  # fmt: skip
        validation = DataLoader(_data(512, 1), batch_size=512)
        trainer.validate(model, validation, ckpt_path=str(tmp_path / "mid.ckpt"), verbose=False)
        trainer.fit(model, DataLoader(_data(64, 0), batch_size=32), validation)
    assert monitor.latest_steps == 3  # this fit's three steps, not the checkpoint's eight before them


def test_the_logs_of_a_resumed_fit_replay_with_the_earlier_version(tmp_path, capsys):
    """A fit resumed from a checkpoint logs to a new version: replayed alone, its logs lack the points the
    restored forecaster held, and the replay says so; given with the earlier version, the replay is the
    live run's, point by point."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from snrmon.cli import main

    first = BasinEarlyStopping()
    trainer, _ = _fit(first, _data(64, 0), 14, logger=TensorBoardLogger(tmp_path, name="run"))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = BasinEarlyStopping()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(resumed, _data(64, 0), 30, logger=TensorBoardLogger(tmp_path, name="run"),
             ckpt_path=str(tmp_path / "mid.ckpt"), model=Regressor())  # fmt: skip
    history = resumed.forecaster.history
    assert len(history) == 30 and any(f.d_star is not None for f in history[14:])
    versions = [str(tmp_path / "run" / f"version_{v}") for v in (0, 1)]

    assert main(["forecast", versions[1], "--tag", "val_loss", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "the live BasinEarlyStopping held 15 points, this replay 1" in err
    assert "give the earlier versions first" in err

    assert main(["forecast", *versions, "--tag", "val_loss", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "held" not in err
    points = json.loads(out)["points"]
    assert [p["x"] for p in points] == [f.x for f in history]
    assert [p["p_basin"] for p in points] == [f.p_basin for f in history]
    assert [p["state"] for p in points] == [f.state for f in history]
    # Out of order, the later part would replace all of the earlier one: refused.
    assert main(["forecast", *reversed(versions), "--tag", "val_loss"]) == 2
    assert "give the parts of one run in order" in capsys.readouterr().err


def test_a_prior_of_the_family_forecasts_from_the_first_check(caplog):
    # A Shannon-law family (the constants of examples/make_law_data.py) and this run's size: the basin in
    # steps of a million tokens is logged from the first check, before the data could place it.
    family = SHANNON_FAMILY
    callback = BasinEarlyStopping(
        prior={"law": "shannon", "params": family}, n_params=1e8, tokens_per_step=1e6, verbose=True
    )
    recorder = Recorder()
    with caplog.at_level("INFO"):
        _fit(callback, _data(64, 0), max_epochs=2, logger=recorder)
    first = callback.forecaster.history[0]
    assert first.method == "prior" and first.d_star > 0 and not first.warning
    logged = [
        m["snr/forecast/val_loss/d_star"] for _, m in recorder.metrics if "snr/forecast/val_loss/d_star" in m
    ]
    assert logged[0] == pytest.approx(first.d_star)
    assert "the prior puts the basin" in caplog.text
    # Without this run's size the family's law cannot be carried over: a warning says so at the start.
    partial = BasinEarlyStopping(prior={"law": "shannon", "params": family})
    with pytest.warns(UserWarning, match="needs this run's parameter count"):
        _fit(partial, _data(64, 0), max_epochs=1)


def _run_ddp(out: Path, *options: str) -> list[dict]:
    """tests/basin_ddp_script.py on 2 CPU ranks (gloo; Lightning relaunches it for rank 1): each rank's JSON.
    A run past the timeout (a rank waiting for the other in a collective) fails the test, and takes both
    ranks down with it (rank 1 is rank 0's child: the whole process group goes)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK"):
        env.pop(name, None)
    script = Path(__file__).with_name("basin_ddp_script.py")
    command = [sys.executable, str(script), "--out", str(out), *options]
    process = subprocess.Popen(
        command, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"the DDP run hung (killed after 180 s): {stderr[-2000:]}")
    assert process.returncode == 0, stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.ddp
def test_ranks_stop_together_under_ddp(tmp_path):
    ranks = _run_ddp(tmp_path)
    # Every rank forecasts from the same curves: the validation loss is synced by Lightning, the training loss
    # (each rank its own shard) averaged across ranks by the callback ...
    assert ranks[0]["val"] == ranks[1]["val"] and ranks[0]["train"] == ranks[1]["train"]
    # ... so one decision: training stopped, at the same step on both ranks.
    assert ranks[0]["stopped_step"] > 0
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == ranks[0]["stopped_step"]
    assert any(r["stops"][-1] for r in ranks)
    assert ranks[0]["stopping_reason"] == ranks[1]["stopping_reason"]
    # The SNRMonitor's training-set SNR, read at each check on both ranks alike (it logs every 1000 steps).
    assert ranks[0]["monitor_steps"] == ranks[1]["monitor_steps"] == ranks[0]["global_step"]
    assert ranks[0]["fed_snr"] == ranks[1]["fed_snr"] and ranks[0]["fed_snr"] is not None
    assert ranks[0]["snr_streak"] == ranks[1]["snr_streak"]


@pytest.mark.ddp
def test_a_per_rank_metric_neither_hangs_nor_splits_the_stopping_reason(tmp_path):
    # A metric each rank logs for itself, checked every step: rank 1's value repeats at consecutive steps
    # while rank 0's changes. Every rank still joins every collective of each check (before, rank 1 skipped
    # them as "not a new point" and the ranks waited on each other), and adds the point alike.
    ranks = _run_ddp(tmp_path, "--per-rank")
    assert ranks[0]["x"] == ranks[1]["x"] and len(ranks[0]["x"]) == ranks[0]["global_step"]
    # Only rank 0 could decide (rank 1 never forecasts); both stop at its step, and both hold its reason.
    assert ranks[0]["stops"][-1] and not any(ranks[1]["stops"])
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == ranks[1]["stopped_step"] > 70
    assert ranks[1]["stopping_reason"] == ranks[0]["stopping_reason"]
    assert ranks[0]["stopping_reason"].startswith("rank_metric: basin entered")


def test_the_training_loss_is_collected_unscaled_under_gradient_accumulation():
    class Recording(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.returned.append(loss.item())
            return loss

    model = Recording()
    model.returned = []
    callback = BasinEarlyStopping(monitor="val_loss")
    _fit(callback, _data(64, 0), max_epochs=2, model=model, accumulate_grad_batches=2)
    # Two micro-batches an epoch, one optimizer step: each check's training loss is their plain mean.
    expected = [np.mean(model.returned[0:2]), np.mean(model.returned[2:4])]
    assert callback.forecaster.points.train == pytest.approx(expected, rel=1e-6)


class Scored(Regressor):
    """Logs, beside val_loss, two higher-is-better metrics: val_score = -val_loss (the same turning point,
    mirrored) and val_acc = exp(-val_loss), in (0, 1). ``manual=True``: manual optimisation whose
    training_step returns nothing, which leaves the forecaster the monitored value alone."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log_dict({"val_loss": loss, "val_score": -loss, "val_acc": torch.exp(-loss)})


def _fractional_steps(text: str) -> list[str]:
    return re.findall(r"step \d+\.\d", text)


def test_a_higher_is_better_metric_warns_and_stops_as_its_mirrored_loss():
    runs = {}
    for monitor, mode in (("val_loss", "min"), ("val_score", "max")):
        callback = BasinEarlyStopping(monitor=monitor, mode=mode)
        with pytest.warns(UserWarning, match="basin") as caught:
            torch.manual_seed(0)  # the same initial weights in both runs
            trainer, _ = _fit(callback, _data(64, 0), max_epochs=200, model=Scored())
        texts = [str(w.message) for w in caught if str(w.message).startswith("BasinEarlyStopping")]
        runs[mode] = callback, texts
    loss, score = runs["min"][0], runs["max"][0]
    # The same decisions at the same steps: the forecaster saw the same curve.
    decisions = [[(f.x, f.state, f.warning, f.stop) for f in c.forecaster.history] for c in (loss, score)]
    assert decisions[0] == decisions[1]
    assert 0 < score.stopped_step == loss.stopped_step == trainer.global_step

    # The messages quote the metric's own values (val_score ≈ -val_loss), in whole steps.
    def mirrored(text: str) -> str:
        return text.replace("val_loss", "val_score").replace("≈ ", "≈ -")

    assert score.stopping_reason == mirrored(loss.stopping_reason)
    assert "val_score there ≈ -0." in score.stopping_reason
    assert runs["max"][1] == [mirrored(t) for t in runs["min"][1]] and runs["max"][1]
    assert not _fractional_steps(" ".join(runs["max"][1] + [score.stopping_reason]))
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'maximum'"):
        BasinEarlyStopping(monitor="val_acc", mode="maximum")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"monitor": None}, "monitor must name a logged metric"),
        ({"monitor": ""}, "monitor must name a logged metric"),
        ({"min_points": math.nan}, "min_points must be a whole number of points, got nan"),
        ({"min_points": 10.5}, "min_points must be a whole number"),
        ({"min_points": True}, "min_points must be a whole number"),
        ({"n_params": -5}, "n_params .* must be a positive number, got -5"),
        ({"n_params": "abc"}, "n_params .* must be a positive number, got 'abc'"),
        ({"confidence": "0.9"}, "confidence must be a number, got '0.9'"),
        ({"horizon": math.inf}, "horizon must be a finite number >= 0, got inf"),
        ({"tokens_per_step": True}, "tokens_per_step must be a positive number, got True"),
        ({"strict": "no"}, "strict must be True or False, got 'no'"),
        ({"gradient_evidence": "no"}, "gradient_evidence must be True or False"),
    ],
)
def test_bad_arguments_are_refused_when_the_callback_is_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BasinEarlyStopping(**kwargs)
    numpy_numbers = BasinEarlyStopping(
        min_points=np.int64(12), n_params=np.float32(1e6), horizon=np.float32(0.5)
    )
    assert numpy_numbers.watch.forecaster.min_points == 12 and numpy_numbers.watch.forecaster.horizon == 0.5


def test_a_state_that_is_not_the_callbacks_is_refused_before_anything_changes():
    callback = BasinEarlyStopping()
    before = callback.state_dict()
    with pytest.raises(ValueError, match="not a BasinEarlyStopping state: it lacks forecaster, announced"):
        callback.load_state_dict({"stopped_step": 3})
    partial = before | {"forecaster": {k: v for k, v in before["forecaster"].items() if k != "history"}}
    with pytest.raises(ValueError, match="it lacks forecaster's history"):
        callback.load_state_dict(partial)
    assert callback.state_dict() == before


def test_a_run_without_a_training_loss_replays_at_the_callbacks_own_checks(tmp_path, capsys):
    """Manual optimisation (training_step returns nothing): no training-loss mean is logged at any check;
    the replay still reads the callback's checks (at the trainer's global step, not one step earlier where
    Lightning logged the metric) and decides as the live run did."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from snrmon.cli import main

    callback = BasinEarlyStopping()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(callback, _data(64, 0), 16, logger=TensorBoardLogger(tmp_path, name="run", version=0),
             model=Scored(manual=True))  # fmt: skip
    history = callback.forecaster.history
    assert any(f.d_star is not None for f in history)
    assert main(["forecast", str(tmp_path / "run" / "version_0"), "--tag", "val_loss", "--json"]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    live = [(f.x, f.method, f.p_basin) for f in history]
    assert [(p["x"], p["method"], p["p_basin"]) for p in points] == live


def test_a_loss_only_forecast_of_values_at_or_below_zero_says_why():
    # No training loss (manual optimisation): the law forecast, which needs positive values. val_acc in
    # mode "max" is forecast as -val_acc < 0: said once, with the reason, instead of never forecasting.
    callback = BasinEarlyStopping(monitor="val_acc", mode="max")
    with pytest.warns(RuntimeWarning, match="log-losses") as caught:
        _fit(callback, _data(64, 0), max_epochs=12, model=Scored(manual=True))
    said = [str(w.message) for w in caught if "log-losses" in str(w.message)]
    assert len(said) == 1 and "mode='max' forecasts -val_acc" in said[0] and "no training loss" in said[0]
    assert all(f.d_star is None for f in callback.forecaster.history)  # what the warning explains
    # A positive loss on the same path: nothing to say.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _fit(BasinEarlyStopping(monitor="val_loss"), _data(64, 0), max_epochs=2, model=Scored(manual=True))


def test_checks_after_validation_need_validation():
    # Lightning's EarlyStopping fails on its missing metric: here the fit fails at its start, saying why.
    with pytest.raises(RuntimeError, match="limit_val_batches=0 turns validation off"):
        _fit(BasinEarlyStopping(monitor="val_loss"), _data(64, 0), max_epochs=2, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match="it would never check") as caught:
        _fit(BasinEarlyStopping(strict=False), _data(64, 0), max_epochs=1, limit_val_batches=0)
    assert sum("BasinEarlyStopping" in str(w.message) for w in caught) == 1  # said once
    # Validation on, but none within the fit (every 5 epochs of 2): said at the end.
    with pytest.warns(RuntimeWarning, match="no validation ran during this fit"):
        _fit(BasinEarlyStopping(monitor="val_loss"), _data(64, 0), max_epochs=2, check_val_every_n_epoch=5)
    # Checks on a training metric need no validation.
    callback = BasinEarlyStopping(monitor="train_loss", check_every_n_steps=1)
    _fit(callback, _data(64, 0), max_epochs=2, limit_val_batches=0, log_every_n_steps=1)
    assert callback.forecaster.points.x == [1.0, 2.0, 3.0, 4.0]


def test_a_callback_used_for_another_fit_starts_afresh():
    # A new Trainer on the same data is a new run: its curve must not be appended to the last fit's (whose
    # steps would swallow the new checks as "not a new step").
    callback = BasinEarlyStopping(monitor="val_loss")
    _fit(callback, _data(64, 0), max_epochs=4)
    first = [f.as_dict() for f in callback.forecaster.history]
    _fit(callback, _data(64, 0), max_epochs=3)  # the same run again, one validation shorter
    assert [f.as_dict() for f in callback.forecaster.history] == first[:3]
    assert callback.stopping_reason is None and callback.stopped_step == 0


class _EveryThirdEpoch(Regressor):
    def validation_step(self, batch, batch_idx):
        if self.current_epoch % 3 == 0:
            super().validation_step(batch, batch_idx)


def test_a_metric_not_logged_at_a_validation_adds_no_point():
    # Lightning keeps the last logged value between validations: a check after a validation that did not
    # log the metric must not feed that stale value again as a new point.
    callback = BasinEarlyStopping(monitor="val_loss")
    _fit(callback, _data(64, 0), max_epochs=12, model=_EveryThirdEpoch())
    assert callback.forecaster.points.x == [2.0, 8.0, 14.0, 20.0]  # 2 steps an epoch; epochs 0, 3, 6, 9


class _NaNMetric(Regressor):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(math.nan))


def test_a_metric_that_is_never_finite_is_said_once():
    callback = BasinEarlyStopping(monitor="val_loss")
    with pytest.warns(RuntimeWarning, match="val_loss is nan at step 2") as caught:
        _fit(callback, _data(64, 0), max_epochs=6, model=_NaNMetric())
    assert sum("is nan" in str(w.message) for w in caught) == 1


def test_the_training_loss_since_the_last_check_survives_a_checkpoint(tmp_path):
    # A checkpoint between two checks carries the training loss summed since the last one: the next check
    # after a resume is fed the mean over the whole interval, as without the interruption.
    first = BasinEarlyStopping(monitor="val_loss")
    trainer, model = _fit(first, _data(64, 0), max_epochs=3, max_steps=5)  # checks at 2 and 4, then step 5
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][first.state_key]
    assert state["train_count"] == 1 and math.isfinite(state["train_sum"])
    resumed = BasinEarlyStopping(monitor="val_loss")
    resumed.load_state_dict(state)
    assert resumed.state_dict()["train_count"] == 1
    assert resumed.state_dict()["train_sum"] == state["train_sum"]
