"""Printing the forecast evaluation: the plain per-run lines and the Markdown tables of docs/forecast.md
(the main table, the capacity candidates, the perturbation probes).
"""

from __future__ import annotations

import json
import math

import numpy as np
from eval_record import Curve, label
from eval_replay import PROBE_LABELS, capacity_methods, capacity_series, probe_curve, probe_methods
from eval_score import Row, evaluate, held_out, pristine, summary, warning_leads


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
