"""How a training loader draws its samples: from a finite training set without replacement, or not.

The microbatches of one optimizer step drawn *without replacement* from a training set of N samples are
disjoint, not independent, and T2 then estimates |G|² − S²/N instead of |G|² (finite-population correction,
``docs/theory.md``). This module reads the one number the correction needs, N, off a ``DataLoader``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
)


@dataclass(frozen=True)
class Population:
    """What the microbatches of a step are drawn from.

    Attributes:
        size: N, the number of samples drawn from without replacement; ``None`` when draws are independent
            (with replacement, or a stream) or when it cannot be told.
        description: one sentence for the user saying which case this is and why.
    """

    size: int | None
    description: str


def check_dataset_size(dataset_size: object) -> None:
    """The training set's size N, as given by a user: a whole number > 1, ``math.inf`` (draws with
    replacement) or None (unknown). Raises TypeError or ValueError naming the value otherwise."""
    numeric = isinstance(dataset_size, numbers.Real) and not isinstance(dataset_size, bool)
    if dataset_size is not None and not numeric:
        raise TypeError(f"dataset_size must be a number (or None), got {dataset_size!r}")
    whole = dataset_size is None or dataset_size == math.inf or float(dataset_size).is_integer()
    if not whole or (dataset_size is not None and not dataset_size > 1):
        raise ValueError(f"dataset_size must be a whole number > 1, math.inf or None: {dataset_size!r}")


def training_population(loader: object, world_size: int = 1, batches_read: float | None = None) -> Population:
    """The population a training ``DataLoader`` samples from (``None`` size: no correction applies).

    With several processes the loaders' draws are disjoint across ranks only through a ``DistributedSampler``
    over one dataset; ranks with loaders of their own are not known to share one population.

    ``batches_read``: how many of the loader's batches an epoch reads, when not all (Lightning's
    ``limit_train_batches`` and ``overfit_batches``). A loader that reads in order then reads the same first
    batches every epoch: those samples are the population, not the whole data set.
    """
    population = _population(loader)
    if population.size is None:
        return population
    population = _first_batches_only(population, loader, world_size, batches_read)
    if population.size < 2:
        return Population(None, f"{population.description}, but of {population.size} sample")
    if world_size > 1 and not isinstance(getattr(loader, "sampler", None), DistributedSampler):
        return Population(
            None, f"{population.description}, but each of the {world_size} ranks has a loader of its own"
        )
    return population


def _first_batches_only(
    population: Population, loader: DataLoader, world_size: int, batches_read: float | None
) -> Population:
    """The population of a loader that reads in order, cut to the batches an epoch reads."""
    if batches_read is None or not math.isfinite(batches_read) or batches_read >= len(loader):
        return population
    sampler = loader.batch_sampler.sampler
    in_order = isinstance(sampler, SequentialSampler) or (
        type(sampler) is DistributedSampler and not sampler.shuffle
    )
    if not in_order:
        return population  # (a shuffled subset each epoch: the draws still come from the whole set)
    ranks = world_size if isinstance(sampler, DistributedSampler) else 1
    size = min(population.size, int(batches_read) * loader.batch_sampler.batch_size * ranks)
    return Population(
        size, f"{population.description}, and each epoch reads only its first {int(batches_read)} batches"
    )


def _population(loader: object) -> Population:
    if not isinstance(loader, DataLoader):
        return Population(None, f"cannot tell how a {type(loader).__name__} draws samples")
    if isinstance(loader.dataset, IterableDataset):
        return Population(None, "an iterable dataset streams its samples: no finite training set")
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:
        # batch_size=None: each item the sampler picks is a whole batch, of a number of samples only the
        # dataset knows; N in samples cannot be read off the loader.
        return Population(None, "the dataset yields whole batches (batch_size=None): N in samples is unknown")
    if type(batch_sampler) is not BatchSampler:
        return Population(None, f"cannot tell how the batch sampler {type(batch_sampler).__name__} draws")
    sampler = batch_sampler.sampler
    name = type(sampler).__name__
    if isinstance(sampler, RandomSampler):
        if sampler.replacement:
            return Population(None, "RandomSampler draws with replacement: independent samples")
        return Population(len(loader.dataset), "RandomSampler shuffles without replacement")
    if isinstance(sampler, SubsetRandomSampler):
        return Population(len(sampler.indices), "SubsetRandomSampler shuffles its subset without replacement")
    if type(sampler) is DistributedSampler:  # not Lightning's wrapper around some other sampler
        return Population(len(loader.dataset), "DistributedSampler gives each rank a disjoint shard")
    if isinstance(sampler, SequentialSampler):
        return Population(len(loader.dataset), "SequentialSampler reads the data set in order, no repeats")
    return Population(None, f"cannot tell how the sampler {name} draws")
