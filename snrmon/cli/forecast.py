"""``snrmon forecast``: replay a finished run through the forecaster that ``BasinEarlyStopping`` uses.

    snrmon forecast DATA [--metric NAME] [--mode min|max] [--x D|step] [--horizon H] [--prior FIT.json]
                         [--json] [--plot FILE]

DATA is a CSV with one run's curve (a column ``D`` or ``step``, and the metric, default ``loss``; with
several runs in the file, ``--where`` picks one) or a log of scalars by step: a TensorBoard run directory, a
Lightning ``CSVLogger`` metrics.csv or a Hugging Face trainer_state.json (the scalar ``--metric`` or
``--tag``; ``--train-metric``: the training loss, averaged between two points). The points are
fed in order to :class:`snrmon.forecast.BasinForecaster` with the defaults of ``BasinEarlyStopping``, and
the command prints what it would have forecast, and when it would have warned and stopped.

Exit status 0 when the replay ran, also when it never forecast (too few points: the reason is printed); 2 when
DATA cannot be read or can never be forecast (no finite value of the metric; the loss alone without a positive
value), or --plot names a file that cannot be written, with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

import numpy as np
from tqdm import tqdm

from snrmon.cli.arguments import file_name, number
from snrmon.cli.render import aligned, format_number, warn
from snrmon.forecast.curve import LARGEST
from snrmon.forecast.display import (
    LAW_NEEDS_POSITIVE,
    as_metric,
    format_step,
    mode_sign,
    projection_as_metric,
)
from snrmon.forecast.forecaster import (
    CONFIDENCE,
    HORIZON,
    MIN_POINTS,
    BasinForecaster,
    Forecast,
    PriorError,
    Projection,
)
from snrmon.laws.plot import check_plot_target
from snrmon.logs import LogError, Table, read_table

RUN_COLUMNS = ("group", "model", "run")  # columns that name the run a row belongs to

DESCRIPTION = """\
Replay one run's loss curve through the basin forecaster of BasinEarlyStopping (docs/forecast.md), with the
same defaults, and print what it would have forecast and when it would have warned and stopped.

DATA is a CSV file with a header row (a column D or step, the metric column, default loss; optionally the
training loss with --train-metric), or a log of scalars by step, told from the file: a TensorBoard run
directory, a Lightning CSVLogger metrics.csv (a step column, metrics on different rows) or a Hugging Face
trainer_state.json (its log_history; there loss is the training loss, eval_loss the evaluation loss). In a
log, --metric (or --tag) names the monitored scalar, and --train-metric the training loss, averaged over each
interval between two points of the first as BasinEarlyStopping does, within each run. A file holding several
runs (a group, model or run column; a TensorBoard directory of runs) needs --where to pick one. --mode max:
a higher-is-better metric (e.g. an accuracy), whose basin is its peak.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``forecast`` on the ``snrmon`` command's subparsers."""
    parser = subparsers.add_parser(
        "forecast",
        help="replay a run through the basin forecaster: when would it have warned and stopped?",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "data",
        metavar="DATA",
        nargs="+",
        help="a CSV file, a TensorBoard run directory, a Lightning metrics.csv or a Hugging Face "
        "trainer_state.json; several: the parts of one run in order (a fit resumed from a checkpoint logs "
        "to a new version), each part's points replacing the earlier parts' from its first step on",
    )
    parser.add_argument(
        "--metric",
        help="the monitored column of a CSV table (default loss), or scalar of a log (as --tag; default: its "
        "only scalar)",
    )
    parser.add_argument(
        "--mode",
        choices=("min", "max"),
        default="min",
        help="min: lower is better (a loss; default); max: higher is better (an accuracy)",
    )
    parser.add_argument("--train-metric", metavar="NAME", help="a column (or tag) with the training loss")
    parser.add_argument(
        "--tag", help="a log of scalars: the monitored scalar (e.g. val/loss, val_loss, eval_loss)"
    )
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
        "--min-points",
        type=int,
        default=MIN_POINTS,
        help=f"points before the first forecast ({MIN_POINTS}, the least)",
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
    parser.add_argument(
        "--every",
        type=number(int),
        default=1,
        metavar="K",
        help="forecast at every K-th point only, with the training loss averaged over the K points, as a "
        "callback checking every K steps sees it (for curves logged every step; 1)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.plot:  # before reading and replaying: a bad path or format fails at once, as snrmon fit does
        check_plot_target(args.plot)
    x, metric, train, dataset_snr, x_name, name = load_curve(args)
    x, metric, train, dataset_snr, x_name = thin(x, metric, train, dataset_snr, x_name, every=args.every)
    # --mode max feeds the forecaster the negated metric (its peak becomes a basin) and the training loss as
    # it is: BasinEarlyStopping's mirror (its comment says why); everything shown is mirrored back.
    sign = mode_sign(args.mode)
    loss = sign * metric
    check_forecastable(loss, train, args, name)
    try:
        forecaster = BasinForecaster(
            horizon=args.horizon,
            confidence=args.confidence,
            min_points=args.min_points,
            prior=args.prior,
            n_params=args.N if args.prior else None,  # (else ignored, as said below)
            tokens_per_x=args.tokens_per_step if x_name == "step" else 1.0,
        )
    except (PriorError, ValueError) as error:  # (the options by the names given here)
        raise LogError(str(error).replace("min_points", "--min-points").replace("n_params", "--N")) from None
    if forecaster.prior_note:
        print(f"snrmon: note: {forecaster.prior_note}", file=sys.stderr)
    if args.N is not None and args.prior is None:
        print("snrmon: note: --N is used only with --prior: ignored", file=sys.stderr)
    if args.tokens_per_step != 1.0 and x_name != "step":
        print("snrmon: note: --tokens-per-step applies when x is step; x is D here: ignored", file=sys.stderr)
    forecasts, projection = [], None
    nothing = [None] * len(x)
    train, dataset_snr = (nothing if v is None else v for v in (train, dataset_snr))
    points = zip(x, loss, train, dataset_snr, strict=True)
    # A bar on long replays, when stderr is a terminal (disable=None): a few ms a point add up.
    bar = dict(total=len(x), desc="forecast", unit="point", file=sys.stderr, leave=False)
    departure_said = False
    for point in tqdm(points, **bar, disable=None if len(x) >= 1000 else True):
        forecasts.append(forecaster.update(*point))
        if not departure_said and forecasts[-1].method == "prior" and forecaster.prior_departs:
            departure_said = True  # once, as BasinEarlyStopping says it
            at = format_step(forecasts[-1].x) if x_name == "step" else format_number(forecasts[-1].x)
            print(f"snrmon: warning: at {x_name} {at}: {forecasts[-1].note}", file=sys.stderr)
        if args.plot and forecasts[-1].stop and projection is None:  # the curve ahead as seen at the stop
            projection = forecaster.projection
    projection = projection_as_metric(projection or forecaster.projection, sign)  # no stop: at the last point
    forecasts = [as_metric(f, sign) for f in forecasts]  # the metric's own values from here on
    document = replay_document(forecasts, name, x_name, args.mode)
    if all(f.d_star is None for f in forecasts):
        # No forecast at any point (e.g. fewer points than --min-points): a replay that ran, whose answer is
        # "nothing to forecast yet". Say why, rather than leave a table of bare "no forecast" rows.
        where = "at the one point" if len(forecasts) == 1 else f"at any of the {len(forecasts)} points"
        print(f"snrmon: note: no forecast {where}: {forecasts[-1].note}", file=sys.stderr)
    if args.plot:
        plot_replay(args.plot, forecasts, document, x_name, projection)
    print(json.dumps(document, indent=2) if args.json else replay_report(forecasts, document, x_name))
    return 0


def thin(
    x: np.ndarray,
    metric: np.ndarray,
    train: np.ndarray | None,
    dataset_snr: np.ndarray | None,
    x_name: str,
    every: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, str]:
    """Every ``every``-th point of the curve (the last of each group of ``every``), with the training loss
    averaged over its group: what a callback checking every ``every`` points would have been fed (and the
    training set's SNR of the group's last measurement)."""
    if every == 1:
        return x, metric, train, dataset_snr, x_name
    keep = np.arange(every - 1, len(x), every)
    if len(keep) == 0:
        raise LogError(f"--every {every} keeps no point of the {len(x)} in the curve")
    if train is not None:
        groups = np.split(train[: keep[-1] + 1], keep[:-1] + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a group without training loss: NaN, as said
            train = np.array([np.nanmean(group) for group in groups])
    if dataset_snr is not None:  # each measurement once: the group's last, NaN for a group without one
        groups = np.split(dataset_snr[: keep[-1] + 1], keep[:-1] + 1)
        dataset_snr = np.array([next((v for v in g[::-1] if np.isfinite(v)), np.nan) for g in groups])
    return x[keep], metric[keep], train, dataset_snr, x_name


def check_forecastable(
    loss: np.ndarray, train: np.ndarray | None, args: argparse.Namespace, metric: str
) -> None:
    """Values the forecaster would skip without a word: the loss-only forecast (no training loss) fits a law
    of log-losses, so values <= 0 are no points of it. None positive: an error; some: a warning. No finite
    value at all (a blank column, a diverged run): an error, whatever the training loss."""
    if not np.isfinite(loss).any():
        raise LogError(
            f"nothing to forecast in {' '.join(args.data)}: {metric} has no finite value at any of the "
            f"{len(loss)} points (blank, NaN or infinite)"
        )
    for name, values in ((metric, loss), (args.train_metric or "the training loss", train)):
        finite = np.abs(values[np.isfinite(values)]) if values is not None else np.zeros(0)
        if finite.max(initial=0) > LARGEST:
            raise LogError(
                f"values too large to forecast in {' '.join(args.data)} ({name} up to {finite.max():.3g}): "
                f"their squares overflow double precision; rescale the column (at most {LARGEST:.0e})"
            )
    if train is not None and np.isfinite(train).any():
        return  # the ratio forecast, which takes any sign
    finite = np.isfinite(loss)
    bad = finite & (loss <= 0)
    if not bad.any():
        return
    shown = f"-{metric} (--mode max)" if args.mode == "max" else metric
    hint = "give the training loss with --train-metric for the ratio forecast, which takes any sign"
    if bad.sum() == finite.sum():
        raise LogError(
            f"nothing to forecast in {' '.join(args.data)}: every value of {shown} is <= 0; "
            f"{LAW_NEEDS_POSITIVE}; {hint}"
        )
    count = f"{int(bad.sum())} of {int(finite.sum())}"
    warn([f"{count} values of {shown} are <= 0: {LAW_NEEDS_POSITIVE}; {hint}"])


def load_curve(
    args: argparse.Namespace,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, str, str]:
    """x, the metric, the training loss (or None) and the training set's SNR a BasinEarlyStopping was fed
    (or None) of the one run DATA holds (the parts of one run, joined), sorted by x, and the metric's name."""
    parts = [load_part(argparse.Namespace(**{**vars(args), "data": path})) for path in args.data]
    x, metric, train, dataset_snr, x_name, name, live = parts[0]
    for path, part in zip(args.data[1:], parts[1:], strict=True):
        x2, metric2, train2, snr2, x_name2, name2, live2 = part
        if (x_name2, name2) != (x_name, name):
            raise LogError(f"{path} gives {name2} by {x_name2}, the parts before it {name} by {x_name}")
        if (train2 is None) != (train is None):
            having = "no" if train2 is None else "a"
            raise LogError(f"{path} has {having} training loss, unlike the parts before it")
        if x2[0] <= x[0]:  # it would replace every point before it: parts out of order, or another run
            raise LogError(
                f"{path} begins at {x_name} {x2[0]:g}, not after the parts before it (from {x[0]:g}): give "
                "the parts of one run in order, the first part first"
            )
        kept = x < x2[0]  # a later part replaces the earlier ones from its first point on
        x, metric = np.concatenate([x[kept], x2]), np.concatenate([metric[kept], metric2])
        train = None if train is None else np.concatenate([train[kept], train2])
        dataset_snr, live = (_joined(a, b, kept, len(x2)) for a, b in ((dataset_snr, snr2), (live, live2)))
    if live is not None:
        check_complete(live, x, x_name)
    return x, metric, train, dataset_snr, x_name, name


def _joined(earlier: np.ndarray | None, later: np.ndarray | None, kept: np.ndarray, length: int):
    """An optional column of two parts joined (NaN for a part without it; None when neither has it)."""
    if earlier is None and later is None:
        return None
    earlier = np.full(len(kept), math.nan) if earlier is None else earlier
    return np.concatenate([earlier[kept], np.full(length, math.nan) if later is None else later])


def check_complete(live: np.ndarray, x: np.ndarray, x_name: str) -> None:
    """The points a BasinEarlyStopping held at each of its forecasts (logged with them) against the points
    replayed: logs that begin mid-run (a fit resumed from a checkpoint logs to a new version) lack the earlier
    ones, and their replay is not the live run's. Said, with what to do."""
    held = np.arange(1, len(live) + 1)
    differs = np.isfinite(live) & (live != held)
    if differs.any():
        i = int(np.argmax(differs))
        warn(
            [
                f"at {x_name} {x[i]:g} the live BasinEarlyStopping held {int(live[i])} points, this replay "
                f"{i + 1}: the logs do not hold every point it forecast from (a fit resumed from a "
                "checkpoint logs to a new version: give the earlier versions first, snrmon forecast "
                "RUN/version_0 RUN/version_1 ...), so the replay may warn and stop elsewhere"
            ]
        )


def load_part(
    args: argparse.Namespace,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, str, str, np.ndarray | None]:
    """As :func:`load_curve`, of one DATA path, and the points a BasinEarlyStopping that watched it held at
    each of them (logged with its forecasts; None when not logged)."""
    tag = args.tag or args.metric
    table = read_table(args.data, tag=tag)
    # A log of scalars (TensorBoard, metrics.csv, trainer_state.json) gives its scalar as the column loss;
    # the training loss is another scalar, joined to it run by run (see with_training_loss).
    scalars = table.tag is not None
    name = table.tag if scalars else tag or "loss"  # (--tag names a CSV's column as --metric does)
    metric = "loss" if scalars else name
    if scalars:
        read_notes = table.notes  # what reading the log skipped (its runs are split without them)
        runs, train_name = with_training_loss(split_runs(table), args)
        if args.train_metric or train_name is None:  # (else the callback's points, not these rows)
            for note in read_notes:
                print(f"snrmon: note: {note}", file=sys.stderr)
    else:
        runs, train_name = [table], args.train_metric
    table = runs[0]  # the columns of every run
    x_name = args.x or ("step" if "step" in table else "D")
    for column in (x_name, metric) + ((train_name,) if train_name else ()):
        if column not in table:
            numeric = [n for n in table.names if table.is_numeric(n)]
            found = f"numeric columns: {', '.join(numeric)}" if numeric else "no numeric column at all"
            if len(table.names) == 1 and any(mark in table.names[0] for mark in ";\t|"):
                found = f"one column, {table.names[0]!r}: separate the columns with commas"
            raise LogError(f"no numeric column {column!r} in {args.data}; {found}")
        if not table.is_numeric(column):
            row, cell = table.first_non_number(column)
            raise LogError(
                f"column {column!r} of {args.data} holds text, not numbers: {cell!r} in row {row + 1} after "
                "the header"
            )
    if args.where:
        from snrmon.logs.where import where

        # Row by row, so run by run alike: a run picked from a directory of several is the run read alone.
        runs = [run.select(where(run, args.where)) for run in runs]
        runs = [run for run in runs if len(run)]
        if not runs:
            raise LogError(f"--where {args.where!r} keeps no rows of {args.data}")
    table = _one_run(runs, args)
    for note in table.notes:
        print(f"snrmon: note: {note}", file=sys.stderr)
    keep = np.isfinite(table[x_name]) & (table[x_name] > 0)
    if not keep.all():
        print(f"snrmon: note: {int((~keep).sum())} rows without a positive {x_name} skipped", file=sys.stderr)
    table = table.select(keep)
    order = np.argsort(table[x_name], kind="stable")
    x = table[x_name][order]
    values, counts = np.unique(x, return_counts=True)
    if len(values) < len(x):
        repeated = ", ".join(format_number(v) for v in values[counts > 1][:3])
        # A column other than the curve's own that differs among the rows of one step tells the runs apart.
        rows = np.isin(table[x_name], values[counts > 1])
        own = (x_name, metric, train_name, "D", "step")
        runs_by = [n for n in table.names if n not in own and len(np.unique(table[n][rows])) > 1]
        if runs_by:
            advice = f"DATA holds more than one run (column {runs_by[0]!r}); pick one with --where"
        else:
            advice = "one row per point is needed (a resumed run that logged a step twice: keep one of them)"
        raise LogError(f"repeated {x_name} values ({repeated}): {advice}")
    if len(x) == 0:
        raise LogError(f"no rows with a positive {x_name} in {args.data}")
    train = table[train_name][order] if train_name else None
    if args.train_metric:
        check_train_loss(table[metric][order], train, args.train_metric, name, scalars)
    dataset_snr = None
    if "dataset_snr" in table:  # fed by a BasinEarlyStopping that watched the run, or a column of a table
        if not table.is_numeric("dataset_snr"):
            row, cell = table.first_non_number("dataset_snr")
            raise LogError(
                f"column 'dataset_snr' of {args.data} holds text, not numbers: {cell!r} in row {row + 1}"
            )
        dataset_snr = table["dataset_snr"][order]
        if not scalars:
            print(
                "snrmon: note: the column dataset_snr is read as the training set's SNR N|G|²/tr Σ (at "
                "most 1 at two points in a row: evidence of memorisation, as BasinEarlyStopping reads an "
                "SNRMonitor's)",
                file=sys.stderr,
            )
    live = table["live_points"][order] if "live_points" in table else None
    return x, table[metric][order], train, dataset_snr, x_name, name, live


def split_runs(table: Table) -> list[Table]:
    """One table per run of a log of scalars (its column group), in the order read, without the notes made
    while reading."""
    groups = table["group"]
    return [
        Table({n: values[groups == group] for n, values in table.columns.items()}, tag=table.tag)
        for group in dict.fromkeys(groups.tolist())
    ]


def with_training_loss(runs: list[Table], args: argparse.Namespace) -> tuple[list[Table], str | None]:
    """The runs of a log of scalars, each with its own training loss as the column train, and that column's
    name (None: no training loss). With --train-metric, its mean over each interval between two points of
    the metric; without, the means a BasinEarlyStopping that watched the run logged (see live_points). Always
    within one run: a directory of several runs holds several training losses, and a run picked from it with
    --where replays as its own directory does."""
    if args.train_metric:
        try:  # a run a BasinEarlyStopping watched with an SNRMonitor: its evidence is not replayed here
            read_forecast_series(args.data, runs[0].tag, "dataset_snr")
            print(
                f"snrmon: note: --train-metric replays the curves alone: the training set's SNR this run's "
                f"BasinEarlyStopping was fed (snr/forecast/{runs[0].tag}/dataset_snr) is replayed, with its "
                "own training-loss means, when --train-metric is left out",
                file=sys.stderr,
            )
        except LogError:
            pass
        logged = _by_run(read_table(args.data, tag=args.train_metric))
        checks = _checks(args.data, runs[0].tag)
        for run in runs:
            train = logged.get(run["group"][0])
            run.columns["train"] = (
                np.full(len(run), math.nan)  # no training loss in this run: said at its points
                if train is None
                else interval_means(run["step"], train["step"], train["loss"])
            )
            if run["group"][0] in checks:  # (after the means: the training loss is on the log's axis)
                at = on_check_steps(run["step"], run["loss"], checks[run["group"][0]])
                run.columns["step"] = run.columns["D"] = at
        return runs, "train"
    # What a BasinEarlyStopping that watched the run logged at its checks: the points it held (logged at
    # every check, by later versions), the training-loss mean, the metric's value and the training set's SNR
    # it was fed (each logged where finite).
    logged = {}
    for name in ("points", "train_loss", "value", "dataset_snr"):
        try:
            logged[name] = read_forecast_series(args.data, runs[0].tag, name)
        except LogError:
            logged[name] = {}
    if not logged["points"] and not logged["train_loss"]:  # not watched (or by an older snrmon)
        return runs, None
    for index, run in enumerate(runs):
        fed = {name: tables.get(run["group"][0]) for name, tables in logged.items()}
        checks = fed["points"] if fed["points"] is not None else fed["train_loss"]
        if checks is None:  # a run the callback did not watch, beside some it did: the metric alone, as alone
            run.columns["train"] = np.full(len(run), math.nan)
        else:
            runs[index] = live_points(run, checks, fed)
    return runs, "train"


def read_forecast_series(data: str, tag: str, name: str) -> dict[str, Table]:
    """Series ``name`` a BasinEarlyStopping watching ``tag`` logged, by run: ``snr/forecast/<tag>/<name>``,
    or, in a Hugging Face run's TensorBoard files, ``train/snr/forecast/eval_<x>/<name>`` for the tag
    ``eval/<x>`` (its TensorBoard callback writes the metric ``eval_<x>`` as ``eval/<x>``, and every key not
    starting with ``eval_`` under ``train/``). Raises LogError when no run logged it."""
    names = [f"snr/forecast/{tag}/{name}"]
    if tag.startswith("eval/"):
        names.append(f"train/snr/forecast/eval_{tag.removeprefix('eval/')}/{name}")
    found: dict[str, Table] = {}
    for series in reversed(names):  # (a run holding both: the first name's)
        try:
            found |= _by_run(read_table(data, tag=series))
        except LogError as error:
            missing = error
    if not found:
        raise missing
    return found


def _by_run(table: Table) -> dict[str, Table]:
    return {run["group"][0]: run for run in split_runs(table)}


def _checks(data: str, tag: str) -> dict[str, Table]:
    """What a BasinEarlyStopping(monitor=tag) that watched each run read at its checks: the metric's value
    (column ``loss``) by the trainer's global step (column ``step``), by run; none for a run it did not
    watch, or whose logs lack the values read (snrmon 0.1)."""
    try:
        return read_forecast_series(data, tag, "value")
    except LogError:
        return {}


def on_check_steps(steps: np.ndarray, values: np.ndarray, checks: Table) -> np.ndarray:
    """The steps of a metric's logged values, each at the check that read it (``checks``: the steps and the
    values a BasinEarlyStopping read); a value no check read keeps its step. Lightning logs a validation's
    metric at the trainer's global step − 1 and the callback says the global step (as ModelCheckpoint's file
    names do), so the replay of the logged curve says the steps the live run said. A check reads the last
    value logged before it, or one before that when a periodic check came first: matched by value (at
    float32, the precision of TensorBoard's files)."""
    labels = steps.copy()
    order = np.argsort(steps, kind="stable")
    logged, as_logged = steps[order], np.float32(values[order])
    taken = np.zeros(len(steps), dtype=bool)
    for step, value in zip(checks["step"].tolist(), np.float32(checks["loss"]).tolist(), strict=True):
        i = int(np.searchsorted(logged, step, side="left")) - 1  # the last value logged before the check
        while i >= 0 and as_logged[i] != value and not taken[i]:
            i -= 1  # (a value the check came too early to read: the one before it)
        if i >= 0 and as_logged[i] == value and not taken[i]:
            taken[i] = True
            labels[order[i]] = step
    return labels


def live_points(run: Table, checks: Table, fed: dict[str, Table | None]) -> Table:
    """The points a live BasinEarlyStopping(monitor=run.tag) forecast from: its checks (``checks``, a series
    it logged at each, by the trainer's global step), each with what it was fed there (``fed``, by name, each
    logged where finite, None where not logged at all): the metric's value it read (``value``; logs of older
    versions lack it: then the last value of the metric logged by that step, Lightning logging a validation
    metric one step earlier), the training-loss mean (``train_loss``), the training set's SNR
    (``dataset_snr``, fed at checks with a new measurement), and the points it held (``points``, as the column
    ``live_points``). A replay of them is the live run's forecast, not an approximation."""
    steps = checks["step"]

    def at_checks(table: Table | None) -> np.ndarray:  # NaN at a check where nothing was logged
        at = {} if table is None else dict(zip(table["step"].tolist(), table["loss"].tolist(), strict=True))
        return np.array([at.get(step, math.nan) for step in steps.tolist()], dtype=float)

    read = np.searchsorted(run["step"], steps, side="right") - 1  # the last value by each step
    kept = read >= 0 if fed["value"] is None else np.ones(len(steps), dtype=bool)
    points = run.select(np.maximum(read, 0)[kept])  # (the rows' other columns; the value as read below)
    points.columns["step"] = points.columns["D"] = steps[kept]
    points.columns["train"] = at_checks(fed["train_loss"])[kept]
    if fed["value"] is not None:  # (a check whose value was not finite logged none: a NaN point, as live)
        points.columns["loss"] = at_checks(fed["value"])[kept]
    if fed["dataset_snr"] is not None:
        points.columns["dataset_snr"] = at_checks(fed["dataset_snr"])[kept]
    if fed["points"] is not None:  # (see check_complete)
        points.columns["live_points"] = at_checks(fed["points"])[kept]
    logged = f"snr/forecast/{run.tag}/train_loss"
    with_train = f"with {logged}" if fed["train_loss"] is not None else f"without a training loss ({logged})"
    points.notes = [f"the points BasinEarlyStopping forecast from, {with_train}"]
    return points


def check_train_loss(
    metric: np.ndarray, train: np.ndarray, train_name: str, name: str, interval: bool
) -> None:
    """The training loss asked for must be there: while a point without it is in the forecaster's window,
    the forecast is the law of the metric alone, a different forecast. None at any point: an error; at
    some: a warning. ``interval``: the training loss was averaged between the points of a log of scalars."""
    points = np.isfinite(metric)
    missing = points & ~np.isfinite(train)
    if not missing.any():
        return
    if interval:
        where = f"logged in the interval since the previous {name} point"
        # A run that BasinEarlyStopping watched holds the training loss it forecast from: replays exactly.
        hint = "log it more often, or, for a run BasinEarlyStopping watched, leave out --train-metric"
    else:  # e.g. --where kept the rows of the metric, and the training loss sits on other rows
        where = f"on the rows of {name}"
        hint = "on other rows? one run's log, such as Lightning's metrics.csv, is averaged between points"
    if missing.sum() == points.sum():
        raise LogError(
            f"no finite {train_name} {where}, at any of the {int(points.sum())} points: the training loss "
            f"asked for with --train-metric is missing ({hint})"
        )
    count = f"{int(missing.sum())} of {int(points.sum())} points of {name}"
    alone = "the law of the metric alone forecasts near them"
    warn([f"{count} have no finite {train_name} {where}: {alone} ({hint})"])


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


def _one_run(runs: list[Table], args: argparse.Namespace) -> Table:
    """The one run of ``runs`` (the runs of a log of scalars, or one table), else an error naming them."""
    for column in RUN_COLUMNS + ("N",):
        if all(column in run for run in runs):
            names = list(dict.fromkeys(np.concatenate([run[column] for run in runs]).tolist()))
            if len(names) > 1:
                shown = ", ".join(str(r) for r in names[:8]) + (", ..." if len(names) > 8 else "")
                example = f'{column} == "{names[0]}"' if column != "N" else f"N == {names[0]}"
                raise LogError(
                    f"{len(names)} runs in {args.data} ({column}: {shown}); pick one with --where '{example}'"
                )
    return runs[0]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def replay_document(forecasts: list[Forecast], metric: str, x_name: str, mode: str = "min") -> dict:
    """The JSON of the replay: every point (with the forecaster's note), the first warning, the stop (x
    values, or null) and the observed best value: ``minimum`` (``maximum`` with mode "max")."""
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
            "note": f.note,
        }
        for f in forecasts
    ]
    first_warning = next((f.x for f in forecasts if f.warning or f.stop), None)
    stop = next((f.x for f in forecasts if f.stop), None)
    finite = [f for f in forecasts if math.isfinite(f.loss)]
    best = (min if mode == "min" else max)(finite, key=lambda f: f.loss) if finite else None
    return {
        "metric": metric,
        "mode": mode,
        "x": x_name,
        "points": points,
        "first_warning": first_warning,
        "stop": stop,
        "minimum" if mode == "min" else "maximum": None if best is None else {"x": best.x, "loss": best.loss},
    }


def replay_report(forecasts: list[Forecast], document: dict, x_name: str) -> str:
    show = format_number
    at = format_step if x_name == "step" else format_number  # steps are whole numbers
    rows = [[x_name, document["metric"], "D*", "band", "P(basin)", "state", ""]]
    warned = False  # the row before gave a warning (a warning that lapses is said: withdrawn)
    for f in forecasts:
        band = "-" if f.d_star_low is None else f"{at(f.d_star_low)} .. {at(f.d_star_high)}"
        action = "STOP" if f.x == document["stop"] else "warning" if f.warning else ""
        if warned and not action and f.d_star is not None:
            action = "warning withdrawn"
        warned = f.warning and f.d_star is not None or (warned and f.d_star is None)
        p = "-" if f.p_basin is None else f"{f.p_basin:.2f}"
        # A likely basin without a warning says why not (no fall yet, still falling, no memorisation).
        if f.note.startswith("no warning") and action in ("", "warning withdrawn"):
            action = f"{action} ({f.note})".strip()
        elif f.d_star is not None and f.d_star_low is None:  # (before the run's own points refit the prior)
            action = "(D* from the prior alone)"
        elif f.d_star is None and f.note:  # why not (too few points, no training loss, ...)
            action = f"({f.note})"
        rows.append([at(f.x), show(f.loss), at(f.d_star), band, p, f.state, action])
    lines = aligned(rows)
    extreme = "minimum" if document["mode"] == "min" else "maximum"
    best = document[extreme] or {"x": None, "loss": None}
    lines.append("")
    lines.append(
        f"first warning: {at(document['first_warning'])}; stop: {at(document['stop'])}; "
        f"observed {extreme}: {show(best['loss'])} at {x_name} {at(best['x'])}"
    )
    return "\n".join(lines)


def plot_replay(
    path: str, forecasts: list[Forecast], document: dict, x_name: str, projection: Projection | None = None
) -> None:
    """The curve with its projection at the stop (else at the last point), the forecast basin with its band
    at every point, the first warning and the stop."""
    from snrmon.forecast.plot import forecast_figure

    forecast_figure(forecasts, document["metric"], x_name, projection).savefig(path, dpi=120)
