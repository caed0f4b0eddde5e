"""BasinEarlyStopping's forecast figure and text on every logger that takes them (callbacks/_figures.py).

Each test fits the overfitting run of test_basin_early_stopping.py (it warns, then stops: about 120 steps)
with a real logger and, beside it, the Recorder, which takes what TensorBoard takes (that test checks it
against the warnings): W&B (offline, no network) and MLflow (a local file store) must hold the same texts at
the same steps and a figure at each of the Recorder's figure steps, read back from what they wrote.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import warnings
from pathlib import Path

import pytest
from PIL import Image
from test_basin_early_stopping import Recorder, _data, _fit

from snrmon.callbacks import BasinEarlyStopping
from snrmon.forecast.plot import DPI, FIGSIZE

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))  # the figure's PNG, in pixels


def _fit_warning_run(logger) -> tuple[BasinEarlyStopping, Recorder, list[str]]:
    """The overfitting run with ``logger`` and a Recorder; returns the callback, the Recorder and the
    callback's warnings."""
    callback, recorder = BasinEarlyStopping(monitor="val_loss"), Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(callback, _data(64, 0), 200, logger=[logger, recorder])
    said = [str(w.message) for w in caught if str(w.message).startswith("BasinEarlyStopping: val_loss:")]
    assert callback.stopped_step > 0 and said, "the run should warn and stop"
    assert [text for _, text, _ in warnings_of(recorder)] == said
    assert [entry for entry in recorder.texts if entry[0] == STOP] == [
        (STOP, stop_text(callback), callback.stopped_step)
    ]
    assert not [w for w in caught if "failed to take a figure" in str(w.message)]
    return callback, recorder, said


STOP = "snr/forecast/val_loss/stop"  # the tag of the stop's text; the warnings' is snr/forecast/val_loss


def warnings_of(recorder: Recorder) -> list[tuple[str, str, int]]:
    return [entry for entry in recorder.texts if entry[0] == "snr/forecast/val_loss"]


def stop_text(callback: BasinEarlyStopping) -> str:
    return f"BasinEarlyStopping: stopping at step {callback.stopped_step}: {callback.stopping_reason}"


def _is_figure(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size == SIZE


def test_wandb_gets_the_figure_and_the_text(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="W&B is optional: pip install -e '.[loggers]'")
    from lightning.pytorch.loggers import WandbLogger

    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path))  # nothing written to the home directory
    monkeypatch.setenv("WANDB_MODE", "offline")  # (restored after the test: WandbLogger sets it too)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="snrmon-test")
    try:
        callback, recorder, said = _fit_warning_run(logger)
        files = Path(logger.experiment.dir)  # the offline run's files, as W&B would upload them
    finally:
        wandb.finish()
    # One image per figure of the Recorder (W&B numbers media by its own step, one per log call).
    images = sorted((files / "media" / "images" / "snr" / "forecast" / "val_loss").glob("figure_*.png"))
    assert len(images) == len(recorder.figures) and all(_is_figure(path) for path in images)
    # One table per text, its row the global step and the text.
    rows = []
    for table in (files / "media" / "table" / "snr" / "forecast").glob("val_loss_*.table.json"):
        document = json.loads(table.read_text())
        assert document["columns"] == ["step", "text"]
        rows += document["data"]
    assert sorted(rows) == sorted([step, text] for _, text, step in warnings_of(recorder))
    assert sorted(text for _, text in rows) == sorted(said)
    (stop,) = (files / "media" / "table" / "snr" / "forecast" / "val_loss").glob("stop_*.table.json")
    assert json.loads(stop.read_text())["data"] == [[callback.stopped_step, stop_text(callback)]]


def test_mlflow_gets_the_figure_and_the_text(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="MLflow is optional: pip install -e '.[loggers]'")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
    uri = "file:" + str(tmp_path / "mlruns")
    logger = MLFlowLogger(tracking_uri=uri)
    callback, recorder, said = _fit_warning_run(logger)
    client = MlflowClient(uri)
    # Artifacts <tag>/step_<global step>.png and .txt: one per figure and text, none overwritten.
    figures = [a.path for a in client.list_artifacts(logger.run_id, "snr/forecast/val_loss/figure")]
    assert figures == [f"snr/forecast/val_loss/figure/step_{step:08d}.png" for _, _, step in recorder.figures]
    downloaded = Path(client.download_artifacts(logger.run_id, "snr/forecast/val_loss", str(tmp_path)))
    assert all(_is_figure(path) for path in (downloaded / "figure").iterdir())
    texts = {
        int(re.fullmatch(r"step_(\d+)\.txt", p.name)[1]): p.read_text() for p in downloaded.glob("*.txt")
    }
    assert texts == {step: text for _, text, step in warnings_of(recorder)}
    assert sorted(texts.values()) == sorted(said)
    stop = downloaded / "stop" / f"step_{callback.stopped_step:08d}.txt"
    assert [p.name for p in stop.parent.iterdir()] == [stop.name] and stop.read_text() == stop_text(callback)


def test_a_logger_that_takes_neither_says_where_the_figure_is(tmp_path, caplog):
    """CSVLogger: no crash, one info line naming the command that draws the figure from its log; the
    command runs as named."""
    from lightning.pytorch.loggers import CSVLogger

    from snrmon.cli import main

    callback = BasinEarlyStopping(monitor="val_loss")
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(callback, _data(64, 0), 200, logger=CSVLogger(tmp_path))
    assert callback.stopped_step > 0
    lines = [r.getMessage() for r in caplog.records if "snrmon forecast" in r.getMessage()]
    assert len(lines) == 1 and "CSVLogger takes no figures or text" in lines[0]
    command = shlex.split(re.search(r"`(snrmon forecast [^`]*)`", lines[0])[1])
    csv = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    assert command[:3] == ["snrmon", "forecast", str(csv)]
    assert command[-2:] == ["--plot", "forecast.png"]
    plot = tmp_path / "forecast.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*command[1:-1], str(plot)]) == 0
    assert plot.stat().st_size > 0


def test_a_logger_that_fails_to_take_a_figure_is_warned_about_once():
    """A figure is not worth a crashed run: the logger's error becomes one warning, and training goes on."""

    class Broken(Recorder):
        def add_figure(self, tag: str, figure, step: int) -> None:
            raise OSError("disk full")

    callback = BasinEarlyStopping(monitor="val_loss")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(callback, _data(64, 0), 200, logger=Broken())
    failures = [str(w.message) for w in caught if "failed to take a figure" in str(w.message)]
    assert failures == ["BasinEarlyStopping: Broken failed to take a figure or text: OSError('disk full')"]
    assert callback.stopped_step > 0


def test_a_logger_whose_experiment_raises_is_warned_about_once():
    """A logger's ``experiment`` that raises once the fit has begun (a tracking server gone) is skipped with
    one warning, as a failing figure is: the run goes on and stops as without it."""

    class Gone(Recorder):
        """Its server goes away once training has logged its first metrics."""

        @property
        def experiment(self):
            if self.metrics:
                raise ConnectionError("tracking server down")
            return self

    callback = BasinEarlyStopping(monitor="val_loss")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(callback, _data(64, 0), 200, logger=Gone())
    failures = [str(w.message) for w in caught if "failed to take a figure" in str(w.message)]
    assert failures == [
        "BasinEarlyStopping: Gone failed to take a figure or text: ConnectionError('tracking server down')"
    ]
    assert callback.stopped_step > 0
