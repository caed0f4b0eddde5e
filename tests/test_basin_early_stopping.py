"""BasinEarlyStopping through real (small, CPU, seconds) Trainer.fit runs.

The overfitting run: a 128-unit MLP regressing a smooth target with heavy label noise on 64 samples; its
validation loss (512 clean-distribution samples) falls, then rises as the noise is memorised. The improving
run: the same model on fresh samples every step (no memorisation, no basin).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
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
        callbacks=[callback],
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
    # step (a change of state at the stop draws once).
    assert [text for _, text, _ in recorder.texts] == texts
    figure_steps = [step for _, _, step in recorder.figures]
    first = int(next(f.x for f in callback.forecaster.history if f.d_star is not None))
    assert figure_steps == sorted({first, callback.stopped_step} | {step for _, _, step in recorder.texts})
    assert all(tag == "snr/forecast/val_loss/figure" for tag, _, _ in recorder.figures)
    logged = {k for _, metrics in recorder.metrics for k in metrics}
    for name in ("d_star", "d_star_low", "d_star_high", "steps_to_basin"):
        assert f"snr/forecast/val_loss/{name}" in logged
    assert all(math.isfinite(v) for _, m in recorder.metrics for v in m.values())


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
    with pytest.raises(ValueError, match="check_every_n_steps"):
        BasinEarlyStopping(check_every_n_steps=0)
    # A validation metric checked every step adds a point once per validation (not its stale value again),
    # and a periodic check before it is first logged waits instead of failing.
    per_step = BasinEarlyStopping(monitor="val_loss", check_every_n_steps=1)
    _fit(per_step, _data(64, 0), max_epochs=4, check_val_every_n_epoch=2)
    assert len(per_step.forecaster.points.x) == 1  # validations after epochs 2 and 4; the last at its step
    # A metric still missing after a validation is an error, as for the check after each validation.
    with pytest.raises(RuntimeError, match="`val_los`, which is not available"):
        _fit(BasinEarlyStopping(monitor="val_los", check_every_n_steps=1), _data(64, 0), max_epochs=1)


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


@pytest.mark.ddp
def test_ranks_stop_together_under_ddp(tmp_path):
    # tests/basin_ddp_script.py on 2 CPU ranks (gloo); Lightning relaunches it for rank 1.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK"):
        env.pop(name, None)
    script = Path(__file__).with_name("basin_ddp_script.py")
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    # Every rank forecasts from the same curves: the validation loss is synced by Lightning, the training loss
    # (each rank its own shard) averaged across ranks by the callback ...
    assert ranks[0]["val"] == ranks[1]["val"] and ranks[0]["train"] == ranks[1]["train"]
    # ... so one decision: training stopped, at the same step on both ranks.
    assert ranks[0]["stopped_step"] > 0
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == ranks[0]["stopped_step"]
    assert any(r["stops"][-1] for r in ranks)


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
