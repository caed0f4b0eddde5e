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

Scenarios whose validation loss turns up (U-shaped): an MLP on a small data set trained for many epochs, an
MLP on labels 30% flipped (validated on clean labels), a tiny byte-level GPT overfitting 32 KB of text.
Scenarios that keep improving: an MLP on fresh samples every step, the same with a small, noisy validation
set and small batches, a tiny GPT on a large corpus. Three seeds each; the defaults were chosen on seed 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "forecast_curves.json"
PYTHIA = ROOT / "data" / "pythia_deduped_lambada_loss.csv"
PYTHIA_FIRST_STEP = 3000  # earlier checkpoints are chaotic (data/README.md)


# ----------------------------------------------------------------------------------------------------------
# Recording real runs


@dataclass
class Curve:
    name: str
    kind: str  # "U" (validation loss turns up) or "improving"; decided by the recorded curve, see label()
    x: list[float]  # optimizer steps at each validation
    val: list[float]
    train: list[float] | None  # mean training loss over the steps since the previous validation
    # Gradient statistics at each validation (see grad_stats): "signal" |G|², "noise" tr(Σ) per sample, and
    # the run's constants "lr", "batch", "n_train" (None: fresh samples), "tokens_per_sample".
    stats: dict | None = None
    # Perturbation probes at each validation (see probe_losses): the validation loss of the first
    # PROBE_BATCHES validation batches under each probe ("gaussian_10db", "int4") and unperturbed ("clean"),
    # with the validation batch size "batch_size" and the number of batches "batches".
    probes: dict | None = None

    def as_dict(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "x": self.x, "val": self.val, "train": self.train}
        if self.stats is not None:
            out["stats"] = self.stats
        if self.probes is not None:
            out["probes"] = self.probes
        return out


def _teacher(torch, d_in: int, classes: int, seed: int):
    """A fixed random two-layer network that labels Gaussian inputs: a learnable, non-trivial task."""
    gen = torch.Generator().manual_seed(1000 + seed)
    w1 = torch.randn(d_in, 64, generator=gen) / math.sqrt(d_in)
    w2 = torch.randn(64, classes, generator=gen) / math.sqrt(64)

    def sample(n: int, gen) -> tuple:
        x = torch.randn(n, d_in, generator=gen)
        return x, (torch.tanh(x @ w1) @ w2).argmax(1)

    return sample


STAT_BATCHES = 8  # micro-batches per measurement of the gradient statistics


def grad_stats(model, loss_on, batches: list) -> tuple[float, float]:
    """|G|² and per-sample tr(Σ) of the training loss from K independent micro-batches of B samples each
    (theory T1–T3 with K draws instead of two batch sizes): with ḡ their mean gradient,
    tr(Σ) = B·Σ_k|g_k − ḡ|²/(K − 1) and |G|² = |ḡ|² − tr(Σ)/(K·B), both unbiased for draws with replacement.

    Run at a validation, on batches from a generator of its own, with the gradients cleared by the next
    step's ``zero_grad``: training is unchanged (the recorded curves replay bit for bit)."""
    import torch

    grads = []
    for inputs, targets in batches:
        model.zero_grad(set_to_none=True)
        loss_on(inputs, targets).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    g = torch.stack(grads).double()
    k, b = len(batches), len(batches[0][1])
    mean = g.mean(0)
    trace = b * float(((g - mean) ** 2).sum()) / (k - 1)
    return float(mean @ mean) - trace / (k * b), trace


PROBE_BATCHES = 4  # PerturbationProbe's num_batches default


def probe_signals() -> list:
    """The probes of docs/forecast.md, as GaussianNoiseProbe(snr_db=10) and QuantizationProbe(bits=4) build
    them with their defaults (draws=4, seed=0)."""
    from snrmon.measure.probes import GaussianNoise, Quantization

    return [GaussianNoise(snr_db=10, draws=4, seed=0), Quantization(bits=4)]


def probe_losses(model, loss_on, batches: list) -> dict[str, float]:
    """What GaussianNoiseProbe and QuantizationProbe log at a validation: the mean loss of ``batches`` (the
    first PROBE_BATCHES validation batches) under each perturbation, averaged over its draws
    (snrmon.measure.probes.perturbed_loss: torch.no_grad, eval mode, the probe's own generator, the weights
    restored bit-exactly from a copy); and, as a control, their unperturbed mean loss (``"clean"``).
    Training is unchanged (the recorded curves replay bit for bit)."""
    import torch

    from snrmon.measure.probes import perturbed_loss, probe_parameters

    params = probe_parameters(model)

    def mean_loss():
        return torch.stack([loss_on(inputs, targets).detach().float() for inputs, targets in batches]).mean()

    out = {p.name: float(perturbed_loss(model, p, mean_loss, params)) for p in probe_signals()}
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out["clean"] = float(mean_loss())
    for m, mode in training:
        m.training = mode
    return out


def _probed(probes: dict | None, batch_size: int, measured: list[dict]) -> dict | None:
    if not probes:
        return None
    return {
        "batches": PROBE_BATCHES,
        "batch_size": batch_size,
        **{key: [m[key] for m in measured] for key in measured[0]},
    }


def mlp_run(
    name: str,
    seed: int,
    n_train: int | None,
    flip: float = 0.0,
    batch: int = 32,
    steps: int = 3000,
    val_every: int = 50,
    n_val: int = 2000,
    lr: float = 1e-3,
    width: int = 256,
    stats: bool = False,
    probes: bool = False,
) -> Curve:
    """An MLP classifier on a teacher's labels; ``n_train=None`` draws fresh samples every step. The probes
    see the validation set as a loader with the training batch size would serve it: its first
    PROBE_BATCHES batches of ``batch`` samples."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    d_in, classes = 32, 8
    sample = _teacher(torch, d_in, classes, seed)
    gen = torch.Generator().manual_seed(seed)
    x_val, y_val = sample(n_val, gen)
    if n_train is not None:
        x_train, y_train = sample(n_train, gen)
        flipped = torch.rand(n_train, generator=gen) < flip
        y_train = torch.where(flipped, torch.randint(0, classes, (n_train,), generator=gen), y_train)
    model = nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    xs, vals, trains, window = [], [], [], []
    signals, noises, stats_gen = [], [], torch.Generator().manual_seed(7000 + seed)
    probed: list[dict] = []
    probe_batches = [
        (x_val[i * batch : (i + 1) * batch], y_val[i * batch : (i + 1) * batch]) for i in range(PROBE_BATCHES)
    ]

    def stat_batch() -> tuple:
        if n_train is None:
            return sample(batch, stats_gen)
        idx = torch.randint(0, n_train, (batch,), generator=stats_gen)
        return x_train[idx], y_train[idx]

    for step in range(1, steps + 1):
        if n_train is None:
            xb, yb = sample(batch, gen)
        else:
            idx = torch.randint(0, n_train, (batch,), generator=gen)
            xb, yb = x_train[idx], y_train[idx]
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(loss.item())
        if step % val_every == 0:
            with torch.no_grad():
                vals.append(loss_fn(model(x_val), y_val).item())
            xs.append(float(step))
            trains.append(float(np.mean(window)))
            window = []
            if stats:
                batches = [stat_batch() for _ in range(STAT_BATCHES)]
                signal, noise = grad_stats(model, lambda i, t: loss_fn(model(i), t), batches)
                signals.append(signal)
                noises.append(noise)
            if probes:
                probed.append(probe_losses(model, lambda i, t: loss_fn(model(i), t), probe_batches))
    constants = {"lr": lr, "batch": batch, "n_train": n_train, "tokens_per_sample": 1}
    recorded = {"signal": signals, "noise": noises, **constants} if stats else None
    return Curve(name, "", xs, vals, trains, recorded, _probed(probes, batch, probed))


def warmup_cosine(step: int, steps: int, warmup: float = 0.05, floor: float = 0.1) -> float:
    """The learning-rate factor at ``step`` (1-based) of ``steps``: linear warmup, cosine decay to floor."""
    warm = max(int(warmup * steps), 1)
    if step <= warm:
        return step / warm
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))


def gpt_run(
    name: str,
    seed: int,
    corpus_bytes: int,
    steps: int,
    val_every: int,
    lr: float = 1e-3,
    stats: bool = False,
    probes: bool = False,
    cosine: bool = False,
    weight_decay: float = 0.0,
) -> Curve:
    """A tiny byte-level GPT (examples/char_gpt.py) on the first ``corpus_bytes`` of the stdlib corpus. The
    probes see the 64 validation windows as char_gpt's val_dataloader serves them, in batches of 16 (the
    training batch size): PROBE_BATCHES of them are the whole validation set. ``cosine``: the usual LLM
    schedule instead of a constant rate (linear warmup over 5% of the steps, then cosine decay to 10%)."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "examples"))
    from char_gpt import CharGPT, load_stdlib_corpus

    torch.manual_seed(seed)
    block = 64
    data = load_stdlib_corpus(corpus_bytes + 200_000)
    train_data, val_data = data[:corpus_bytes], data[-200_000:]
    model = CharGPT(block_size=block, n_layer=2, n_head=2, n_embd=64, lr=lr, weight_decay=weight_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda done: warmup_cosine(done + 1, steps) if cosine else 1.0
    )
    gen = torch.Generator().manual_seed(seed)

    def windows(source, n: int, gen):
        offsets = torch.randint(0, len(source) - block - 1, (n,), generator=gen)
        chunks = torch.stack([source[o : o + block + 1].long() for o in offsets.tolist()])
        return chunks[:, :-1], chunks[:, 1:]

    val_x, val_y = windows(val_data, 64, torch.Generator().manual_seed(99))
    xs, vals, trains, window = [], [], [], []
    signals, noises, stats_gen = [], [], torch.Generator().manual_seed(7000 + seed)
    probed: list[dict] = []
    probe_batches = [
        (val_x[i * 16 : (i + 1) * 16], val_y[i * 16 : (i + 1) * 16]) for i in range(PROBE_BATCHES)
    ]

    def loss_on(inputs, targets):
        return F.cross_entropy(model(inputs).reshape(-1, 256), targets.reshape(-1))

    for step in range(1, steps + 1):
        xb, yb = windows(train_data, 16, gen)
        logits = model(xb)
        loss = F.cross_entropy(logits.reshape(-1, 256), yb.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        window.append(loss.item())
        if step % val_every == 0:
            model.eval()
            with torch.no_grad():
                logits = model(val_x)
                vals.append(F.cross_entropy(logits.reshape(-1, 256), val_y.reshape(-1)).item())
            model.train()
            xs.append(float(step))
            trains.append(float(np.mean(window)))
            window = []
            if stats:
                batches = [windows(train_data, 16, stats_gen) for _ in range(STAT_BATCHES)]
                signal, noise = grad_stats(model, loss_on, batches)
                signals.append(signal)
                noises.append(noise)
            if probes:
                probed.append(probe_losses(model, loss_on, probe_batches))
    # A sample is one window of `block` tokens; N counts the distinct windows of the training text.
    constants = {"lr": lr, "batch": 16, "n_train": corpus_bytes - block - 1, "tokens_per_sample": block}
    recorded = {"signal": signals, "noise": noises, **constants} if stats else None
    return Curve(name, "", xs, vals, trains, recorded, _probed(probes, 16, probed))


SCENARIOS = {
    # U-shaped: few samples, many epochs; label noise memorised; a tiny GPT memorising 32 KB of text.
    "small-data": lambda seed, **kw: mlp_run(
        "small-data", seed, n_train=512, lr=2e-4, steps=2400, val_every=30, **kw
    ),
    "label-noise": lambda seed, **kw: mlp_run(
        "label-noise", seed, n_train=2000, flip=0.3, lr=2e-4, steps=4000, val_every=50, **kw
    ),
    "char-overfit": lambda seed, **kw: gpt_run(
        "char-overfit", seed, corpus_bytes=32_000, steps=1800, val_every=30, **kw
    ),
    # Improving: fresh samples every step; the same with a 100-sample validation set and batches of 8 (noisy,
    # nearly flat after a while); a tiny GPT on 1 MB of text.
    "fresh-data": lambda seed, **kw: mlp_run(
        "fresh-data", seed, n_train=None, lr=3e-4, steps=3000, val_every=50, **kw
    ),
    "fresh-noisy": lambda seed, **kw: mlp_run(
        "fresh-noisy", seed, n_train=None, batch=8, lr=5e-4, n_val=100, steps=3000, val_every=50, **kw
    ),
    "char-improving": lambda seed, **kw: gpt_run(
        "char-improving", seed, corpus_bytes=1_000_000, steps=1500, val_every=50, **kw
    ),
    # Added after every default was fixed (pristine): the two GPT runs above with the usual LLM schedule
    # (warmup, cosine decay to 10%) and weight decay 0.1.
    "char-cosine": lambda seed, **kw: gpt_run(
        "char-cosine",
        seed,
        corpus_bytes=32_000,
        steps=1800,
        val_every=30,
        cosine=True,
        weight_decay=0.1,
        **kw,
    ),
    "char-cosine-improving": lambda seed, **kw: gpt_run(
        "char-cosine-improving",
        seed,
        corpus_bytes=1_000_000,
        steps=1500,
        val_every=50,
        cosine=True,
        weight_decay=0.1,
        **kw,
    ),
}
PRISTINE = ("char-cosine", "char-cosine-improving")  # scenarios recorded after every default was fixed
SEEDS = (0, 1, 2)  # defaults chosen on seed 0 only


def label(curve: Curve) -> str:
    """U when the validation minimum lies before the last three points and their mean has risen above it
    by more than three times the step-to-step noise (median absolute difference of consecutive losses)."""
    val = np.asarray(curve.val)
    best = int(np.argmin(val))
    noise = float(np.median(np.abs(np.diff(val)))) + 1e-12
    rise = float(val[-3:].mean() - val[best])
    return "U" if best < len(val) - 3 and rise > 3 * noise else "improving"


def record(cached: list[Curve] | None = None) -> list[Curve]:
    """Record every scenario and seed not in ``cached``; cache them all."""
    import torch

    torch.set_num_threads(1)
    curves = list(cached or [])
    have = {c.name for c in curves}
    for name, run in SCENARIOS.items():
        for seed in SEEDS:
            if f"{name}/{seed}" in have:
                continue
            start = time.perf_counter()
            curve = run(seed, probes=True)
            curve.name = f"{name}/{seed}"
            curve.kind = label(curve)
            curves.append(curve)
            print(
                f"recorded {curve.name}: {len(curve.x)} validations, {curve.kind}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    order = {f"{name}/{seed}": i for i, (name, seed) in enumerate((n, s) for n in SCENARIOS for s in SEEDS)}
    curves.sort(key=lambda c: order[c.name])
    CACHE.write_text(json.dumps([c.as_dict() for c in curves]))
    return curves


def record_stats(curves: list[Curve]) -> list[Curve]:
    """Rerun every recorded scenario with the gradient statistics measured at each validation (about 10%
    more time) and cache them with the curves; the losses must come out exactly as recorded before."""
    import torch

    torch.set_num_threads(1)
    for curve in curves:
        if curve.stats is not None:
            continue
        name, seed = curve.name.split("/")
        start = time.perf_counter()
        again = SCENARIOS[name](int(seed), stats=True)
        if again.val != curve.val or again.train != curve.train:
            raise RuntimeError(f"{curve.name}: the losses differ from the recorded ones; not caching")
        curve.stats = again.stats
        CACHE.write_text(json.dumps([c.as_dict() for c in curves]))
        print(f"gradient statistics of {curve.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return curves


def record_probes(curves: list[Curve]) -> list[Curve]:
    """Rerun every recorded scenario without probe curves, with the probes measured at each validation, and
    cache them with the curves; the clean losses must come out exactly as recorded before."""
    import torch

    torch.set_num_threads(1)
    began, missing = time.perf_counter(), [c for c in curves if c.probes is None]
    for curve in missing:
        name, seed = curve.name.split("/")
        start = time.perf_counter()
        again = SCENARIOS[name](int(seed), probes=True)
        if again.val != curve.val or again.train != curve.train:
            raise RuntimeError(f"{curve.name}: the losses differ from the recorded ones; not caching")
        curve.probes = again.probes
        CACHE.write_text(json.dumps([c.as_dict() for c in curves]))
        print(
            f"probes of {curve.name} (clean curves identical): {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    if missing:
        print(f"probes recorded in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return curves


def pythia_curves() -> list[Curve]:
    runs: dict[str, tuple[list, list]] = {}
    with open(PYTHIA) as handle:
        for row in csv.DictReader(handle):
            step = float(row["D"]) / 2_097_152
            if step >= PYTHIA_FIRST_STEP:
                runs.setdefault(row["model"], ([], []))
                runs[row["model"]][0].append(step)
                runs[row["model"]][1].append(float(row["loss"]))
    curves = [
        Curve(f"pythia/{m.removeprefix('pythia-').removesuffix('-deduped')}", "", x, v, None)
        for m, (x, v) in runs.items()
    ]
    for curve in curves:
        curve.kind = label(curve)
    return curves


def load_curves(force: bool = False) -> list[Curve]:
    """The cached curves, recording whatever scenario and seed is missing (everything with ``force``)."""
    cached = (
        [] if force or not CACHE.exists() else [Curve(**entry) for entry in json.loads(CACHE.read_text())]
    )
    if len(cached) < len(SCENARIOS) * len(SEEDS):
        return record(cached)
    return cached


# ----------------------------------------------------------------------------------------------------------
# Replaying the curves through the forecaster and the baselines


@dataclass
class Outcome:
    warning: float | None  # x of the first warning (None: never)
    stop: float | None  # x of the stop (None: ran to the end)


def run_forecaster(curve: Curve, **options) -> Outcome:
    from snrmon.forecast import BasinForecaster

    forecaster = BasinForecaster(**options)
    warning = None
    for x, val, train in zip(curve.x, curve.val, curve.train or [None] * len(curve.x), strict=True):
        forecast = forecaster.update(x, val, train)
        if forecast.warning and warning is None:
            warning = x
        if forecast.stop:
            return Outcome(warning if warning is not None else x, x)
    return Outcome(warning, None)


def run_patience(curve: Curve, patience: int) -> Outcome:
    """Lightning's EarlyStopping (mode min, min_delta 0): stop after ``patience`` validations without a new
    best."""
    best, waited = math.inf, 0
    for x, val in zip(curve.x, curve.val, strict=True):
        if val < best:
            best, waited = val, 0
        else:
            waited += 1
            if waited >= patience:
                return Outcome(x, x)
    return Outcome(None, None)


def run_power(curve: Curve, min_points: int = 10, run_length: int = 3) -> Outcome:
    """The monotone baseline: fit L = E + B/x^β to the curve so far; stop when its last ``run_length``
    points all lie above the fit by more than two robust standard deviations of the residuals."""
    from snrmon.laws import PowerLaw
    from snrmon.laws.fitting import FitError, fit_law

    law, theta = PowerLaw(), None
    x, val = np.asarray(curve.x), np.asarray(curve.val)
    for n in range(min_points, len(x) + 1):
        columns = {"D": x[:n] / x[0]}
        try:
            fit = fit_law(law, columns, val[:n], starts=16 if theta is None else 0, refine=2, theta0=theta)
        except FitError:
            continue
        theta = fit.theta
        residuals = np.log(val[:n]) - law.log_loss(theta, columns)
        sigma = 1.4826 * np.median(np.abs(residuals - np.median(residuals))) + 1e-12
        if np.all(residuals[-run_length:] > 2 * sigma):
            return Outcome(x[n - 1], x[n - 1])
    return Outcome(None, None)


METHODS = {
    "forecaster": lambda curve: run_forecaster(curve),
    "law (T9 only)": lambda curve: run_forecaster(curve, method="law"),
    "power law": run_power,
    "patience 3": lambda curve: run_patience(curve, 3),
    "patience 5": lambda curve: run_patience(curve, 5),
}


# ----------------------------------------------------------------------------------------------------------
# The capacity term (T6) from the recorded gradient statistics: candidate mappings, judged by the forecast
# (docs/theory.md, "The capacity term"; docs/forecast.md, "The capacity term, measured")


def capacity_series(curve: Curve, smooth: int = 1) -> dict[str, np.ndarray]:
    """At each validation, the two candidate capacities of snrmon.forecast.capacity: ``"cumulative"``,
    log2(1 + Σ η|G|² / Σ η² tr(Σ)/B), and ``"dataset"``, log2(1 + N|G|²/tr(Σ)) (NaN with fresh samples).
    ``smooth``: |G|² and tr Σ averaged over the last this many measurements (the monitor smooths with an EMA
    of the steps; here each validation has 8 micro-batches of its own)."""
    from snrmon.forecast.capacity import CapacityMeter

    stats = curve.stats
    meter = CapacityMeter(stats["n_train"])
    cumulative, dataset, previous = [], [], 0.0
    signals, noises = np.asarray(stats["signal"]), np.asarray(stats["noise"])
    for i, x in enumerate(curve.x):
        first = max(i + 1 - smooth, 0)
        signal, noise = signals[first : i + 1].mean(), noises[first : i + 1].mean()
        terms = meter.update(x - previous, signal, noise, stats["lr"], stats["batch"])
        previous = x
        cumulative.append(terms.capacity if terms else math.nan)
        dataset.append(terms.dataset_capacity if terms else math.nan)
    return {"cumulative": np.asarray(cumulative), "dataset": np.asarray(dataset)}


def _capacity_forecaster(series: np.ndarray, signal: str, combine: str, **options):
    """The forecaster behind BasinEarlyStopping with a capacity candidate's draws of D* in place of its
    ratio draws (``combine="replace"``), or joined to them: the earlier (``"either"``) or the later
    (``"both"``) of the two draws. Everything else (evidence, the rise rule, the decisions) is unchanged.

    ``signal="peak"``: the basin is where the capacity peaks (T8: L = 1/(A·C) is lowest where C is highest),
    the zero crossing of the trend of its local slope against log x. ``signal="one-bit"``: where it falls
    to one bit (dataset SNR 1, the signal beyond chance gone), the zero crossing of the trend of C − 1."""
    from snrmon.forecast import BasinForecaster
    from snrmon.forecast.curve import slope as _slope
    from snrmon.forecast.ratio import zero_crossing_draws as _zero_crossing_draws

    class CapacityCandidate(BasinForecaster):
        def _capacity_draws(self, x: np.ndarray, rng) -> np.ndarray:
            w = self.window
            c = series[: len(x)]
            if signal == "peak":
                u = np.log(x[w - 1 :])
                ends = range(w, len(x) + 1)
                values = np.array([_slope(np.log(x[e - w : e]), c[e - w : e])[0] for e in ends])
            else:
                u, values = np.log(x), c - 1.0
            keep = np.isfinite(values)
            u, values = u[keep][-w:], values[keep][-w:]
            if len(values) < 3:
                return np.full(100, np.inf)  # no finite training set (fresh samples): no basin from it
            return _zero_crossing_draws(u, values, rng)

        def _ratio_draws(self, x, loss, train, rng):
            capacity = self._capacity_draws(x, rng)
            if combine == "replace":
                return capacity
            ratio = super()._ratio_draws(x, loss, train, rng)
            if ratio is None:
                return None
            capacity = rng.choice(capacity, size=len(ratio))  # pair the draws at random
            return np.minimum(ratio, capacity) if combine == "either" else np.maximum(ratio, capacity)

    return CapacityCandidate(**options)


CAPACITY_CANDIDATES = {
    f"{name} {signal} ({combine})": (name, signal, combine)
    for name, signal in (("cumulative", "peak"), ("dataset", "peak"), ("dataset", "one-bit"))
    for combine in ("replace", "either", "both")
}


def run_capacity(curve: Curve, name: str, signal: str, combine: str, smooth: int = 1) -> Outcome:
    series = capacity_series(curve, smooth)[name]
    forecaster = _capacity_forecaster(series, signal, combine)
    warning = None
    for x, val, train in zip(curve.x, curve.val, curve.train, strict=True):
        forecast = forecaster.update(x, val, train)
        if forecast.warning and warning is None:
            warning = x
        if forecast.stop:
            return Outcome(warning if warning is not None else x, x)
    return Outcome(warning, None)


def capacity_methods(smooth: int = 1) -> dict:
    methods = {"forecaster": METHODS["forecaster"]}
    for label_, args in CAPACITY_CANDIDATES.items():
        methods[label_] = lambda curve, args=args: run_capacity(curve, *args, smooth=smooth)
    return methods


# ----------------------------------------------------------------------------------------------------------
# Perturbation probes as the forecaster's curve (docs/forecast.md, "Perturbation probes")

#: The recorded probe curves, and the control: the same validation batches, unperturbed.
PROBE_LABELS = {"gaussian_10db": "10 dB noise", "int4": "4-bit", "clean": "clean, probe batches"}


def probe_curve(curve: Curve, signal: str) -> Curve:
    """``curve`` with the probe curve ``signal`` in place of the validation loss (the training loss as
    recorded): what BasinEarlyStopping(monitor=probe.metric) sees."""
    return Curve(curve.name, curve.kind, curve.x, list(curve.probes[signal]), curve.train)


def probe_methods() -> dict:
    """The forecaster with its defaults (run_forecaster) watching the validation loss, then each probe
    curve. evaluate() judges every stop by the clean validation loss."""
    methods = {"val_loss": METHODS["forecaster"]}
    for signal, name in PROBE_LABELS.items():
        methods[name] = lambda curve, signal=signal: run_forecaster(probe_curve(curve, signal))
    return methods


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


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _cell(r: Row) -> str:
    stop = (
        f"stop {_x(r.stop)} ({100 * r.loss_gap:+.1f}%, {r.past_min:+d})" if r.stop is not None else "no stop"
    )
    return f"warn {_x(r.warning)}, {stop}"


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
    args = parser.parse_args()
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
        for r in rows:
            print(
                f"{r.curve:22s} {r.kind:9s} min@{r.x_min:<8.4g} {r.method:14s} warn {_x(r.warning):>8s} "
                f"stop {_x(r.stop):>8s} gap {100 * r.loss_gap:+6.2f}% past {r.past_min:+d}"
            )
        for method, s in summary(rows).items():
            print(method, json.dumps(s))
    print(f"replayed {len(curves)} curves in {time.perf_counter() - began:.0f} s", file=sys.stderr)
