"""How many samples a training batch holds: the B of signal, noise and SNR.

The training loss of a batch is a mean over some count of samples; the estimator needs that count for each
microbatch. ``count_samples`` is the default guess (the batch's leading dimension); a user's ``batch_size_fn``
says it for losses that are means over something else (non-padding tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor


def count_samples(batch: Any) -> int:
    """The default ``batch_size_fn``: the leading dimension of the batch's first tensor that has one (0-dim
    tensors, such as a per-batch scalar, are skipped)."""
    # The usual batch (a tensor, or a tuple, list or dict starting with one) without the generic tree walk:
    # this runs once per microbatch.
    first = batch
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
    elif isinstance(batch, dict) and batch:
        first = next(iter(batch.values()))
    if isinstance(first, Tensor) and first.ndim:
        return len(first)
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(len(t)) if t.ndim else None)
    if not sizes:
        raise ValueError(f"the batch ({type(batch).__name__}) holds no tensor with a leading dimension")
    return sizes[0]


def samples_in(batch: Any, batch_size_fn: Callable[[Any], int | float | Tensor]) -> int | float | Tensor:
    """``batch_size_fn(batch)``, with a failure named as a failure to count (the monitor's message)."""
    try:
        return batch_size_fn(batch)
    except Exception as error:
        raise ValueError(
            f"could not count the samples of a training batch ({error}); pass"
            " `SNRMonitor(batch_size_fn=...)` returning what the training loss is a mean over"
        ) from error


def warn_if_leading_dimensions_differ(batch: Any, size: int) -> None:
    """Say so if the batch's tensors disagree on their leading dimension (e.g. a list of per-sample tensors
    beside a target), since ``count_samples`` may then be wrong."""
    leading: set[int] = set()
    apply_to_collection(batch, Tensor, lambda t: leading.add(len(t)) if t.ndim else None)
    if len(leading) > 1:
        rank_zero_warn(
            f"SNRMonitor: the batch's tensors have leading dimensions {sorted(leading)}; it counts {size}"
            " samples (the first tensor's). If the loss is a mean over another count, pass"
            " `SNRMonitor(batch_size_fn=...)`."
        )
