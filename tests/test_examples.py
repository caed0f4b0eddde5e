"""The demo runs end to end (tiny settings), writes its report, figure and TensorBoard logs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_demo_fast_run(tmp_path, examples_on_path):
    pytest.importorskip("matplotlib")
    from train_char_gpt import main

    results = main(["--fast", "--out", str(tmp_path)])

    run_dir = tmp_path / "char_gpt" / "version_0"
    report = (run_dir / "report.md").read_text()
    assert "tensorboard --logdir" in report and str(run_dir) in report
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

