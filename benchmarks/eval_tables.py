"""Printing the forecast evaluation: the plain per-run lines and the Markdown tables of docs/forecast.md
(the main table, the capacity candidates, the perturbation probes); the corpus evaluation of issue 13 and its
leads (the gradient inner products, time in learning-rate units), as Markdown or plain text.
"""

from __future__ import annotations

import json
import math

import numpy as np
from eval_record import Curve, label
from eval_replay import (
    CORPUS_METHODS,
    DOT_CONDITIONS,
    LATER_LEAD_METHODS,
    LEAD_METHODS,
    LOSS_ALONE_METHODS,
    METHODS,
    NOISE_LEAD_METHODS,
    PROBE_LABELS,
    capacity_methods,
    capacity_series,
    dot_hurts,
    probe_curve,
    probe_methods,
    run_forecaster_lr_time,
)
from eval_score import (
    CorpusRow,
    Row,
    corpus_row,
    corpus_summary,
    evaluate,
    evaluate_corpus,
    held_out,
    issue13_targets,
    pristine,
    summary,
    warning_leads,
)


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _cell(r: Row) -> str:
    stop = (
        f"stop {_x(r.stop)} ({100 * r.loss_gap:+.1f}%, {r.past_min:+d})" if r.stop is not None else "no stop"
    )
    return f"warn {_x(r.warning)}, {stop}"


def print_plain(rows: list[Row]) -> None:
    """The default output: one line per run and method, then the summary per method as JSON."""
    for r in rows:
        print(
            f"{r.curve:22s} {r.kind:9s} min@{r.x_min:<8.4g} {r.method:14s} warn {_x(r.warning):>8s} "
            f"stop {_x(r.stop):>8s} gap {100 * r.loss_gap:+6.2f}% past {r.past_min:+d}"
        )
    for method, s in summary(rows).items():
        print(method, json.dumps(s))


def markdown(rows: list[Row]) -> str:
    """The per-run table (first warning, stop with its loss against the minimum and the validations past
    it) and the summary per method, over all runs and over the held-out runs only."""
    methods = list(dict.fromkeys(r.method for r in rows))
    lines = [
        "| run | kind | minimum at | " + " | ".join(methods) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |",
    ]
    for curve in dict.fromkeys(r.curve for r in rows):
        mine = {r.method: r for r in rows if r.curve == curve}
        first = mine[methods[0]]
        mark = "" if held_out(curve) else " (tuning)"
        lines.append(
            f"| {curve}{mark} | {first.kind} | {first.x_min:.4g} | "
            + " | ".join(_cell(mine[m]) for m in methods)
            + " |"
        )
    subsets = (
        ("all runs", rows),
        (
            "held-out runs only (seeds 1 and 2, the cosine runs, Pythia)",
            [r for r in rows if held_out(r.curve)],
        ),
        (
            "recorded after every default was fixed (seed 2, the cosine runs)",
            [r for r in rows if pristine(r.curve)],
        ),
    )
    for title, subset in subsets:
        lines += [
            "",
            f"Summary, {title}:",
            "",
            "| method | warned at or before the minimum (U) | stopped (U) | loss at the stop within 1% (U) "
            "| best kept within 1% (U) | median validations past the minimum (U) "
            "| false alarms (improving) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for method, m in summary(subset).items():
            lines.append(
                f"| {method} | {m['warned_in_time']:.0%} of {m['n_u']} | {m['stopped']:.0%} | "
                f"{m['within_1pct']:.0%} | {m['kept_within_1pct']:.0%} | {m['median_past_min']:.1f} | "
                f"{m['false_alarms']} of {m['n_improving']} |"
            )
    return "\n".join(lines)


def capacity_markdown(curves: list[Curve], smooth: int = 1) -> str:
    """The capacity candidates against the forecaster's defaults: on the tuning seed, then on the held-out
    seeds; and how the measured capacity follows the law's 1/L = A·C (T8) along each run."""
    from scipy.stats import spearmanr

    curves = [c for c in curves if c.stats is not None]
    by_name = {c.name: c for c in curves}
    averaged = f", |G|² and tr Σ averaged over {smooth} validations" if smooth > 1 else ""
    lines = []
    for title, chosen in (
        ("tuning seed 0", [c for c in curves if not held_out(c.name)]),
        ("held-out seeds 1 and 2", [c for c in curves if held_out(c.name)]),
    ):
        rows = evaluate(chosen, capacity_methods(smooth))
        lines += [
            "",
            f"Capacity candidates, {title}{averaged}:",
            "",
            "| method | warned at or before the minimum (U) | loss at the stop within 1% (U) "
            "| mean loss at the stop vs the minimum (U) | median validations past the minimum (U) "
            "| median validations from the first warning to the minimum (U) | false alarms (improving) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for method, m in summary(rows).items():
            leads = warning_leads(rows, method, by_name)
            lines.append(
                f"| {method} | {m['warned_in_time']:.0%} of {m['n_u']} | {m['within_1pct']:.0%} | "
                f"{100 * m['mean_gap']:+.2f}% | {m['median_past_min']:.1f} | "
                f"{np.median(leads) if leads else math.nan:.1f} | {m['false_alarms']} of {m['n_improving']} |"
            )
    if smooth > 1:
        return "\n".join(lines)
    lines += [
        "",
        "Spearman correlation along each run between 1/L (validation) and the measured capacity: T8 wants it "
        "positive on every run.",
        "",
        "| run | kind | C_a (cumulative) | C_b (dataset) |",
        "| --- | --- | --- | --- |",
    ]
    for curve in curves:
        series, inverse = capacity_series(curve), 1 / np.asarray(curve.val)
        cells = [
            "–" if np.all(np.isnan(series[k])) else f"{spearmanr(inverse, series[k]).statistic:+.2f}"
            for k in ("cumulative", "dataset")
        ]
        lines.append(f"| {curve.name} | {curve.kind} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def probes_markdown(curves: list[Curve]) -> str:
    """Where each probe curve has its minimum against the clean one, and the forecaster watching it: the
    first warning and the stop, with the clean validation loss at the stop against its minimum."""
    curves = [c for c in curves if c.probes is not None]
    rows = evaluate(curves, probe_methods())
    methods = list(PROBE_LABELS.values())
    lines = [
        "Minimum of each curve: step (validations from the clean minimum, negative: earlier; U: the curve "
        "itself turns up, by the rule of the evaluation above).",
        "",
        "| run | kind | val_loss minimum at | " + " | ".join(methods) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |",
    ]
    for curve in curves:
        best = int(np.argmin(curve.val))
        cells = []
        for signal in PROBE_LABELS:
            probe = probe_curve(curve, signal)
            at = int(np.argmin(probe.val))
            cells.append(f"{curve.x[at]:.4g} ({at - best:+d}, {label(probe)})")
        lines.append(f"| {curve.name} | {curve.kind} | {curve.x[best]:.4g} | " + " | ".join(cells) + " |")
    names = list(probe_methods())
    lines += [
        "",
        "The forecaster (defaults) watching each curve, with the training loss: first warning, stop, then "
        "the *clean* validation loss at the stop against the clean minimum and the validations from the "
        "clean minimum to the stop.",
        "",
        "| run | kind | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for curve in curves:
        mine = {r.method: r for r in rows if r.curve == curve.name}
        lines.append(f"| {curve.name} | {curve.kind} | " + " | ".join(_cell(mine[m]) for m in names) + " |")
    by_name = {c.name: c for c in curves}
    lines += [
        "",
        "Summary, judged by the clean validation loss:",
        "",
        "| forecaster watching | warned at or before the minimum (U) | stopped (U) "
        "| loss at the stop within 1% (U) | mean loss at the stop vs the minimum (U) "
        "| best kept within 1% (U) | median validations past the minimum (U) "
        "| median validations from the first warning to the minimum (U) | false alarms (improving) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, m in summary(rows).items():
        leads = warning_leads(rows, method, by_name)
        lines.append(
            f"| {method} | {m['warned_in_time']:.0%} of {m['n_u']} | {m['stopped']:.0%} | "
            f"{m['within_1pct']:.0%} | {100 * m['mean_gap']:+.2f}% | {m['kept_within_1pct']:.0%} | "
            f"{m['median_past_min']:.1f} | {np.median(leads) if leads else math.nan:.1f} | "
            f"{m['false_alarms']} of {m['n_improving']} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The corpus (issue 13): per-run tables and the summary per method, as Markdown or plain text


def render(header: list[str], rows: list[list[str]], as_markdown: bool) -> list[str]:
    """A table as Markdown, or as plain text in padded columns."""
    if as_markdown:
        return [
            "| " + " | ".join(header) + " |",
            "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(row) + " |" for row in rows),
        ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _i(index: int | None) -> str:
    return "–" if index is None else str(index)


def corpus_cell(r: CorpusRow) -> str:
    """First warning and stop (validation indexes); on a U-run the loss at the stop (or the window's end)
    against the minimum and the validations from the minimum to the stop."""
    if r.warning is None and r.stop is None:
        return "–"
    cell = f"w {_i(r.warning)}, s {_i(r.stop)}"
    if r.kind == "U" and r.stop is not None:
        cell += f" ({100 * r.loss_gap:+.1f}%, {r.stop - r.min_index:+d})"
    return cell


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0%}"


def _signed(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:+.1f}"


def corpus_runs_table(rows: list[CorpusRow], as_markdown: bool) -> list[str]:
    methods = list(dict.fromkeys(r.method for r in rows))
    body = []
    for curve in dict.fromkeys(r.curve for r in rows):
        mine = {r.method: r for r in rows if r.curve == curve}
        first = mine[methods[0]]
        verdict = first.kind if first.kind == "improving" or first.target else "U (early)"
        body.append([curve, verdict, str(first.min_index), *(corpus_cell(mine[m]) for m in methods)])
    return render(["run", "in the window", "minimum at", *methods], body, as_markdown)


def corpus_summary_table(rows: list[CorpusRow], as_markdown: bool) -> list[str]:
    header = [
        "method",
        "in time (target U)",
        "warned before half the minimum",
        "median first warning − minimum (validations)",
        "stopped",
        "median stop − minimum (validations)",
        "mean loss at the stop vs the minimum",
        "best kept within 0.5%",
        "early U: warned by the minimum, kept",
        "warnings (improving)",
        "stops (improving)",
        "compute saved: all, U, improving",
        "issue 13 targets met",
    ]
    body = []
    for method, m in corpus_summary(rows).items():
        body.append(
            [
                method,
                f"{_pct(m['in_time'])} of {m['n_target']}",
                str(m["too_early"]),
                _signed(m["median_warning"]),
                _pct(m["stopped"]),
                _signed(m["median_past_min"]),
                f"{100 * m['mean_gap']:+.2f}%",
                _pct(m["kept"]),
                f"{m['early_warned']}, {m['early_kept']} of {m['n_early']}",
                f"{m['warning_alarms']} of {m['n_improving']}",
                f"{m['stop_alarms']} of {m['n_improving']}",
                f"{_pct(m['saved'])}, {_pct(m['saved_u'])}, {_pct(m['saved_improving'])}",
                ", ".join(issue13_targets(m)) or "none",
            ]
        )
    return render(header, body, as_markdown)


def corpus_report(curves: list[Curve], as_markdown: bool) -> str:
    """The corpus evaluation: every method per run, then the summary per method."""
    rows = evaluate_corpus(curves, CORPUS_METHODS)
    n = len(curves[0].x)
    lines = [
        f"Each curve replayed over its first {n} validations (w: first warning, s: stop, as validation "
        "indexes from 0; on U-runs the loss at the stop against the minimum and the validations from the "
        "minimum to the stop). U: the whole curve's minimum lies in the window; U (early): before the 15th "
        "validation.",
        "",
        *corpus_runs_table(rows, as_markdown),
        "",
        "Summary: in time = first warning at or before the minimum and at or after half its steps; the "
        "median over stopped target U-runs; the loss at the stop (or the window's end) and the best kept "
        "(a ModelCheckpoint up to the stop; no stop: not kept) over target U-runs; compute saved = "
        "1 − steps to the stop (or the window's end) / steps to the window's end, mean.",
        "",
        *corpus_summary_table(rows, as_markdown),
    ]
    return "\n".join(lines)


def loss_alone_report(curves: list[Curve], as_markdown: bool) -> str:
    """The corpus evaluation as a replay of the monitored loss alone sees it (no training loss)."""
    rows = evaluate_corpus(curves, LOSS_ALONE_METHODS)
    return "\n".join(
        [
            "The forecaster fed the monitored loss only (as `snrmon forecast` without `--train-metric`), "
            "against the rules that need no training loss; the default with the training loss for reference.",
            "",
            *corpus_runs_table(rows, as_markdown),
            "",
            *corpus_summary_table(rows, as_markdown),
        ]
    )


# ----------------------------------------------------------------------------------------------------------
# The leads the corpus records: the gradient inner products; time in learning-rate units


def _from_min(r: CorpusRow, index: int | None) -> str:
    if index is None:
        return "–"
    return f"{index} ({index - r.min_index:+d})" if r.kind == "U" else f"{index} (alarm)"


def dot_runs_table(rows: list[CorpusRow], as_markdown: bool) -> list[str]:
    """Per run, where each inner-product rule first fires and fires twice in a row, against the minimum."""
    methods = list(dict.fromkeys(r.method for r in rows))
    header = ["run", "in the window", "minimum at"]
    for m in methods:
        header += [f"{m}: first", f"{m}: twice in a row"]
    body = []
    for curve in dict.fromkeys(r.curve for r in rows):
        mine = {r.method: r for r in rows if r.curve == curve}
        first = mine[methods[0]]
        verdict = first.kind if first.kind == "improving" or first.target else "U (early)"
        cells = [
            c
            for m in methods
            for c in (_from_min(mine[m], mine[m].warning), _from_min(mine[m], mine[m].stop))
        ]
        body.append([curve, verdict, str(first.min_index), *cells])
    return render(header, body, as_markdown)


def _rate(parts: list[np.ndarray]) -> str:
    """The share of True over the concatenated flags, with their count."""
    flags = np.concatenate([np.zeros(0, bool), *parts])
    return f"{flags.mean():.0%} of {len(flags)}" if len(flags) else "–"


def dot_rates_table(curves: list[Curve], as_markdown: bool) -> list[str]:
    """How often each inner-product condition holds, validation by validation: on the U-runs before and
    after their minimum, and on the improving-there runs. A useful lead holds rarely before, often after."""
    u = [c for c in curves if c.kind == "U"]
    improving = [c for c in curves if c.kind == "improving"]
    body = []
    recorded = [w for w, (series, _, _) in DOT_CONDITIONS.items() if all(getattr(c, series) for c in curves)]
    for which in recorded:
        name = DOT_CONDITIONS[which][2]
        before = [dot_hurts(c, which)[: c.min_index] for c in u]
        after = [dot_hurts(c, which)[c.min_index + 1 :] for c in u]
        elsewhere = [dot_hurts(c, which) for c in improving]
        body.append([name, *(_rate(parts) for parts in (before, after, elsewhere))])
    header = ["condition", "U-runs, before the minimum", "U-runs, after the minimum", "improving-there runs"]
    return render(header, body, as_markdown)


def lr_time_table(scheduled: list[Curve], whole: list[Curve], as_markdown: bool) -> list[str]:
    """The forecaster with x = steps against x = Σ η, over the window and over the whole recorded curve."""
    methods = {"steps": METHODS["forecaster"], "lr units": run_forecaster_lr_time}
    body = []
    for window, full in zip(scheduled, whole, strict=True):
        cells = []
        for curve in (window, full):
            cells += [corpus_cell(corpus_row(curve, name, method(curve))) for name, method in methods.items()]
        body.append(
            [
                window.name,
                window.schedule,
                window.kind,
                *cells[:2],
                full.kind,
                str(full.min_index),
                *cells[2:],
            ]
        )
    header = [
        "run",
        "schedule",
        "in the window",
        "window: x = steps",
        "window: x = Σ η",
        "whole curve",
        "minimum at",
        "whole: x = steps",
        "whole: x = Σ η",
    ]
    return render(header, body, as_markdown)


def val_noise_table(curves: list[Curve], as_markdown: bool) -> list[str]:
    """The standard error of each validation loss over its examples against the noise from one validation to
    the next (robust: the median absolute difference of consecutive losses / 0.6745 / √2), in the window's
    second half, where the curve is flattest. A noise the decisions could use instead of the curve's own
    would have to be about the size of the latter."""
    ratios = []
    for c in curves:
        half = len(c.val) // 2
        val, se = np.asarray(c.val[half:]), np.asarray(c.val_se[half:])
        step_noise = 1.4826 * float(np.median(np.abs(np.diff(val)))) / math.sqrt(2)
        if step_noise > 0:
            ratios.append(float(np.median(se)) / step_noise)
    q1, median, q3 = np.quantile(ratios, [0.25, 0.5, 0.75])
    below = sum(r <= 1 for r in ratios)
    body = [[str(len(ratios)), f"{median:.1f}", f"{q1:.1f} – {q3:.1f}", f"{below}"]]
    header = ["runs", "median se / step noise", "quartiles", "runs with se <= step noise"]
    return render(header, body, as_markdown)


def leads_report(curves: list[Curve], whole: list[Curve], as_markdown: bool) -> str:
    """The inner-product rules scored like warnings and stops (with the forecaster for reference); the
    forecaster in learning-rate units on the scheduled runs."""
    leads = dict(LEAD_METHODS)
    if all(c.full_dot is not None for c in curves):
        leads.update(LATER_LEAD_METHODS)
    if all(c.train_noise is not None for c in curves):
        leads.update(NOISE_LEAD_METHODS)
    methods = {"forecaster": METHODS["forecaster"], **leads}
    rows = evaluate_corpus(curves, methods)
    dot_rows = [r for r in rows if r.method in leads and r.method not in NOISE_LEAD_METHODS]
    scheduled = [i for i, c in enumerate(curves) if c.schedule != "constant"]
    constant = [c for c in curves if c.schedule == "constant"]
    same = sum(METHODS["forecaster"](c) == run_forecaster_lr_time(c) for c in constant)
    lines = [
        "(a) The gradient inner products as rules: g_val·g_train + 2 se < 0 (the last training gradient "
        "raises the validation loss to first order under plain SGD), g_val·Δθ − 2 se > 0 (the actual "
        "last step raised it) and, where recorded, the same first condition with the whole training set's "
        "gradient ḡ_train and with the mean of the interval's training gradients. Validation index where "
        "each first fires and first fires twice in a row; in brackets, validations from the minimum "
        "(negative: before it) or a false alarm on an "
        "improving-there run.",
        "",
        *dot_runs_table(dot_rows, as_markdown),
        "",
        "Scored as warnings (first firing) and stops (twice in a row), with the forecaster for reference:",
        "",
        *corpus_summary_table(rows, as_markdown),
        "",
        "How often each condition holds, over the validations of the window:",
        "",
        *dot_rates_table(curves, as_markdown),
        "",
        "(b) The forecaster in learning-rate units (x = Σ η) on the scheduled runs, over the window and over "
        "the whole recorded curve (judged by the whole curve's minimum); stops mapped back to validations. "
        "On an improving run every warning or stop is a false alarm.",
        "",
        *lr_time_table([curves[i] for i in scheduled], [whole[i] for i in scheduled], as_markdown),
        "",
        f"On the constant-rate runs (x = Σ η = η·steps) the two replays agree on {same} of {len(constant)}.",
        "",
        "(c) The noise of the monitored value: each validation loss's standard error over its examples (what "
        "a callback can know from per-batch losses) against the noise from one validation to the next. On a "
        "fixed validation set every evaluation shares the same examples, so the standard error measures the "
        "set's sampling error, common to all points, not the noise of a change between them.",
        "",
        *val_noise_table(curves, as_markdown),
    ]
    return "\n".join(lines)
