"""``snrmon compare``: fit every law DATA supports and rank them by held-out (else training) R²."""

from __future__ import annotations

import argparse
import json
import math

from snrmon.cli.data import DESCRIPTION, fit_options, load, read
from snrmon.cli.fit import fit_document
from snrmon.cli.render import aligned, format_number, json_safe, warn
from snrmon.laws import FitError
from snrmon.laws.study import Data, applicable_laws, fit_data


def add_parser(commands, data: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``compare`` on the ``snrmon`` command's subparsers; ``data``: the parent parser of DATA."""
    compare = commands.add_parser(
        "compare",
        parents=[data],
        help="fit every applicable law and rank them",
        description="Fit every law that DATA supports; rank them by test R² (train R² if no test split).\n"
        "kumar and qid need a bits column; single-run laws are fitted to each run.\n\n"
        + DESCRIPTION.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.set_defaults(run=run)
    return compare


def run(args: argparse.Namespace) -> int:
    table = read(args)
    laws = applicable_laws(table)
    needed = sorted({name for law in laws for name in law.inputs}, key=["N", "D", "bits"].index) + ["loss"]
    data = load(args, table, needed)
    entries = []
    for law in laws:
        entry = {
            "law": law.name,
            "equation": law.equation,
            "formula": law.formula,
            "single_run": law.single_run,
        }
        try:
            result = fit_data(law, data, **fit_options(args, bootstrap=0))
        except FitError as error:
            entry.update(
                n_constants=len(law.params),
                error=str(error),
                basin_found=None,
                d_star=None,
                d_star_sampled=None,
                params=None,
                warnings=[],
                **dict.fromkeys(("r2_train", "rmse_train", "r2_test", "rmse_test", "n_train", "n_test")),
            )
            entries.append(entry)
            continue
        runs = len(result.fits)
        finite = [v for v in (result.d_star or {}).values() if math.isfinite(v)]
        entry.update(
            n_constants=len(law.params) * runs,
            runs=runs if law.single_run else None,
            error=None,
            **result.scores,
            basin_found=None if result.d_star is None else bool(finite),
            n_basins=None if result.d_star is None else len(finite),
            d_star=result.d_star,
            d_star_sampled=result.d_star_sampled,
            params=fit_document(result, data)["params"],
            dropped_rows=data.dropped_rows,
            warnings=result.warnings,
        )
        warn(result.warnings)
        entries.append(entry)
    score = "r2_test" if data.has_test else "r2_train"
    entries.sort(key=lambda e: (e["error"] is not None, -_finite_or(e.get(score), -math.inf)))
    for rank, entry in enumerate(entries, start=1):
        entry["rank"] = rank
    if args.json:
        print(json.dumps(json_safe(entries), indent=2))
    else:
        print(compare_report(entries, data, score))
    return 0


def _finite_or(value, default: float) -> float:
    return value if value is not None and math.isfinite(value) else default


def compare_report(entries: list[dict], data: Data, score: str) -> str:
    """The ranked table of ``snrmon compare``."""
    rows = [["rank", "law", "equation", "constants", "R² train", "R² test", "RMSE test", "basin"]]
    for e in entries:
        constants = str(e["n_constants"])
        if e.get("runs"):
            constants += f" ({e['n_constants'] // e['runs']}/run x {e['runs']})"
        basin = "n/a" if e["basin_found"] is None else "no"
        if e["basin_found"]:
            basin = f"yes ({e['n_basins']} of {len(e['d_star'])})"
        if e["error"] is not None:
            basin = "failed"
        rows.append(
            [str(e["rank"]), e["law"], e["equation"], constants]
            + [format_number(e[k]) for k in ("r2_train", "r2_test", "rmse_test")]
            + [basin]
        )
    split = (
        f"{int(data.train.sum())} train / {int((~data.train).sum())} test rows"
        if data.has_test
        else (f"{len(data.table)} rows, no test split")
    )
    lines = [f"{data.source}: {split}; ranked by {score.replace('r2_', 'R² ')}", ""] + aligned(rows)
    failures = [f"  {e['error']}" for e in entries if e["error"] is not None]
    if failures:
        lines += ["", "failed:"] + failures
    if "N" not in data.table:
        lines += [
            "",
            "laws of N and D skipped: no N column (a log of scalars: give --N, or n_params in the"
            " hparams.yaml beside a TensorBoard run or a metrics.csv)",
        ]
    if data.dropped_rows:
        lines += ["", f"{data.dropped_rows} rows with missing values dropped"]
    return "\n".join(lines)
