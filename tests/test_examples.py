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
    for key in ("snr/signal", "snr/noise", "snr/noise_scale", "snr/ratio", "val/loss"):
        assert math.isfinite(results[key]), key
    assert results["snr/noise"] > 0 and results["snr/noise_scale_se"] > 0

    from plot_run import read_scalars

    scalars = read_scalars(run_dir)
    steps, values = scalars["snr/noise_scale"]
    assert len(steps) == len(values) >= 3
    assert {"train/loss", "val/loss", "snr/ratio_se", "snr/blocks.0/noise_scale"} <= set(scalars)
    # TensorBoard's first screen: no dummy hp_metric at -1, no flat epoch line (the run is one epoch).
    assert "hp_metric" not in scalars and "epoch" not in scalars


def test_demo_prints_commands_that_work(fast_run, capsys):
    """The printed commands: TensorBoard over the log root (so the run is named ``char_gpt/version_0``,
    not "."), and ``snrmon fit`` and ``snrmon forecast`` on the run's validation loss, which must succeed
    as printed."""
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
