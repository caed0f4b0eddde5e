"""The forecast as a picture: the monitored curve with the latest projection ahead (its band and the
predicted basin), the first warning and the stop; below, the forecast basin D* with its band at every point.
Drawn on a bare matplotlib ``Figure`` (no pyplot state), so the replay command can save it and
BasinEarlyStopping can hand it to TensorBoard."""

from __future__ import annotations

import numpy as np

from snrmon.forecast.forecaster import Forecast, Projection

# Sized for TensorBoard's Images card, which draws an image at the card's width (about 400-500 px in a
# 1600 px wide window) until "Show actual image size": 520 x 440 px, with text of 11-12 px, stays readable
# there at its own size or a little smaller. (Saved at another dpi, everything scales together.)
FIGSIZE, DPI = (5.2, 4.4), 100
FONT, SMALL = 9, 7.5  # points: 12.5 and 10.4 px at 100 dpi


def forecast_figure(
    forecasts: list[Forecast], metric: str, x_name: str = "step", projection: Projection | None = None
):
    """A two-panel ``matplotlib.figure.Figure`` of ``forecasts`` (the history of one forecaster) and the
    latest ``projection`` of the curve (``BasinForecaster.projection``)."""
    from matplotlib.figure import Figure

    x = np.array([f.x for f in forecasts])
    first_warning = next((f.x for f in forecasts if f.warning or f.stop), None)
    stop = next((f.x for f in forecasts if f.stop), None)
    figure = Figure(figsize=FIGSIZE, dpi=DPI)
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(x, [f.loss for f in forecasts], "o-", ms=3, label=metric)
    top.set_ylabel(metric, fontsize=FONT)
    if projection is not None:
        kind = "law fit" if projection.method in ("law", "prior") else "local trend"
        top.plot(projection.x, projection.loss, "--", color="tab:green", label=f"projection ({kind})")
        top.fill_between(projection.x, projection.low, projection.high, color="tab:green", alpha=0.2)
        basin = projection.d_star
        # The ratio forecasts the basin's edge (held-out gains below a tenth of the training gains), where the
        # curve still falls a little; a law's D* is its minimum.
        name = "forecast basin" if projection.method in ("law", "prior") else "basin edge (r = 0.1)"
        if projection.x[0] <= basin <= projection.x[-1]:  # the predicted basin, on the projected curve
            at = np.interp(np.log(basin), np.log(projection.x), projection.loss)
        elif x[0] <= basin < projection.x[0]:  # entered, behind the projection: on the observed curve
            # (an entered basin is placed where the curve was lowest, by any signal)
            at, name = forecasts[int(np.argmin(np.abs(np.log(x) - np.log(basin))))].loss, "basin (entered)"
        else:
            at = None
        if at is not None:
            top.scatter([basin], [at], marker="*", s=160, color="tab:green", edgecolors="black", zorder=4,
                        label=name)  # fmt: skip
    top.set_ylim(*_limits(forecasts, projection) or top.get_ylim())
    has = [f for f in forecasts if f.d_star is not None]
    if has:
        cap = 10 * x.max()  # an infinite or far-off forecast is drawn at the top of the chart

        def capped(values):
            return [min(v, cap) for v in values]

        at = [f.x for f in has]
        # A forecast from the prior alone has no band: draw its point as the band.
        low = [f.d_star if f.d_star_low is None else f.d_star_low for f in has]
        high = [f.d_star if f.d_star_high is None else f.d_star_high for f in has]
        bottom.fill_between(at, capped(low), capped(high), alpha=0.3, label="band")
        bottom.plot(at, capped([f.d_star for f in has]), "-", label="forecast D*")
    bottom.plot(x, x, "k:", lw=1, label=f"{x_name} = D*")
    bottom.set_yscale("log")
    bottom.set_xlabel(x_name, fontsize=FONT)
    bottom.set_ylabel("forecast basin", fontsize=FONT)
    for axis in (top, bottom):
        for value, style, label in ((first_warning, "--", "first warning"), (stop, "-", "stop")):
            if value is not None:
                axis.axvline(value, color="tab:red", ls=style, lw=1, label=label if axis is top else None)
    for axis in (top, bottom):
        axis.tick_params(labelsize=SMALL)
        axis.grid(alpha=0.3)
    top.legend(fontsize=SMALL, framealpha=0.8)
    bottom.legend(fontsize=SMALL, framealpha=0.8)
    figure.tight_layout(pad=0.4)
    return figure


def _limits(forecasts: list[Forecast], projection: Projection | None) -> tuple[float, float] | None:
    """The top chart's value range, as TensorBoard's charts ignore outliers: the later three quarters of the
    curve and the projection's central line (the first steep fall, or rise of a mode="max" metric, would
    flatten what matters), with the projection's band as far as half that range again."""
    later = forecasts[len(forecasts) // 4 :]
    values = [f.loss for f in later]
    ahead = None if projection is None else np.asarray(projection.x) >= later[0].x  # (a law's starts earlier)
    if projection is not None and ahead.any():
        values += list(np.asarray(projection.loss)[ahead])
    values = [v for v in values if np.isfinite(v)]
    if len(values) < 2 or max(values) == min(values):
        return None
    lowest, highest = min(values), max(values)
    span = highest - lowest
    if projection is not None and ahead.any():
        low = np.nanmin(np.asarray(projection.low)[ahead])
        high = np.nanmax(np.asarray(projection.high)[ahead])
        lowest = max(min(lowest, low), lowest - span / 2) if np.isfinite(low) else lowest
        highest = min(max(highest, high), highest + span / 2) if np.isfinite(high) else highest
    margin = 0.05 * (highest - lowest)
    return lowest - margin, highest + margin
