"""What snrmon shows in TensorBoard's Custom Scalars tab, and the band series its charts need.

The layout is written once per TensorBoard writer, at fit start, for all the SNRMonitors on the trainer
(TensorBoard reads only the first layout a run holds). Charts:

* **snrmon** (open): the loss beside the total SNR, noise scale (with the batch size B, where SNR = 1),
  signal and noise, each total drawn with a ±2 standard error band; the dataset-level quantities when the
  monitor logs them.
* **snrmon per group** (open): one chart per quantity, one line per parameter group.
* **snrmon basin forecast**: the forecast of the loss basin, when a forecast is logged.
* **snrmon standard errors** (closed): the raw ``_se`` series, one chart per quantity.

A band needs real logged series for its edges (TensorBoard's ``Margin`` charts take the names of a value,
a lower and an upper series, not expressions), so :func:`log_bands` logs ``snr/<name>_lower`` and
``snr/<name>_upper`` = value ∓ 2 se for the totals, to TensorBoard loggers only.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger

_WRITTEN: weakref.WeakSet = weakref.WeakSet()  # the SummaryWriters that hold the layout already
BAND_SE = 2.0  # a band of ±2 standard errors holds the truth about 95% of the time
LOWER, UPPER = "_lower", "_upper"

# The totals drawn with a band, in the order they appear: (name under the prefix, chart title).
TOTALS = (
    ("ratio", "SNR = B / B_simple at the batch size (±2 se)"),
    ("noise_scale", "noise scale B_simple (±2 se) and batch size B"),
    ("signal", "signal |G|² (±2 se)"),
    ("noise", "noise tr(Σ) (±2 se)"),
    ("signal_beyond_chance", "signal beyond chance (±2 se)"),
    ("dataset_snr", "SNR of the whole training set (±2 se)"),
)


def band_values(values: Mapping[str, float], prefix: str = "snr") -> dict[str, float]:
    """The band edges of the totals: ``snr/x_lower``, ``snr/x_upper`` = x ∓ 2·se from ``snr/x``, ``snr/x_se``.

    Every logged total gets both edges, NaN where its se is not known yet (after the first step):
    TensorBoard refuses to draw a band whose value and edges were logged at different steps. Per-group
    values get no band (their charts show one line per group).
    """
    bands = {}
    for name, _ in TOTALS:
        tag = f"{prefix}/{name}"
        if tag not in values:
            continue
        value, se = values[tag], values.get(tag + "_se", math.nan)
        known = math.isfinite(value) and math.isfinite(se)
        bands[tag + LOWER] = value - BAND_SE * se if known else math.nan
        bands[tag + UPPER] = value + BAND_SE * se if known else math.nan
    return bands


def log_bands(loggers: Iterable[Logger], values: Mapping[str, float], step: int, prefix: str = "snr") -> None:
    """Log :func:`band_values` to the TensorBoard loggers among ``loggers`` (other loggers get none)."""
    tensorboards = [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]
    bands = band_values(values, prefix) if tensorboards else {}
    if bands:
        for logger in tensorboards:
            logger.log_metrics(bands, step=step)


def snr_layout(prefixes: Sequence[str] = ("snr",)) -> dict:
    """The layout as plain data: ``{category: {"closed": bool, "charts": {title: (kind, series)}}}``.

    ``kind`` is ``"Margin"`` (``series``: a list of ``(value, lower, upper)`` tag triples) or
    ``"Multiline"`` (``series``: a list of tag regexes). ``prefixes``: those of the monitors on the trainer
    (TensorBoard reads one layout per run, so one layout holds them all); category titles name a prefix
    other than ``snr``.
    """
    categories, errors = {}, {}
    for prefix in prefixes:
        p = re.escape(prefix)
        # The user's loss tags are not known to the monitor: any tag with "loss" in its name outside snr/.
        loss = rf"(?i)(?!{p}/).*loss"
        group = rf"{p}/(?!forecast/)[^/]+/"  # a group's tag <prefix>/<group>/<name>, not a forecast's
        totals: dict[str, tuple[str, list]] = {"loss": ("Multiline", [loss])}
        for name, title in TOTALS:
            tag = f"{prefix}/{name}"
            series = [(tag, tag + LOWER, tag + UPPER)]
            if name == "noise_scale":  # B as a band of zero width: where the two lines cross, SNR = 1
                batch = f"{prefix}/batch_size"
                series.append((batch, batch, batch))
            totals[title] = ("Margin", series)
        title = "snrmon" if prefix == "snr" else f"snrmon {prefix}"
        categories[title] = {"closed": False, "charts": totals}
        categories[f"{title} per group"] = {
            "closed": False,
            "charts": {
                "SNR per group": ("Multiline", [group + "ratio$"]),
                "noise scale per group (samples)": ("Multiline", [group + "noise_scale$"]),
                "signal |G|² per group": ("Multiline", [group + "signal$"]),
                "noise tr(Σ) per group": ("Multiline", [group + "noise$"]),
            },
        }
        errors[f"{title} standard errors"] = {
            "closed": True,
            "charts": {
                f"standard error of {name}": ("Multiline", [rf"{p}/(.*/)?{name}_se$"])
                for name in ("ratio", "noise_scale", "signal", "noise")
            },
        }
    # BasinEarlyStopping logs snr/forecast/<monitored metric>/<name> (the metric's name may hold slashes),
    # whatever the monitors' prefixes; the charts stay empty without it.
    forecast = r"snr/forecast/.*/"
    categories["snrmon basin forecast"] = {
        "closed": False,
        "charts": {
            "basin D* (with its low and high estimates)": ("Multiline", [forecast + "d_star(_low|_high)?$"]),
            "steps to the basin": ("Multiline", [forecast + "steps_to_basin$"]),
            "probability of the basin within the horizon": ("Multiline", [forecast + "p_basin$"]),
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
    writer (call on global rank zero). Every monitor may call it: TensorBoard reads a run's first layout only.
    """
    from snrmon.callbacks.snr_monitor import SNRMonitor  # here: that module imports this one

    writers = [
        logger.experiment
        for logger in trainer.loggers
        if isinstance(logger, TensorBoardLogger) and logger.experiment not in _WRITTEN
    ]
    if not writers:
        return
    prefixes = [callback.prefix for callback in trainer.callbacks if isinstance(callback, SNRMonitor)]
    summary = layout_summary(snr_layout(prefixes or ["snr"]))
    for writer in writers:
        writer._get_file_writer().add_summary(summary)
        _WRITTEN.add(writer)
