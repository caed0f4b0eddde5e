"""N, the training set the microbatches of a step are drawn from, as the monitor takes it.

Given as ``dataset_size``, read off the training dataloader, or unknown (independent draws, no
finite-training-set correction); one info line tells the user which case the run is in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from snrmon.callbacks._batch_size import count_samples
from snrmon.measure.sampling import Population, training_population


def run_population(
    trainer: Trainer, dataset_size: float | None, batch_size_fn: Callable[[Any], Any]
) -> Population:
    """The population of this run's training batches: ``dataset_size`` if given, else the dataloader's."""
    if dataset_size is not None:
        size = None if dataset_size == math.inf else int(dataset_size)
        return Population(size, f"dataset_size={dataset_size} was given")
    # (Lightning's `limit_train_batches` and `overfit_batches` cut the epoch to `num_training_batches`.)
    population = training_population(
        trainer.train_dataloader, trainer.world_size, batches_read=trainer.num_training_batches
    )
    if population.size is not None and batch_size_fn is not count_samples:
        # N counts the dataset's items; a batch_size_fn may count tokens or other units.
        population = Population(
            None,
            f"{population.description}, N = {population.size} items, but `batch_size_fn` counts"
            " samples in its own unit (tokens?), in which N is unknown",
        )
    return population


def announce(population: Population) -> None:
    """Say which case the run is in, and what it means for ``signal``."""
    if population.size is None:
        rank_zero_info(
            f"SNRMonitor: {population.description}, so the microbatches of a step are taken as"
            " independent draws: no finite-training-set correction. Pass `dataset_size=N` if they are"
            " disjoint draws from N samples (in the unit `batch_size_fn` counts)."
        )
    else:
        rank_zero_info(
            f"SNRMonitor: {population.description}: the microbatches of a step are disjoint draws"
            f" from a training set of N = {population.size} samples: `signal` is the training-set"
            " |G|² (finite-population corrected), with `signal_beyond_chance` and `dataset_snr`."
        )
