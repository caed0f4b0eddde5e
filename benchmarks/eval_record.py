"""Recording the real runs of the forecast evaluation (forecast_eval.py) and loading them.

The small CPU training runs (an MLP on a teacher's labels, a tiny byte-level GPT) of every scenario and
seed, with the gradient statistics and perturbation probes measured at each validation where asked; the
cache of their curves (forecast_curves.json); the shipped Pythia LAMBADA curves; and label(), which
decides from a recorded curve whether its validation loss turns up.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "forecast_curves.json"
PYTHIA = ROOT / "data" / "pythia_deduped_lambada_loss.csv"
PYTHIA_FIRST_STEP = 3000  # earlier checkpoints are chaotic (data/README.md)


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
# The corpus of real curves (benchmarks/corpus.py): replayed over a prefix, judged by the whole curve

CORPUS = ROOT / "benchmarks" / "corpus_curves.json"
TARGET_MIN_INDEX = 14  # a U-run is a target when its minimum is at the 15th validation or later


@dataclass
class CorpusCurve(Curve):
    """A corpus curve cut to its first ``replay_validations`` validations (x, val, train and the recorded
    series alike). ``kind`` is the verdict *in that window*: U when the whole curve is U (label()) and its
    minimum ``min_index`` lies inside the window, else improving; ``full_kind`` is label() of the whole curve.
    Series as corpus.py records them: ``lr_sum`` Ση up to each validation, ``grad_dot`` g_val·g_train,
    ``step_dot`` g_val·Δθ, ``full_dot`` g_val·ḡ_train (the whole training set's gradient), ``pre_dot``
    the same through Adam's preconditioner, ``avg_dot`` g_val·(the interval's mean training gradient), with
    their standard errors, ``val_se`` the standard error of each validation loss over its examples. A series
    the cache does not have yet is None."""

    split: str = ""
    family: str = ""
    schedule: str = ""
    full_kind: str = ""
    min_index: int = 0
    lr_sum: list[float] | None = None
    grad_dot: list[float] | None = None
    grad_dot_se: list[float] | None = None
    step_dot: list[float] | None = None
    step_dot_se: list[float] | None = None
    full_dot: list[float] | None = None
    full_dot_se: list[float] | None = None
    pre_dot: list[float] | None = None
    pre_dot_se: list[float] | None = None
    avg_dot: list[float] | None = None
    avg_dot_se: list[float] | None = None
    train_signal: list[float] | None = None
    train_noise: list[float] | None = None
    train_examples: int = 0  # N, and the examples train_signal and train_noise read (corpus.sample_sizes)
    noise_sample: int = 0
    parameters: int = 0  # the model's trainable parameters (0: not in the cache)
    val_se: list[float] | None = None
    drift_first: list[float] | None = None  # corpus.Drift's terms (recorded with --drift, first 60 only)
    drift_curvature: list[float] | None = None
    drift_noise: list[float] | None = None

    @property
    def target(self) -> bool:
        """A U-run whose minimum comes late enough to be forecast (the others are counted apart)."""
        return self.kind == "U" and self.min_index >= TARGET_MIN_INDEX


SERIES = ("x", "val", "train", "lr_sum", "grad_dot", "grad_dot_se", "step_dot", "step_dot_se", "val_se")
# Recorded since the full-gradient leads were added (an older cache lacks them: None).
LATER_SERIES = (
    "full_dot",
    "full_dot_se",
    "pre_dot",
    "pre_dot_se",
    "avg_dot",
    "avg_dot_se",
    "train_signal",
    "train_noise",
    "drift_first",
    "drift_curvature",
    "drift_noise",
)


def corpus_window(entry: dict, length: int | None = None) -> CorpusCurve:
    """The first ``length`` validations (default: the entry's ``replay_validations``) of a recorded entry."""
    n = entry["replay_validations"] if length is None else length
    inside = entry["kind"] == "U" and entry["min_index"] < n
    return CorpusCurve(
        name=entry["name"],
        kind="U" if inside else "improving",
        split=entry["split"],
        family=entry["family"],
        schedule=entry["schedule"],
        full_kind=entry["kind"],
        min_index=entry["min_index"],
        train_examples=entry.get("train_examples", 0),
        noise_sample=entry.get("noise_sample", 0),
        parameters=entry.get("parameters", 0),
        **{key: list(entry[key][:n]) for key in SERIES},
        **{key: list(entry[key][:n]) for key in LATER_SERIES if key in entry},
    )


def load_corpus(split: str, length: int | None = None) -> list[CorpusCurve]:
    """The corpus curves of ``split`` ("tuning" or "held-out"), each cut to its replayed window (or to
    ``length`` validations); an empty list when none are recorded yet."""
    entries = json.loads(CORPUS.read_text()) if CORPUS.exists() else []
    return [corpus_window(e, length) for e in entries if e["split"] == split]
