"""What snrmon shows in TensorBoard's Custom Scalars tab, and the chart series its charts need.

The layout is written once per TensorBoard writer, at the first values a monitor logs (when it is known
whether the training set is finite), for all the SNRMonitors on the trainer (TensorBoard reads only the first
layout a run holds). Only what the run logs is drawn:

* **snrmon** (open): the losses, each in its own colour (TensorBoard colours by run:
  :mod:`~snrmon.callbacks.tensorboard_loss_runs` copies each loss to a sub-run), beside the total SNR on a log
  scale with its SNR = 1 line, the noise scale with the noise scale at which SNR = 1, signal and noise, each
  total drawn with a ±2 standard error band; the finite-training-set quantities when the training set is
  finite.
* **snrmon per group** (open), when the monitor has ``groups``: one chart per quantity, one line per group.
* **snrmon basin forecast**, when a ``BasinEarlyStopping`` is on the trainer (its charts are empty until its
  first forecast: the layout is written before it).
* **snrmon standard errors** (closed), when the monitor logs them (``log_details=True``).

TensorBoard's layout proto has no axis settings (no log scale, no reference line) and its charts take the
names of logged series, not expressions: a band needs real series for its edges, a reference line a constant
series. So :func:`log_chart_series` logs, to TensorBoard loggers only, these chart series under ``~snr/``
(``~`` sorts after every letter: the Time Series and Scalars tabs put them last, in a folded section):
``~snr/<name>_lower`` and ``~snr/<name>_upper`` = value ∓ 2 se for the totals, ``~snr/log10_ratio`` with its
edges, the constant ``~snr/log10_ratio_at_1`` = 0 (the line where signal equals noise) and
``~snr/noise_scale_at_1``, the noise scale at which SNR = 1 (the batch size B; B/(1 − B/N) on a finite
training set of N samples).
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Collection, Iterable, Mapping, Sequence

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from snrmon.callbacks.tensorboard_loss_runs import LOSS_TAG

_WRITTEN: weakref.WeakSet = weakref.WeakSet()  # the SummaryWriters that hold the layout already
BAND_SE = 2.0  # a band of ±2 standard errors holds the truth about 95% of the time
LOWER, UPPER = "_lower", "_upper"
LOG_RATIO, AT_ONE = "log10_ratio", "log10_ratio_at_1"
SCALE_AT_ONE = "noise_scale_at_1"

# The totals drawn with a band, in the order they appear: (name under the prefix, chart title). The SNR is
# drawn on a log scale (its own chart, below); the last two exist only with a finite training set.
TOTALS = (
    ("noise_scale", "noise scale B_simple (±2 se) and, flat, where SNR = 1: B, or B/(1 − B/N) on N samples"),
    ("signal", "signal |G|² (±2 se)"),
    ("noise", "noise tr(Σ) (±2 se)"),
    ("signal_beyond_chance", "signal beyond chance (±2 se)"),
    ("dataset_snr", "SNR of the whole training set (±2 se)"),
)
FINITE_SET = ("signal_beyond_chance", "dataset_snr")
LOSS_TITLE = "loss, one colour per logged loss (run: <run>/<loss tag>)"
RATIO_TITLE = "SNR at the batch size, log₁₀ (±2 se); 0 is SNR = 1, signal equals noise"


def chart_prefix(prefix: str) -> str:
    """Where the chart series of the monitor logging under ``prefix`` go: ``~snr`` for ``snr``."""
    return "~" + prefix


def chart_series(values: Mapping[str, float], prefix: str = "snr") -> dict[str, float]:
    """The series the layout's charts draw besides the logged values, from a monitor's ``latest``.

    Band edges ``~snr/x_lower``, ``~snr/x_upper`` = x ∓ 2·se for each total ``snr/x`` with ``snr/x_se``;
    ``~snr/log10_ratio`` with edges log₁₀ SNR ∓ 2·se/(SNR·ln 10) (the standard error of log₁₀ SNR to first
    order: symmetric, and finite where SNR − 2 se would be negative); the constant ``~snr/log10_ratio_at_1``
    = 0; ``~snr/noise_scale_at_1``, the noise scale at which SNR = 1. Every logged total gets both edges, NaN
    where its se is not known yet (after the first step): TensorBoard refuses to draw a band whose value and
    edges were logged at different steps. Per-group values get no band (their charts show one line per group).
    """
    charts = chart_prefix(prefix)
    series = {}
    for name, _ in TOTALS:
        tag = f"{prefix}/{name}"
        if tag not in values:
            continue
        value, se = values[tag], values.get(tag + "_se", math.nan)
        known = math.isfinite(value) and math.isfinite(se)
        series[f"{charts}/{name}{LOWER}"] = value - BAND_SE * se if known else math.nan
        series[f"{charts}/{name}{UPPER}"] = value + BAND_SE * se if known else math.nan
    ratio, se = values.get(f"{prefix}/ratio", math.nan), values.get(f"{prefix}/ratio_se", math.nan)
    if f"{prefix}/ratio" in values:
        log_ratio = math.log10(ratio) if ratio > 0 else math.nan
        half_width = BAND_SE * se / (ratio * math.log(10)) if ratio > 0 else math.nan
        series[f"{charts}/{LOG_RATIO}"] = log_ratio
        series[f"{charts}/{LOG_RATIO}{LOWER}"] = log_ratio - half_width
        series[f"{charts}/{LOG_RATIO}{UPPER}"] = log_ratio + half_width
        series[f"{charts}/{AT_ONE}"] = 0.0
    if f"{prefix}/batch_size" in values:
        # A step's noise is S²(1/B − 1/N) with a finite training set of N samples (docs/theory.md), so its SNR
        # is 1 where the noise scale is 1/(1/B − 1/N): B for a stream, more when a batch is a large part of
        # the set, and nowhere (NaN: no noise at all) for a batch of the whole set.
        batch, size = values[f"{prefix}/batch_size"], values.get(f"{prefix}/dataset_size", math.inf)
        noise_per_sample = 1.0 / batch - 1.0 / size
        series[f"{charts}/{SCALE_AT_ONE}"] = 1.0 / noise_per_sample if noise_per_sample > 0 else math.nan
    return series


def log_chart_series(
    loggers: Iterable[Logger], values: Mapping[str, float], step: int, prefix: str = "snr"
) -> None:
    """Log :func:`chart_series` to the TensorBoard loggers among ``loggers`` (other loggers get none)."""
    tensorboards = [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]
    series = chart_series(values, prefix) if tensorboards else {}
    if series:
        for logger in tensorboards:
            logger.log_metrics(series, step=step)


def snr_layout(
    prefixes: Sequence[str] = ("snr",),
    *,
    grouped: Collection[str] = (),
    finite: Collection[str] = (),
    details: Collection[str] = (),
    forecast: bool = False,
) -> dict:
    """The layout as plain data: ``{category: {"closed": bool, "charts": {title: (kind, series)}}}``.

    ``kind`` is ``"Margin"`` (``series``: a list of ``(value, lower, upper)`` tag triples) or
    ``"Multiline"`` (``series``: a list of tag regexes). ``prefixes``: those of the monitors on the trainer
    (TensorBoard reads one layout per run, so one layout holds them all); category titles name a prefix
    other than ``snr``. Only what is logged is drawn: the per-group charts for the prefixes in ``grouped``,
    the finite-training-set charts for those in ``finite``, the standard errors for those in ``details``, the
    basin forecast if ``forecast``.
    """
    categories, errors = {}, {}
    for prefix in prefixes:
        p, charts = re.escape(prefix), chart_prefix(prefix)
        # Each loss the run logs, copied to a sub-run of its own under one tag (tensorboard_loss_runs):
        # TensorBoard colours lines by run, so this draws each loss in its own colour.
        loss = re.escape(LOSS_TAG) + "$"
        group = rf"{p}/(?!forecast/)[^/]+/"  # a group's tag <prefix>/<group>/<name>, not a forecast's
        log_ratio = f"{charts}/{LOG_RATIO}"
        at_one = f"{charts}/{AT_ONE}"
        totals: dict[str, tuple[str, list]] = {
            LOSS_TITLE: ("Multiline", [loss]),
            # The SNR falls from tens to about 1 in a run: on a linear axis its late values, the ones that
            # matter, lie flat. The layout cannot ask for a log axis, so the series is log₁₀ SNR.
            RATIO_TITLE: ("Margin", [(log_ratio, log_ratio + LOWER, log_ratio + UPPER), (at_one,) * 3]),
        }
        for name, title in TOTALS:
            if name in FINITE_SET and prefix not in finite:
                continue
            tag = f"{prefix}/{name}"
            series = [(tag, f"{charts}/{name}{LOWER}", f"{charts}/{name}{UPPER}")]
            if name == "noise_scale":  # a band of zero width: where the two lines cross, SNR = 1
                series.append((f"{charts}/{SCALE_AT_ONE}",) * 3)
            totals[title] = ("Margin", series)
        title = "snrmon" if prefix == "snr" else f"snrmon {prefix}"
        categories[title] = {"closed": False, "charts": totals}
        if prefix in grouped:
            categories[f"{title} per group"] = {
                "closed": False,
                "charts": {
                    "SNR per group": ("Multiline", [group + "ratio$"]),
                    "noise scale per group (samples)": ("Multiline", [group + "noise_scale$"]),
                    "signal |G|² per group": ("Multiline", [group + "signal$"]),
                    "noise tr(Σ) per group": ("Multiline", [group + "noise$"]),
                },
            }
        if prefix in details:
            errors[f"{title} standard errors"] = {
                "closed": True,
                "charts": {
                    f"standard error of {name}": ("Multiline", [rf"{p}/(.*/)?{name}_se$"])
                    for name in ("ratio", "noise_scale", "signal", "noise")
                },
            }
    if forecast:
        # BasinEarlyStopping logs snr/forecast/<monitored metric>/<name> (the metric's name may hold
        # slashes), whatever the monitors' prefixes.
        forecast_tag = r"snr/forecast/.*/"
        categories["snrmon basin forecast"] = {
            "closed": False,
            "charts": {
                "basin D* (with its low and high estimates)": (
                    "Multiline",
                    [forecast_tag + "d_star(_low|_high)?$"],
                ),
                "steps to the basin": ("Multiline", [forecast_tag + "steps_to_basin$"]),
                "probability of the basin within the horizon": ("Multiline", [forecast_tag + "p_basin$"]),
            },
        }
    return {**categories, **errors}


def layout_summary(layout: dict):
    """The TensorBoard ``Summary`` that carries ``layout`` (what ``SummaryWriter.add_custom_scalars`` writes,
    which cannot put several series in one Margin chart nor fold a category)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    categories = []
    for title, category in layout.items():
        charts = []
        # TensorBoard (2.21, seen in Chromium) draws a category's Multiline charts first, in order, then its
        # Margin charts in reverse order: write the Margin charts reversed so they show in reading order.
        multiline = [item for item in category["charts"].items() if item[1][0] != "Margin"]
        margin = [item for item in category["charts"].items() if item[1][0] == "Margin"]
        for chart_title, (kind, series) in multiline + margin[::-1]:
            if kind == "Margin":
                content = layout_pb2.MarginChartContent(
                    series=[
                        layout_pb2.MarginChartContent.Series(value=value, lower=lower, upper=upper)
                        for value, lower, upper in series
                    ]
                )
                charts.append(layout_pb2.Chart(title=chart_title, margin=content))
            else:
                content = layout_pb2.MultilineChartContent(tag=series)
                charts.append(layout_pb2.Chart(title=chart_title, multiline=content))
        categories.append(layout_pb2.Category(title=title, chart=charts, closed=category["closed"]))
    tensor = TensorProto(
        dtype="DT_STRING",
        string_val=[layout_pb2.Layout(category=categories).SerializeToString()],
        tensor_shape=TensorShapeProto(),
    )
    plugin = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME))
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=plugin)])


def add_snr_layout(trainer: Trainer) -> None:
    """Write the Custom Scalars layout of all the trainer's SNRMonitors to each TensorBoard logger, once per
    writer (call on global rank zero, once the monitors know whether their training set is finite). Every
    monitor may call it: TensorBoard reads a run's first layout only."""
    from snrmon.callbacks.basin_early_stopping import BasinEarlyStopping
    from snrmon.callbacks.snr_monitor import SNRMonitor  # here: that module imports this one

    writers = [
        logger.experiment
        for logger in trainer.loggers
        if isinstance(logger, TensorBoardLogger) and logger.experiment not in _WRITTEN
    ]
    if not writers:
        return
    monitors = [callback for callback in trainer.callbacks if isinstance(callback, SNRMonitor)]
    layout = snr_layout(
        [monitor.prefix for monitor in monitors] or ["snr"],
        grouped=[monitor.prefix for monitor in monitors if monitor.groups is not None],
        finite=[monitor.prefix for monitor in monitors if monitor.finite_training_set],
        details=[monitor.prefix for monitor in monitors if monitor.log_details],
        forecast=any(isinstance(callback, BasinEarlyStopping) for callback in trainer.callbacks),
    )
    summary = layout_summary(layout)
    for writer in writers:
        writer._get_file_writer().add_summary(summary)
        _WRITTEN.add(writer)
