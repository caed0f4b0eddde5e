"""Plot a run's loss and SNR curves from its TensorBoard event files (needs matplotlib).

    python examples/plot_run.py runs/char_gpt/version_0 docs/img/demo_curves.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(log_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar tag of a TensorBoard log directory, as (steps, values)."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        scalars[tag] = (np.array([p.step for p in points]), np.array([p.value for p in points]))
    return scalars


def band(scalars: dict, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The ±2 se band of the total ``snr/<name>``: from its standard error when logged (``log_details``),
    else from the edges SNRMonitor logs for TensorBoard's charts (``~snr/...``; the SNR's are of its log)."""
    if f"snr/{name}_se" in scalars:
        values, se = scalars[f"snr/{name}"][1], scalars[f"snr/{name}_se"][1]
        return values - 2 * se, values + 2 * se
    if name == "ratio" and "~snr/log10_ratio_lower" in scalars:
        return 10 ** scalars["~snr/log10_ratio_lower"][1], 10 ** scalars["~snr/log10_ratio_upper"][1]
    if f"~snr/{name}_lower" in scalars:
        return scalars[f"~snr/{name}_lower"][1], scalars[f"~snr/{name}_upper"][1]
    return None


def plot_run(log_dir: str | Path, out: str | Path) -> Path:
    """Four panels: loss, signal and noise, noise scale ± se, SNR ± se; with per-group noise scales."""
    scalars = read_scalars(log_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    loss, power, scale, ratio = axes.flat

    for tag, style in (("loss/train", "-"), ("loss/val", "o-")):
        if tag in scalars:
            loss.plot(*scalars[tag], style, label=tag, markersize=3)
    loss.set(title="loss", xlabel="step", ylabel="nats / byte")

    for tag, color in (("snr/signal", "C0"), ("snr/noise", "C3")):
        if tag in scalars:
            steps, values = scalars[tag]
            power.plot(steps, values, color=color, label=tag)
            edges = band(scalars, tag[len("snr/") :])
            if edges is not None:
                power.fill_between(steps, *edges, color=color, alpha=0.2)
    power.set(title="signal |G|² and noise tr(Σ)  (±2 se)", xlabel="step", yscale="log")

    for axis, tag in ((scale, "snr/noise_scale"), (ratio, "snr/ratio")):
        if tag in scalars:
            steps, values = scalars[tag]
            axis.plot(steps, values, color="k", label="total")
            edges = band(scalars, tag[len("snr/") :])
            if edges is not None:
                axis.fill_between(steps, *edges, color="k", alpha=0.15)
    groups = sorted(t for t in scalars if t.endswith("/noise_scale") and t.count("/") == 2)
    for tag in groups:
        scale.plot(*scalars[tag], lw=0.8, label=tag.split("/")[1])
    scale.set(title="noise scale B_simple = tr(Σ)/|G|²  (samples)", xlabel="step", yscale="log")
    at_one = scalars.get("~snr/noise_scale_at_1")  # B, or B/(1 − B/N) on a finite training set of N
    if at_one is not None:
        scale.plot(*at_one, "k--", lw=1, label="where SNR = 1")
    elif "~snr/batch_size" in scalars:  # logs written before that series: the batch size B
        scale.plot(*scalars["~snr/batch_size"], "k--", lw=1, label="batch size B (SNR = 1 on a stream)")
    ratio.axhline(1.0, color="tab:red", ls=":", lw=1, label="SNR = 1: signal equals noise")
    ratio.set(title="SNR at the batch size  (±2 se)", xlabel="step", yscale="log")

    for axis in axes.flat:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, ncol=2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(plot_run(sys.argv[1], sys.argv[2]))
