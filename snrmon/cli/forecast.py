"""``snrmon forecast``: replay a finished run through the forecaster that ``BasinEarlyStopping`` uses.

    snrmon forecast DATA [--metric NAME] [--x D|step] [--horizon H] [--prior FIT.json] [--json] [--plot FILE]

DATA is a CSV with one run's curve (a column ``D`` or ``step``, and the metric, default ``loss``; with
several runs in the file, ``--where`` picks one) or a TensorBoard run directory (``--tag``). The points are
fed in order to :class:`snrmon.forecast.BasinForecaster` with the defaults of ``BasinEarlyStopping``, and
the command prints what it would have forecast, and when it would have warned and stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from snrmon.cli.arguments import file_name, number
from snrmon.cli.render import aligned, format_number
from snrmon.forecast.forecaster import (
    CONFIDENCE,
    HORIZON,
    MIN_POINTS,
    BasinForecaster,
    Forecast,
    PriorError,
    Projection,
)
from snrmon.logs import LogError, Table, read_table

RUN_COLUMNS = ("group", "model", "run")  # columns that name the run a row belongs to

DESCRIPTION = """\
Replay one run's loss curve through the basin forecaster of BasinEarlyStopping (docs/forecast.md), with the
same defaults, and print what it would have forecast and when it would have warned and stopped.

DATA is a CSV file with a header row (a column D or step, the metric column, default loss; optionally the
training loss with --train-metric) or a TensorBoard run directory (the scalar --tag). A file holding several
runs (a group, model or run column) needs --where to pick one.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``forecast`` on the ``snrmon`` command's subparsers."""
    parser = subparsers.add_parser(
        "forecast",
        help="replay a run through the basin forecaster: when would it have warned and stopped?",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", metavar="DATA", help="a CSV file or a TensorBoard run directory")
    parser.add_argument("--metric", default="loss", help="the monitored column (CSV; default loss)")
    parser.add_argument("--train-metric", metavar="NAME", help="a column (or tag) with the training loss")
    parser.add_argument("--tag", help="TensorBoard: the scalar tag of the monitored metric (e.g. val/loss)")
    parser.add_argument("--x", choices=("D", "step"), help="the x column (default: step if present, else D)")
    parser.add_argument("--where", metavar="EXPR", help="keep only the rows where EXPR holds (pick one run)")
    parser.add_argument(
        "--horizon",
        type=number(float, zero_allowed=True),
        default=HORIZON,
        help=f"warn within this share more training ({HORIZON})",
    )
    parser.add_argument("--confidence", type=float, default=CONFIDENCE, help=f"to stop ({CONFIDENCE})")
    parser.add_argument(
        "--min-points", type=int, default=MIN_POINTS, help=f"before a forecast ({MIN_POINTS})"
    )
    parser.add_argument("--prior", metavar="FIT.json", help="a snrmon fit --json of the shannon(-run) law")
    parser.add_argument(
        "--N", type=float, metavar="X", help="this run's parameter count, for a shannon prior"
    )
    parser.add_argument(
        "--tokens-per-step",
        type=float,
        default=1.0,
        metavar="X",
        help="tokens per step, when x is step and the prior is in tokens (1)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument(
        "--plot",
        type=file_name,
        metavar="FILE",
        help="write a PNG of the curve, the forecast band and the stop",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    x, loss, train, x_name = load_curve(args)
    try:
        forecaster = BasinForecaster(
            horizon=args.horizon,
            confidence=args.confidence,
            min_points=args.min_points,
            prior=args.prior,
            n_params=args.N,
            tokens_per_x=args.tokens_per_step if x_name == "step" else 1.0,
        )
    except (PriorError, ValueError) as error:
        raise LogError(str(error)) from None
    if forecaster.prior_note:
        print(f"snrmon: note: {forecaster.prior_note}", file=sys.stderr)
    if args.N is not None and args.prior is None:
        print("snrmon: note: --N is used only with --prior: ignored", file=sys.stderr)
    if args.tokens_per_step != 1.0 and x_name != "step":
        print("snrmon: note: --tokens-per-step applies when x is step; x is D here: ignored", file=sys.stderr)
    forecasts, projection = [], None
    for point in zip(x, loss, [None] * len(x) if train is None else train, strict=True):
        forecasts.append(forecaster.update(*point))
        if args.plot and forecasts[-1].stop and projection is None:  # the curve ahead as seen at the stop
            projection = forecaster.projection
    projection = projection or forecaster.projection  # no stop: as seen at the last point
    document = replay_document(forecasts, args.metric if args.tag is None else args.tag, x_name)
    if args.plot:
        plot_replay(args.plot, forecasts, document, x_name, projection)
    print(json.dumps(document, indent=2) if args.json else replay_report(forecasts, document, x_name))
    return 0


def load_curve(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """x, the metric and the training loss (or None) of the one run DATA holds, sorted by x."""
    tag = args.tag or (args.metric if args.metric != "loss" else None)
    table = read_table(args.data, tag=tag)
    metric = "loss" if "group" in table and "step" in table else args.metric  # TensorBoard: the tag is loss
    if args.train_metric and "group" in table and "step" in table:
        train_table = read_table(args.data, tag=args.train_metric)
        table.columns["train"] = interval_means(table["step"], train_table["step"], train_table["loss"])
        train_name = "train"
    else:
        train_name = args.train_metric
    if args.where:
        from snrmon.logs.where import where

        table = table.select(where(table, args.where))
    x_name = args.x or ("step" if "step" in table else "D")
    for name in (x_name, metric) + ((train_name,) if train_name else ()):
        if name not in table or not table.is_numeric(name):
            numeric = [n for n in table.names if table.is_numeric(n)]
            raise LogError(
                f"no numeric column {name!r} in {args.data}; numeric columns: {', '.join(numeric)}"
            )
    _one_run(table, args)
    keep = np.isfinite(table[x_name]) & (table[x_name] > 0)
    table = table.select(keep)
    order = np.argsort(table[x_name], kind="stable")
    x = table[x_name][order]
    if len(np.unique(x)) < len(x):
        raise LogError(f"repeated {x_name} values: DATA holds more than one run; pick one with --where")
    if len(x) == 0:
        raise LogError(f"no rows with a positive {x_name} in {args.data}")
    train = table[train_name][order] if train_name else None
    return x, table[metric][order], train, x_name


def interval_means(steps: np.ndarray, train_steps: np.ndarray, train: np.ndarray) -> np.ndarray:
    """The mean training loss logged in (previous step, step] for each step of the monitored metric, as
    BasinEarlyStopping collects it (NaN where none was logged)."""
    order = np.argsort(steps)
    means = np.full(len(steps), math.nan)
    previous = -math.inf
    for i in order:
        inside = (train_steps > previous) & (train_steps <= steps[i]) & np.isfinite(train)
        if inside.any():
            means[i] = float(np.mean(train[inside]))
        previous = steps[i]
    return means


def _one_run(table: Table, args: argparse.Namespace) -> None:
    for column in RUN_COLUMNS + ("N",):
        if column in table:
            runs = list(dict.fromkeys(table[column].tolist()))
            if len(runs) > 1:
                shown = ", ".join(str(r) for r in runs[:8]) + (", ..." if len(runs) > 8 else "")
                example = f'{column} == "{runs[0]}"' if column != "N" else f"N == {runs[0]}"
                raise LogError(
                    f"{len(runs)} runs in {args.data} ({column}: {shown}); pick one with --where '{example}'"
                )


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def replay_document(forecasts: list[Forecast], metric: str, x_name: str) -> dict:
    """The JSON of the replay: every point, the first warning and the stop (x values, or null)."""
    points = [
        {
            "x": f.x,
            "loss": _finite(f.loss),
            "d_star": _finite(f.d_star),
            "d_star_low": _finite(f.d_star_low),
            "d_star_high": _finite(f.d_star_high),
            "p_basin": f.p_basin,
            "method": f.method,
            "state": f.state,
            "warning": f.warning,
            "stop": f.stop,
        }
        for f in forecasts
    ]
    first_warning = next((f.x for f in forecasts if f.warning or f.stop), None)
    stop = next((f.x for f in forecasts if f.stop), None)
    finite = [f for f in forecasts if math.isfinite(f.loss)]
    best = min(finite, key=lambda f: f.loss) if finite else None
    return {
        "metric": metric,
        "x": x_name,
        "points": points,
        "first_warning": first_warning,
        "stop": stop,
        "minimum": None if best is None else {"x": best.x, "loss": best.loss},
    }


def replay_report(forecasts: list[Forecast], document: dict, x_name: str) -> str:
    show = format_number
    rows = [[x_name, document["metric"], "D*", "band", "P(basin)", "state", ""]]
    for f in forecasts:
        band = "-" if f.d_star_low is None else f"{show(f.d_star_low)} .. {show(f.d_star_high)}"
        action = "STOP" if f.x == document["stop"] else "warning" if f.warning else ""
        p = "-" if f.p_basin is None else f"{f.p_basin:.2f}"
        rows.append([show(f.x), show(f.loss), show(f.d_star), band, p, f.state, action])
    lines = aligned(rows)
    minimum = document["minimum"] or {"x": None, "loss": None}
    lines.append("")
    lines.append(
        f"first warning: {show(document['first_warning'])}; stop: {show(document['stop'])}; "
        f"observed minimum: {show(minimum['loss'])} at {x_name} {show(minimum['x'])}"
    )
    return "\n".join(lines)


def plot_replay(
    path: str, forecasts: list[Forecast], document: dict, x_name: str, projection: Projection | None = None
) -> None:
    """The curve with its projection at the stop (else at the last point), the forecast basin with its band
    at every point, the first warning and the stop."""
    from snrmon.forecast.plot import forecast_figure
    from snrmon.laws.plot import check_plot_target

    check_plot_target(path)
    forecast_figure(forecasts, document["metric"], x_name, projection).savefig(path, dpi=120)
