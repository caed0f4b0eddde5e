"""What TensorBoard shows of a run with SNRMonitor: logs from a real ``Trainer.fit``, read back through a
real ``tensorboard`` server's HTTP data API (the one its web page uses), and the band series of the layout.

Helpers live in this file (there is no conftest).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snrmon.callbacks import SNRMonitor
from snrmon.callbacks.tensorboard_layout import LOSS_TITLE, chart_series, snr_layout
from snrmon.callbacks.tensorboard_loss_runs import LOSS_TAG, sub_run
from snrmon.logs import read_table

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

SERVER_WAIT_S = 60  # TensorBoard starts in a few seconds; a loaded CI machine gets more
LOSS_RUNS = {"tiny/version_0/train/loss", "tiny/version_0/val_loss"}  # the sub-runs of Regression's losses


class Regression(L.LightningModule):
    """A small MLP; its two top-level layers are the monitor's two groups. Loss names in two common styles."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 16), nn.Linear(16, 1)

    def _loss(self, batch):
        x, y = batch
        return F.mse_loss(self.out(torch.tanh(self.hidden(x))), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def train(root: Path) -> tuple[SNRMonitor, dict[str, float]]:
    """12 optimizer steps of 4 microbatches, logged to TensorBoard (run ``tiny/version_0``) and to a CSV, with
    a second monitor (prefix ``all``, no groups, ``log_details``) as two monitors on one trainer."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.5 * torch.randn(512, 1, generator=gen)
    data = TensorDataset(x, y)
    monitor = SNRMonitor(groups=1, prog_bar=False)
    trainer = L.Trainer(
        max_steps=12,
        accumulate_grad_batches=4,
        log_every_n_steps=1,
        val_check_interval=16,  # microbatches: every 4 optimizer steps
        limit_val_batches=2,
        callbacks=[monitor, SNRMonitor(prefix="all", prog_bar=False, log_details=True)],
        logger=[
            TensorBoardLogger(root, name="tiny", default_hp_metric=False),
            CSVLogger(root, name="csv"),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    everything = trainer.callbacks[1]
    trainer.fit(
        Regression(),
        DataLoader(data, batch_size=8, shuffle=True, generator=gen),
        DataLoader(data, batch_size=64),
    )
    return monitor, everything.latest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tensorboard_executable() -> str:
    """The ``tensorboard`` command installed beside this interpreter, as a user of this venv runs it."""
    beside = Path(sys.executable).parent / "tensorboard"
    found = str(beside) if beside.exists() else shutil.which("tensorboard")
    if found is None:
        pytest.skip("no tensorboard command")
    return found


def get_json(base: str, path: str, **params: str):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@contextlib.contextmanager
def tensorboard_server(logdir: Path, log: Path) -> Iterator[str]:
    """A ``tensorboard --logdir logdir`` on a free local port; yields its base URL, always stops it."""
    port = free_port()
    command = [tensorboard_executable(), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def wait_for_tags(base: str, run: str, wanted: set[str], log: Path) -> dict[str, dict]:
    """The server's scalar tags of ``run`` once they include ``wanted`` (it loads event files in the
    background after it starts); fails with the server's output after SERVER_WAIT_S."""
    deadline = time.monotonic() + SERVER_WAIT_S
    tags: dict[str, dict] = {}
    while time.monotonic() < deadline:
        try:
            tags = get_json(base, "/data/plugin/scalars/tags").get(run, {})
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet
        if wanted <= set(tags):
            return tags
        time.sleep(0.5)
    pytest.fail(f"TensorBoard never showed {sorted(wanted - set(tags))} for {run!r}:\n{log.read_text()}")


def test_tensorboard_server_shows_the_layout_and_its_series(tmp_path):
    monitor, latest_all = train(tmp_path / "logs")
    latest_values = monitor.latest
    latest = set(monitor.latest)
    totals = ["ratio", "noise_scale", "signal", "noise"]
    wanted = {f"snr/{name}" for name in totals} | {f"all/{name}_se" for name in totals}
    wanted |= {f"~snr/{name}{edge}" for name in totals[1:] for edge in ("_lower", "_upper")}
    wanted |= {"~snr/log10_ratio", "~snr/log10_ratio_lower", "~snr/log10_ratio_at_1"}
    wanted |= {"~snr/noise_scale_at_1"}
    wanted |= {"snr/hidden/ratio", "snr/out/noise_scale", "train/loss", "val_loss", "all/batch_size"}

    log = tmp_path / "tensorboard.log"
    with tensorboard_server(tmp_path / "logs", log) as base:
        tags = wait_for_tags(base, "tiny/version_0", wanted, log)
        for run in LOSS_RUNS:  # the server reads runs one after the other
            wait_for_tags(base, run, {LOSS_TAG}, log)

        # The first screen: the run has a name, and no dummy hp_metric chart.
        assert "tiny/version_0" in get_json(base, "/data/runs")
        assert "hp_metric" not in tags
        # Not flooded: without log_details, no standard errors nor counters; the chart series apart, under
        # ~snr/ (sorted last); log_details logs everything.
        assert not [tag for tag in tags if tag.startswith("snr/") and tag.endswith(("_se", "batch_size"))]
        assert {tag for tag in tags if tag.startswith("all/")} == set(latest_all)

        # One layout holds both monitors' charts (TensorBoard reads only a run's first layout).
        layout = get_json(base, "/data/plugin/custom_scalars/layout")
        categories = {category["title"]: category for category in layout["category"]}
        # Only what exists is drawn: per-group charts for the monitor with groups, standard errors for the one
        # that logs them, no basin forecast without a BasinEarlyStopping.
        assert list(categories) == ["snrmon", "snrmon per group", "snrmon all", "snrmon all standard errors"]
        assert not categories["snrmon"].get("closed") and categories["snrmon all standard errors"]["closed"]
        charts = {  # (category, chart title): chart
            (category["title"], chart["title"]): chart
            for category in layout["category"]
            for chart in category["chart"]
        }

        # Every band chart draws series the run logged, at the same steps (else TensorBoard shows an error
        # instead of the chart); asked for as the web page asks. The totals known only with the training set
        # size are either there with both edges, or not logged at all (an empty chart).
        for chart in charts.values():
            for series in chart.get("margin", {}).get("series", []):
                names = [series["value"], series["lower"], series["upper"]]
                regex = "|".join(f"({re.escape(name)})" for name in names)
                reply = get_json(base, "/data/plugin/custom_scalars/scalars", run="tiny/version_0", tag=regex)
                events = reply["tag_to_events"]
                if not set(names) & (set(events) | latest):
                    continue
                steps = [[step for _, step, _ in events[name]] for name in names]
                assert steps[0] and steps[1] == steps[0] and steps[2] == steps[0], (chart["title"], names)
        def drawn(title_start: str) -> list[str]:
            (chart,) = [chart for (category, title), chart in charts.items() if category == "snrmon"
                        and title.startswith(title_start)]  # fmt: skip
            return [series["value"] for series in chart["margin"]["series"]]

        assert drawn("noise scale") == ["snr/noise_scale", "~snr/noise_scale_at_1"]
        # The noise scale crosses that line where the monitor's SNR is 1: a finite training set here, so the
        # line is not B (the SNR of a step corrected for drawing without replacement).
        scalars = "/data/plugin/scalars/scalars"
        line = get_json(base, scalars, run="tiny/version_0", tag="~snr/noise_scale_at_1")[-1][2]
        snr, noise_scale = latest_values["snr/ratio"], latest_values["snr/noise_scale"]
        assert line == pytest.approx(snr * noise_scale, rel=1e-5)  # (float32 in the event file)
        assert line > latest_values["snr/batch_size"] * (1 + 1e-3)
        assert drawn("SNR at") == ["~snr/log10_ratio", "~snr/log10_ratio_at_1"]

        # Regex charts, asked for their data as the web page does: loss in both naming styles, one line
        # per group (never the totals), standard errors apart.
        def matched(category: str, title: str, run: str = "tiny/version_0") -> set[str]:
            (regex,) = charts[category, title]["multiline"]["tag"]
            reply = get_json(base, "/data/plugin/custom_scalars/scalars", run=run, tag=regex)
            assert reply["regex_valid"], regex
            return set(reply["tag_to_events"])

        # The loss chart draws each loss from its own sub-run (its own colour: TensorBoard colours by run),
        # named after its tag, and nothing of the run itself (else each loss twice).
        assert set(get_json(base, "/data/runs")) == {"tiny/version_0", *LOSS_RUNS}
        assert matched("snrmon", LOSS_TITLE) == set()
        for run in LOSS_RUNS:
            assert matched("snrmon", LOSS_TITLE, run) == {LOSS_TAG}
        assert matched("snrmon per group", "SNR per group") == {"snr/hidden/ratio", "snr/out/ratio"}
        scales = {"snr/hidden/noise_scale", "snr/out/noise_scale"}
        assert matched("snrmon per group", "noise scale per group (samples)") == scales
        assert matched("snrmon all standard errors", "standard error of noise") == {"all/noise_se"}

        # The band edges are value ∓ 2 se, NaN where the se is not known yet (after a single step).
        def series(tag: str) -> dict[int, float]:
            reply = get_json(base, "/data/plugin/scalars/scalars", run="tiny/version_0", tag=tag)
            return {step: float(value) for _, step, value in reply}  # NaN comes as the string "NaN"

        signal, lower = series("snr/signal"), series("~snr/signal_lower")
        one = series("~snr/log10_ratio_at_1")
    # TensorBoard draws a band only if value and edges share their steps.
    assert len(lower) >= 8 and set(lower) == set(signal) == set(one) and set(one.values()) == {0.0}
    last = max(signal)
    expected = latest_values["snr/signal"] - 2 * latest_values["snr/signal_se"]
    assert lower[last] == pytest.approx(expected, rel=1e-5)
    assert math.isnan(lower[min(lower)])  # no se after the first step

    # The edges are for TensorBoard's charts only: other loggers and monitor.latest do not get them.
    with open(tmp_path / "logs" / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        columns = next(csv.reader(handle))
    assert "snr/signal" in columns and not [c for c in columns if c.startswith("~") or c.endswith("_upper")]
    assert not [key for key in latest if key.startswith("~") or key.endswith(("_lower", "_upper"))]
    # Each monitor calls add_snr_layout; the layout is written once.
    events = EventAccumulator(str(tmp_path / "logs" / "tiny" / "version_0"))
    events.Reload()
    assert len(events.Tensors("custom_scalars__config__")) == 1


class EpochLoss(Regression):
    """Regression with its training loss logged per step and per epoch: train_loss_step, train_loss_epoch."""

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, on_epoch=True)
        return loss


def fit_epoch_loss(loggers: list, module: L.LightningModule | None = None) -> L.Trainer:
    """3 epochs of 4 optimizer steps (2 microbatches each), logging every 2 steps, validating twice an epoch
    and before training (the sanity check, which logs nothing); two monitors on the trainer."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    data = TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]))
    trainer = L.Trainer(
        max_epochs=3,
        accumulate_grad_batches=2,
        log_every_n_steps=2,
        val_check_interval=4,
        limit_val_batches=1,
        callbacks=[SNRMonitor(prog_bar=False), SNRMonitor(prefix="all", prog_bar=False)],
        logger=loggers,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module or EpochLoss(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=32))
    return trainer


def written(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """Every (step, value) of scalar ``tag`` in the event files of ``run_dir`` (not below), in the order
    written, repeats kept (TensorBoard's own reader drops a step written twice)."""
    return [
        (event.step, value.simple_value)
        for path in sorted(run_dir.glob("*tfevents*"))
        for event in LegacyEventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.tag == tag
    ]


def test_each_loss_is_copied_to_a_sub_run_as_it_was_logged(tmp_path):
    tensorboard = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    fit_epoch_loss([tensorboard, CSVLogger(tmp_path, name="csv")])
    run = Path(tensorboard.log_dir)
    losses = {"train_loss_step", "train_loss_epoch", "val_loss"}
    assert {path.parent.relative_to(run).as_posix() for path in run.rglob("*tfevents*")} == {".", *losses}
    for tag in losses:
        # The same points as the run's own tag: the steps Lightning logs at, each once with two monitors,
        # none from the sanity check; one tag in the sub-run.
        logged, copied = written(run, tag), written(run / tag, LOSS_TAG)
        assert copied == logged and len(logged) >= 3, tag
        events = EventAccumulator(str(run / tag))
        events.Reload()
        assert events.Tags()["scalars"] == [LOSS_TAG]
    assert len(written(run, "train_loss_epoch")) == 3 and len(written(run, "val_loss")) == 6

    # Only TensorBoard gets them; snrmon's own reader of logs takes the sub-runs for no runs.
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        assert not [column for column in next(csv.reader(handle)) if column.startswith("~")]
    assert not list((tmp_path / "csv").rglob("*loss*"))
    table = read_table(run, tag="val_loss")
    assert table.notes == [] and set(table["group"]) == {"version_0"} and len(table) == 6


class TwinLosses(Regression):
    """Two losses whose tags name the same sub-run: "val loss" and "val_loss"."""

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val loss", loss)  # (a training loss under a confusable name)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))


def test_two_loss_tags_that_name_one_sub_run_get_two(tmp_path):
    tensorboard = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    fit_epoch_loss([tensorboard], TwinLosses())
    run = Path(tensorboard.log_dir)
    subs = {path.parent.relative_to(run).as_posix() for path in run.rglob("*tfevents*")} - {"."}
    assert subs == {"val_loss", "val_loss_2"}
    copied = sorted(written(run / sub, LOSS_TAG) for sub in subs)
    assert copied == sorted([written(run, "val loss"), written(run, "val_loss")])  # each loss alone
    assert all(copied)


def test_without_tensorboard_no_loss_runs(tmp_path):
    fit_epoch_loss([CSVLogger(tmp_path, name="csv")])
    files = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file())
    assert files == ["csv/version_0/metrics.csv"]  # no sub-run, in the log folder or elsewhere


def test_a_sub_run_that_cannot_be_written_is_said_and_stops_nothing(tmp_path):
    (tmp_path / "tb" / "version_0").mkdir(parents=True)
    (tmp_path / "tb" / "version_0" / "val_loss").write_text("a file where the sub-run's folder would go")
    with pytest.warns(UserWarning, match="sub-runs under .* are not written further"):
        trainer = fit_epoch_loss([TensorBoardLogger(tmp_path, name="tb", version=0, default_hp_metric=False)])
    assert trainer.global_step == 12
    for monitor in trainer.callbacks[:2]:  # the monitors measure and log on
        assert not monitor._disabled and monitor.latest


def test_sub_run_names():
    assert sub_run("val_loss") == "val_loss" and sub_run("loss/val") == "loss/val"
    assert sub_run("../Loss (val)") == "Loss__val_"  # stays below the run's folder
    assert sub_run("/") == "_"


def test_chart_series():
    values = {
        "snr/signal": 2.0,
        "snr/signal_se": 0.25,
        "snr/ratio": 100.0,
        "snr/ratio_se": 10.0,
        "snr/noise": 3.0,
        "snr/noise_se": math.nan,  # no se yet (first step): NaN edges at the value's step
        "snr/batch_size": 64.0,
        "snr/blocks.0/signal": 1.0,  # a group: its chart has one line per group, no band
        "snr/blocks.0/signal_se": 0.1,
    }
    series = chart_series(values)
    assert (series["~snr/signal_lower"], series["~snr/signal_upper"]) == (1.5, 2.5)
    assert math.isnan(series["~snr/noise_lower"]) and math.isnan(series["~snr/noise_upper"])
    # log10 SNR, its band from the first-order se of the log, and the SNR = 1 line at 0.
    assert series["~snr/log10_ratio"] == pytest.approx(2.0)
    half_width = 2 * 10.0 / (100.0 * math.log(10))
    assert series["~snr/log10_ratio_upper"] == pytest.approx(2.0 + half_width)
    assert series["~snr/log10_ratio_lower"] == pytest.approx(2.0 - half_width)
    assert series["~snr/log10_ratio_at_1"] == 0.0 and series["~snr/noise_scale_at_1"] == 64.0  # a stream: B
    assert not [name for name in series if "blocks" in name or not name.startswith("~snr/")]
    # On N training samples a step's noise is S²(1/B − 1/N): SNR = 1 at the noise scale 1/(1/B − 1/N), and
    # nowhere for a batch of the whole set (no noise).
    finite = chart_series({"snr/batch_size": 32.0, "snr/dataset_size": 128.0})
    assert finite["~snr/noise_scale_at_1"] == pytest.approx(128 / 3)
    whole = chart_series({"snr/batch_size": 128.0, "snr/dataset_size": 128.0})
    assert math.isnan(whole["~snr/noise_scale_at_1"])
    assert chart_series(values, prefix="other") == {}


def test_layout_draws_only_what_is_logged():
    assert list(snr_layout()) == ["snrmon"]
    titles = list(snr_layout()["snrmon"]["charts"])
    assert not [title for title in titles if "beyond chance" in title or "whole training set" in title]
    full = snr_layout(["snr"], grouped=["snr"], finite=["snr"], details=["snr"], forecast=True)
    assert list(full) == ["snrmon", "snrmon per group", "snrmon basin forecast", "snrmon standard errors"]
    assert len(full["snrmon"]["charts"]) == len(titles) + 2


def test_layout_regexes_match_as_tensorboard_matches():
    """TensorBoard picks a Multiline chart's tags with Python's ``re.match`` (anchored at the start only)."""
    charts = {
        (category, title): chart
        for category, c in snr_layout(grouped=["snr"], forecast=True).items()
        for title, chart in c["charts"].items()
    }

    def picks(category: str, title: str, tags: list[str]) -> list[str]:
        kind, (regex,) = charts[category, title]
        assert kind == "Multiline"
        return [tag for tag in tags if re.match(regex, tag)]

    tags = [
        "train/loss",
        "val_loss",
        "Loss/val",
        "snr/ratio",
        "snr/blocks.0/ratio",
        "snr/forecast/val/loss/d_star",
        "snr/forecast/val_loss/train_loss",  # BasinEarlyStopping's record of the training loss
        "~snr/log10_ratio",
        "~snr/loss",  # in each loss's sub-run
        "~snr/loss_lower",
    ]
    assert picks("snrmon", LOSS_TITLE, tags) == ["~snr/loss"]
    assert picks("snrmon per group", "SNR per group", tags) == ["snr/blocks.0/ratio"]
    # BasinEarlyStopping's tags hold the monitored metric's name, slashes and all.
    forecast = [
        "snr/forecast/val/loss/d_star",
        "snr/forecast/val_loss/d_star_low",
        "snr/forecast/val_loss/p_basin",
    ]
    title = "basin D* (with its low and high estimates)"
    assert picks("snrmon basin forecast", title, forecast) == forecast[:2]
