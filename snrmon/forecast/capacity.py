"""The law's capacity term (T6) from measured gradient statistics (docs/theory.md, "The capacity term").

Framework-free. Fed the monitor's gradient signal |G|² and per-sample noise tr(Σ) at each measurement, with
the learning rate η and batch size B of the steps in between, :class:`CapacityMeter` accumulates

    signal_sum = Σ_t η_t |G_t|²              the first-order (expected) loss decrease of the steps so far
    noise_sum  = Σ_t η_t² tr(Σ_t) / B_t      the second-order term the batch noise adds (up to curvature)

and reports the measured SNR = signal_sum / noise_sum and capacity = log2(1 + SNR) (T6 at fixed N, where a·N^α
is a constant of the run). With a finite training set of N samples it also reports the dataset SNR N|G|²/tr(Σ)
and its capacity log2(1 + N|G|²/tr(Σ)), the candidate that counts only the signal beyond chance.

Each measurement stands for the steps since the previous one (a left-open rectangle rule: the statistics are
measured at the end of their interval, as the monitor's EMAs are).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class CapacityTerms:
    """One measurement's capacity and the terms it uses (logged as ``snr/capacity``, ``snr/capacity/*``)."""

    capacity: float  # log2(1 + snr), bits
    snr: float  # signal_sum / noise_sum
    signal_sum: float  # Σ η_t |G_t|² over the steps so far
    noise_sum: float  # Σ η_t² tr(Σ_t) / B_t over the steps so far
    steps: float  # optimizer steps accumulated
    tokens: float  # tokens D seen (the user's unit: samples × tokens_per_sample unless counted)
    dataset_snr: float = math.nan  # N |G|² / tr(Σ); NaN without a finite training set
    dataset_capacity: float = math.nan  # log2(1 + dataset_snr)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class CapacityMeter:
    """Accumulates the capacity term of the Shannon law from measured gradient statistics.

    Args:
        dataset_size: N, the number of training samples (None: fresh samples, no dataset SNR).
    """

    def __init__(self, dataset_size: float | None = None) -> None:
        if dataset_size is not None and not dataset_size > 1:
            raise ValueError(f"dataset_size must be > 1 (None: fresh samples), got {dataset_size}")
        self.dataset_size = dataset_size
        self.signal_sum = 0.0
        self.noise_sum = 0.0
        self.steps = 0.0
        self.tokens = 0.0

    def update(
        self,
        steps: float,
        signal: float,
        noise: float,
        lr: float,
        batch_size: float,
        tokens: float | None = None,
    ) -> CapacityTerms | None:
        """Add ``steps`` optimizer steps at learning rate ``lr`` and batch size ``batch_size`` (samples per
        step, across ranks and accumulation), measured at their end as ``signal`` |G|² and ``noise`` tr(Σ) per
        sample. ``tokens`` seen in those steps default to steps × batch_size. None when a value is not finite
        (the sums are left as they were)."""
        values = (steps, signal, noise, lr, batch_size)
        if not all(math.isfinite(v) for v in values) or steps < 0 or batch_size <= 0:
            return None
        # A measured |G|² can come out slightly negative (an unbiased estimate near zero): no signal.
        self.signal_sum += steps * lr * max(signal, 0.0)
        self.noise_sum += steps * lr**2 * max(noise, 0.0) / batch_size
        self.steps += steps
        self.tokens += steps * batch_size if tokens is None else tokens
        snr = self.signal_sum / self.noise_sum if self.noise_sum > 0 else math.inf
        sums = (self.signal_sum, self.noise_sum, self.steps, self.tokens)
        terms = CapacityTerms(math.log2(1 + snr), snr, *sums)
        if self.dataset_size is not None and noise > 0:
            terms.dataset_snr = self.dataset_size * max(signal, 0.0) / noise
            terms.dataset_capacity = math.log2(1 + terms.dataset_snr)
        return terms

    def state_dict(self) -> dict[str, float | None]:
        return {
            "dataset_size": self.dataset_size,
            "signal_sum": self.signal_sum,
            "noise_sum": self.noise_sum,
            "steps": self.steps,
            "tokens": self.tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
