"""Scoring the replays of the forecast evaluation: per run and method, a Row (the stop's loss against the
minimum, the validations past it, false alarms), the summary per method, and which runs are held out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from eval_record import PRISTINE, Curve
from eval_replay import METHODS


@dataclass
class Row:
    curve: str
    kind: str
    method: str
    x_min: float
    warning: float | None
    stop: float | None
    loss_gap: float  # (loss at the stop, or at the end) / minimum − 1
    kept_gap: float  # the same for the best loss seen up to the stop: what a ModelCheckpoint pairing keeps
    past_min: int  # validations from the minimum to the stop (or the end); negative: stopped before it
    alarm: bool  # a warning or a stop on a run without a basin


def evaluate(curves: list[Curve], methods=METHODS) -> list[Row]:
    rows = []
    for curve in curves:
        val = np.asarray(curve.val)
        best = int(np.argmin(val))
        for name, method in methods.items():
            outcome = method(curve)
            end = curve.x.index(outcome.stop) if outcome.stop is not None else len(val) - 1
            rows.append(
                Row(
                    curve.name,
                    curve.kind,
                    name,
                    curve.x[best],
                    outcome.warning,
                    outcome.stop,
                    float(val[end] / val[best] - 1),
                    float(val[: end + 1].min() / val[best] - 1),
                    end - best,
                    curve.kind == "improving" and (outcome.warning is not None or outcome.stop is not None),
                )
            )
    return rows


def summary(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per method: the targets of issue 7 measured over all U-shaped and all improving curves."""
    out = {}
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        u = [r for r in mine if r.kind == "U"]
        good = [r for r in mine if r.kind == "improving"]
        out[method] = {
            "warned_in_time": float(np.mean([r.warning is not None and r.warning <= r.x_min for r in u])),
            "stopped": float(np.mean([r.stop is not None for r in u])),
            "within_1pct": float(np.mean([r.stop is not None and r.loss_gap <= 0.01 for r in u])),
            "median_past_min": float(np.median([r.past_min for r in u if r.stop is not None] or [np.nan])),
            "mean_gap": float(np.mean([r.loss_gap for r in u])),
            "kept_within_1pct": float(np.mean([r.stop is not None and r.kept_gap <= 0.01 for r in u])),
            "false_alarms": int(sum(r.alarm for r in good)),
            "n_u": len(u),
            "n_improving": len(good),
        }
    return out


def warning_leads(rows: list[Row], method: str, by_name: dict[str, Curve]) -> list[int]:
    """Validations from each U-shaped run's first warning (by ``method``) to its minimum."""
    return [
        by_name[r.curve].x.index(r.x_min) - by_name[r.curve].x.index(r.warning)
        for r in rows
        if r.method == method and r.kind == "U" and r.warning is not None
    ]


def held_out(name: str) -> bool:
    """Curves the defaults were not chosen on: seeds 1 and 2 of every scenario, every pristine run, Pythia."""
    return not name.endswith("/0") or pristine(name)


def pristine(name: str) -> bool:
    """Curves recorded after every default was fixed: seed 2 of the first scenarios, the PRISTINE ones."""
    return name.endswith("/2") or name.split("/")[0] in PRISTINE


# ----------------------------------------------------------------------------------------------------------
# The corpus (issue 13): each curve replayed over its window, judged by the truth of the whole curve

HALF = 0.5  # a warning before half the minimum's steps named another basin than the one that came
KEPT = 0.005  # the best loss a ModelCheckpoint keeps counts when within 0.5% of the minimum


@dataclass
class CorpusRow:
    curve: str
    kind: str  # the verdict in the window: "U" (the minimum lies inside it) or "improving"
    target: bool  # a U-run whose minimum is at the 15th validation or later
    method: str
    min_index: int  # the whole curve's minimum (beyond the window on an improving-there run)
    warning: int | None  # validation index of the first warning (None: never)
    stop: int | None  # validation index of the stop (None: ran to the window's end)
    in_time: bool  # U: warned at or before the minimum, and at or after half its steps
    early: bool  # U: warned before half the minimum's steps (the wrong basin)
    loss_gap: float  # U: (loss at the stop, or the window's end) / minimum − 1
    kept_gap: float  # U: the same for the best loss seen up to there (a ModelCheckpoint)
    saved: float  # 1 − steps to the stop (or the window's end) / steps to the window's end


def _index(curve: Curve, x: float | None) -> int | None:
    return None if x is None else curve.x.index(x)


def corpus_row(curve, method: str, outcome) -> CorpusRow:
    """Score one replay (an Outcome of eval_replay) of a CorpusCurve."""
    val = np.asarray(curve.val)
    warning, stop = _index(curve, outcome.warning), _index(curve, outcome.stop)
    end = len(val) - 1 if stop is None else stop
    u = curve.kind == "U"
    x_min = curve.x[curve.min_index] if u else np.inf
    warned = outcome.warning is not None
    best = val[curve.min_index] if u else np.nan  # the loss is judged on U-runs only
    return CorpusRow(
        curve.name,
        curve.kind,
        curve.target,
        method,
        curve.min_index,
        warning,
        stop,
        u and warned and HALF * x_min <= outcome.warning <= x_min,
        u and warned and outcome.warning < HALF * x_min,
        float(val[end] / best - 1),
        float(val[: end + 1].min() / best - 1),
        float(1 - curve.x[end] / curve.x[-1]),
    )


def evaluate_corpus(curves: list, methods: dict) -> list[CorpusRow]:
    """Every method replayed over every (windowed) corpus curve."""
    return [corpus_row(curve, name, method(curve)) for curve in curves for name, method in methods.items()]


def _share(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else np.nan


def corpus_summary(rows: list[CorpusRow]) -> dict[str, dict[str, float]]:
    """Per method, what a user feels: over the target U-runs, the early U-runs (minimum before the 15th
    validation), the improving-there runs and all runs."""
    out = {}
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        target = [r for r in mine if r.target]
        early = [r for r in mine if r.kind == "U" and not r.target]
        good = [r for r in mine if r.kind == "improving"]
        past = [r.stop - r.min_index for r in target if r.stop is not None]
        lead = [r.warning - r.min_index for r in target if r.warning is not None]
        out[method] = {
            "n_target": len(target),
            "in_time": _share([r.in_time for r in target]),
            "too_early": sum(r.early for r in target),
            "median_warning": float(np.median(lead)) if lead else np.nan,
            "stopped": _share([r.stop is not None for r in target]),
            "median_past_min": float(np.median(past)) if past else np.nan,
            "mean_gap": _share([r.loss_gap for r in target]),
            "kept": _share([r.stop is not None and r.kept_gap <= KEPT for r in target]),
            "n_early": len(early),
            "early_warned": sum(r.warning is not None and r.warning <= r.min_index for r in early),
            "early_kept": sum(r.stop is not None and r.kept_gap <= KEPT for r in early),
            "n_improving": len(good),
            "warning_alarms": sum(r.warning is not None for r in good),
            "stop_alarms": sum(r.stop is not None for r in good),
            "saved": _share([r.saved for r in mine]),
            "saved_u": _share([r.saved for r in mine if r.kind == "U"]),
            "saved_improving": _share([r.saved for r in good]),
        }
    return out


def issue13_targets(m: dict[str, float]) -> list[str]:
    """Which of issue 13's targets a method's summary meets."""
    checks = {
        "in time ≥ 80%": m["in_time"] >= 0.8,
        "no false alarm": m["warning_alarms"] == 0 and m["stop_alarms"] == 0,
        # Stopping before the minimum is no better than after it: the median must lie in [0, 1].
        "median 0–1 past": 0 <= m["median_past_min"] <= 1,
        "kept ≥ 90%": m["kept"] >= 0.9,
    }
    return [name for name, met in checks.items() if met]
