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
