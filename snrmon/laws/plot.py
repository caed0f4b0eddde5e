"""A picture of a fitted law: observed losses against D (log axis), fitted curves, held-out rows, basins D*.

matplotlib is imported only when a picture is drawn (``pip install 'snrmon[plot]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXTEND_RIGHT = 4.0  # the curves run this factor past the largest observed D
EXTEND_LEFT = 1.5  # ... and from this factor below the smallest


class PlotError(RuntimeError):
    """The picture cannot be drawn (matplotlib missing, unwritable path)."""


@dataclass
class Series:
    """One curve of the picture: a model size (or one run), its observed rows and its fitted law."""

    label: str
    D: np.ndarray
    loss: np.ndarray
    held_out: np.ndarray  # bool per row: not used for fitting
    predict: Callable[[np.ndarray], np.ndarray]  # fitted loss at token counts D
    d_star: float = np.inf  # basin location (T10); inf: none
    order: float = 0.0  # sorts the series and sets their colours (e.g. log N)


def check_plot_target(path: str | Path) -> None:
    """Raise PlotError now if a picture could not be written to ``path`` later: matplotlib missing, a format
    it does not write (told from the extension, as ``savefig`` does), the directory absent, or the file not
    writable. Lets a command fail before a long fit, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'snrmon[plot]'") from None
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = path.suffix[1:].lower()
    if extension and extension not in formats:
        raise PlotError(
            f"cannot write {path}: matplotlib writes no {extension!r} files; use one of {', '.join(formats)}"
        )
    if not extension:  # savefig writes its default format, PNG, to the name with .png added
        path = path.with_name(path.name + ".png")
    existed = path.exists()
    try:
        with open(path, "ab"):  # appending writes nothing: an existing picture stays as it is
            pass
    except OSError as error:
        raise PlotError(f"cannot write {path}: {error.strerror or error}") from None
    if not existed:
        path.unlink()  # leave no empty file behind should the fit fail


def plot_fit(path: str | Path, series: list[Series], title: str, x_label: str = "D (tokens)") -> Path:
    """Write a PNG of ``series`` to ``path``: filled dots are fitted rows, hollow dots held-out rows, lines
    the fitted law (extended past the data), stars the basin D* where it lies inside the plotted range."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'snrmon[plot]'") from None
    if not series:
        raise PlotError("nothing to plot")
    series = sorted(series, key=lambda s: s.order)
    all_d = np.concatenate([s.D for s in series])
    low, high = all_d.min() / EXTEND_LEFT, all_d.max() * EXTEND_RIGHT
    grid = np.geomspace(low, high, 300)
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    axes = figure.add_subplot()
    palette = _palette(len(series))
    basins = 0
    for colour, s in zip(palette, series, strict=True):
        with np.errstate(all="ignore"):
            axes.plot(grid, s.predict(grid), color=colour, lw=1.5, label=s.label)
        fitted = ~s.held_out
        axes.scatter(s.D[fitted], s.loss[fitted], color=colour, s=18, zorder=3)
        axes.scatter(
            s.D[s.held_out], s.loss[s.held_out], facecolors="none", edgecolors=colour, s=24, zorder=3
        )
        if np.isfinite(s.d_star) and low <= s.d_star <= high:
            with np.errstate(all="ignore"):
                at = float(np.asarray(s.predict(np.array([s.d_star])))[0])
            basins += 1
            axes.axvline(s.d_star, color=colour, lw=0.6, ls=":")
            axes.scatter([s.d_star], [at], marker="*", s=140, color=colour, edgecolors="black", zorder=4)
    axes.set_xscale("log")
    axes.set_xlim(low, high)
    observed = np.concatenate([s.loss for s in series])
    span = observed.max() - observed.min()
    axes.set_ylim(observed.min() - 0.15 * span - 1e-9, observed.max() + 0.15 * span + 1e-9)
    axes.set_xlabel(x_label)
    axes.set_ylabel("loss")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.2)
    keys = [Line2D([], [], ls="", marker="o", color="gray", label="fitted rows")]
    if any(s.held_out.any() for s in series):
        keys.append(Line2D([], [], ls="", marker="o", mfc="none", color="gray", label="held-out rows"))
    if basins:
        keys.append(Line2D([], [], ls="", marker="*", ms=12, color="gray", mec="black", label="basin D*"))
    handles, _ = axes.get_legend_handles_labels()
    axes.legend(handles=handles + keys, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = Path(path)
    try:
        figure.savefig(path, dpi=120)
    except OSError as error:
        raise PlotError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _palette(count: int) -> list:
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.85, count)]
