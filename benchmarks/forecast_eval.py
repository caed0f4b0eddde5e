"""How well does the basin forecaster warn and stop on real runs? (issue 7; docs/forecast.md)

Records small real training runs on the CPU (one thread), caches their curves, then replays every curve,
validation by validation, through the forecaster behind ``BasinEarlyStopping`` (its defaults) and the
baselines: Lightning-style patience early stopping (3 and 5 validations), a monotone power-law fit and the
loss-only single-run Shannon law (T9). Also replays the shipped Pythia LAMBADA curves run by run.

    python benchmarks/forecast_eval.py            # record (once, ~8 min, cached) and replay (~2 min)
    python benchmarks/forecast_eval.py --record   # re-record the curves
    python benchmarks/forecast_eval.py --markdown # the table of docs/forecast.md
    python benchmarks/forecast_eval.py --record-stats  # add gradient statistics to the cache (~6 min)
    python benchmarks/forecast_eval.py --capacity      # the capacity candidates of docs/forecast.md (~20 s)
    python benchmarks/forecast_eval.py --probes        # the forecaster on the perturbation probe curves
                                                       # (recorded where missing, ~5 min; replay ~6 s)
    python benchmarks/forecast_eval.py --corpus tuning [--markdown]  # issue 13: the real corpus (~25 s)
    python benchmarks/forecast_eval.py --corpus tuning --leads       # the leads it records (~7 s)
    python benchmarks/forecast_eval.py --corpus tuning --loss-alone  # the loss alone (~2 min)
    python benchmarks/forecast_eval.py --corpus held-out             # once corpus.py --held-out has run

Scenarios whose validation loss turns up (U-shaped): an MLP on a small data set trained for many epochs, an
MLP on labels 30% flipped (validated on clean labels), a tiny byte-level GPT overfitting 32 KB of text.
Scenarios that keep improving: an MLP on fresh samples every step, the same with a small, noisy validation
set and small batches, a tiny GPT on a large corpus. Three seeds each; the defaults were chosen on seed 0.

``--corpus SPLIT`` replays the curves of benchmarks/corpus.py (real data sets, models and schedules) over
their first ``replay_validations`` validations through the forecaster, patience, the power-law fit and
Prechelt's rules, judged by the truth of each whole curve (issue 13).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from eval_record import load_corpus, load_curves, pythia_curves, record_probes, record_stats
from eval_score import evaluate
from eval_tables import (
    capacity_markdown,
    corpus_report,
    leads_report,
    loss_alone_report,
    markdown,
    print_plain,
    probes_markdown,
)


def corpus(split: str, leads: bool, as_markdown: bool, loss_alone: bool = False) -> None:
    """The corpus evaluation of issue 13 (or its leads, or the loss alone) on one split; says so when it is
    not recorded."""
    curves = load_corpus(split)
    if not curves:
        flag = " --held-out" if split == "held-out" else ""
        sys.exit(
            f"no {split} curves in benchmarks/corpus_curves.json yet (python benchmarks/corpus.py{flag})"
        )
    began = time.perf_counter()
    if leads:
        whole = load_corpus(split, length=10**9)  # the whole recorded curves, for the schedules
        print(leads_report(curves, whole, as_markdown))
    elif loss_alone:
        print(loss_alone_report(curves, as_markdown))
    else:
        print(corpus_report(curves, as_markdown))
    print(f"replayed {len(curves)} {split} curves in {time.perf_counter() - began:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="re-record the training curves")
    parser.add_argument("--markdown", action="store_true", help="print the per-run table as Markdown")
    parser.add_argument(
        "--record-stats", action="store_true", help="add the gradient statistics to the cached curves"
    )
    parser.add_argument(
        "--capacity", action="store_true", help="replay the capacity candidates (Markdown tables) and exit"
    )
    parser.add_argument("--smooth", type=int, default=1, help="with --capacity: average over this many")
    parser.add_argument(
        "--probes",
        action="store_true",
        help="replay the forecaster on the perturbation probe curves (Markdown tables; recorded where "
        "missing) and exit",
    )
    parser.add_argument(
        "--corpus",
        choices=("tuning", "held-out", "held-out-2", "held-out-3", "held-out-4"),
        help="replay the corpus curves of this split (benchmarks/corpus.py) and exit",
    )
    parser.add_argument("--leads", action="store_true", help="with --corpus: the leads table instead")
    parser.add_argument(
        "--loss-alone",
        action="store_true",
        help="with --corpus: the forecaster fed the monitored loss only (the law), against the rules that "
        "need no training loss (~2 min a split)",
    )
    args = parser.parse_args()
    if args.corpus:
        corpus(args.corpus, args.leads, args.markdown, args.loss_alone)
        sys.exit(0)
    curves = load_curves(args.record)
    if args.record_stats:
        curves = record_stats(curves)
    if args.capacity:
        print(capacity_markdown(curves, args.smooth))
        sys.exit(0)
    if args.probes:
        curves = record_probes(curves)
        began = time.perf_counter()
        print(probes_markdown(curves))
        print(f"replayed the probe curves in {time.perf_counter() - began:.0f} s", file=sys.stderr)
        sys.exit(0)
    curves += pythia_curves()
    began = time.perf_counter()
    rows = evaluate(curves)
    if args.markdown:
        print(markdown(rows))
    else:
        print_plain(rows)
    print(f"replayed {len(curves)} curves in {time.perf_counter() - began:.0f} s", file=sys.stderr)
