"""The demo runs end to end (tiny settings), writes its report, figure and TensorBoard logs, and the
commands it prints work on those logs."""

from __future__ import annotations

import contextlib
import io
import math
import shlex
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """One ``--fast`` demo run for the tests below: (log root, results, what it printed)."""
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from train_char_gpt import main

        out, printed = tmp_path_factory.mktemp("runs"), io.StringIO()
        with contextlib.redirect_stdout(printed):
            results = main(["--fast", "--out", str(out)])
        yield out, results, printed.getvalue()
    finally:
        sys.path.remove(str(EXAMPLES))


def test_demo_fast_run(fast_run):
    tmp_path, results, _ = fast_run
    run_dir = tmp_path / "char_gpt" / "version_0"
    report = (run_dir / "report.md").read_text()
    commands = results["commands"]
    assert commands["tensorboard"] in report and commands["fit"] in report
    assert (run_dir / "snr_curves.png").stat().st_size > 10_000
    assert list(run_dir.glob("events.out.tfevents.*"))
    for key in ("snr/signal", "snr/noise", "snr/noise_scale", "snr/ratio", "loss/val"):
        assert math.isfinite(results[key]), key
    assert results["snr/noise"] > 0 and results["snr/noise_scale_se"] > 0

    from plot_run import read_scalars

    scalars = read_scalars(run_dir)
    steps, values = scalars["snr/noise_scale"]
    assert len(steps) == len(values) >= 3
    assert {"loss/train", "loss/val", "~snr/log10_ratio", "snr/attention/noise_scale"} <= set(scalars)
    # TensorBoard's first screen: no dummy hp_metric at -1, no flat epoch line (the run is one epoch), and
    # under snr/ only values (standard errors, counters: SNRMonitor(log_details=True)).
    assert "hp_metric" not in scalars and "epoch" not in scalars
    assert not [tag for tag in scalars if tag.startswith("snr/") and tag.endswith(("_se", "batch_size"))]


def test_demo_shows_the_basin_forecast_and_keeps_the_best_weights(fast_run):
    """BasinEarlyStopping and a ModelCheckpoint are attached: the forecast is logged and drawn (a figure sized
    for TensorBoard's Images card), the layout has its charts, and the closing lines say where it warned and
    stopped, where the minimum and the best checkpoint are, and how to open the snrmon view."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    tmp_path, results, printed = fast_run
    stopper, checkpoint = results["stopper"], results["checkpoint"]
    points = stopper.forecaster.points
    assert stopper.forecaster.history[-1].d_star is not None  # a forecast, not only points
    best = min(range(len(points.loss)), key=points.loss.__getitem__)
    assert float(checkpoint.best_model_score) == pytest.approx(points.loss[best], rel=1e-5)
    assert Path(checkpoint.best_model_path).is_file()
    assert f"step={points.x[best]:.0f}" in checkpoint.best_model_path

    assert "http://localhost:6006/#custom_scalars" in printed
    assert f"lowest loss/val: {points.loss[best]:.4g} at step {points.x[best]:.0f}" in printed
    assert f"best checkpoint (loss/val {points.loss[best]:.4g}): {checkpoint.best_model_path}" in printed
    assert ("first warning: step" in printed) or ("no warning" in printed)
    stopped = f"stopped: step {stopper.stopped_step}" if stopper.stopped_step else "not stopped: trained all"
    assert stopped in printed
    assert "the replay of its logs (snrmon forecast, below)" in printed and "the same as live" in printed

    events = EventAccumulator(str(tmp_path / "char_gpt" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    forecast_tags = {"snr/forecast/loss/val/p_basin", "snr/forecast/loss/val/train_loss"}
    assert forecast_tags <= set(events.Tags()["scalars"])
    proto = events.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(proto).item())
    assert [c.title for c in layout.category] == ["snrmon", "snrmon per group", "snrmon basin forecast"]
    # The figure fits TensorBoard's Images card (about 400-500 px wide) without "Show actual image size".
    (image, *_) = events.Images("snr/forecast/loss/val/figure")
    assert 400 <= image.width <= 560 and image.height <= 480, (image.width, image.height)


def test_demo_prints_commands_that_work(fast_run, capsys):
    """The printed commands: TensorBoard over the log root (so the run is named ``char_gpt/version_0``,
    not "."), and ``snrmon fit`` and ``snrmon forecast`` on the run's validation loss (``loss/val``), which
    must succeed as printed."""
    from snrmon.cli import main as snrmon

    tmp_path, results, printed = fast_run
    commands = results["commands"]
    assert all(command in printed for command in commands.values())

    tensorboard = shlex.split(commands["tensorboard"])
    assert Path(tensorboard[0]).name == "tensorboard" and tensorboard[1:] == ["--logdir", str(tmp_path)]

    fit = shlex.split(commands["fit"])
    assert Path(fit[0]).name == "snrmon" and fit[1] == "fit"
    assert snrmon(fit[1:]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    # Enough validation points for the 7 constants, and D in tokens: 4 x 4 x 32 per step with --fast.
    assert "shannon-run" in out and "12 rows" in out
    assert "--tokens-per-step 512" in commands["fit"]
    hparams = (tmp_path / "char_gpt" / "version_0" / "hparams.yaml").read_text()
    assert "n_params: 21984" in hparams  # where `snrmon fit` reads the model size

    forecast = shlex.split(commands["forecast"])
    assert Path(forecast[0]).name == "snrmon" and forecast[1] == "forecast"
    assert snrmon(forecast[1:]) == 0, capsys.readouterr().err
    assert "observed minimum" in capsys.readouterr().out
