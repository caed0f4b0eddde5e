"""Which training loaders draw the microbatches of a step without replacement from a finite set (and N)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from snrmon.measure.sampling import training_population

DATA = TensorDataset(torch.arange(100.0))


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(10)


class OddBatches(BatchSampler):
    """A subclass: it may draw any way it likes, so nothing is assumed about it."""


@pytest.mark.parametrize(
    ("loader", "size"),
    [
        (DataLoader(DATA, batch_size=8, shuffle=True), 100),
        (DataLoader(DATA, batch_size=8), 100),  # in order: disjoint microbatches too
        (DataLoader(DATA, batch_size=8, sampler=SubsetRandomSampler(range(30))), 30),
        (DataLoader(DATA, batch_size=8, sampler=DistributedSampler(DATA, num_replicas=2, rank=1)), 100),
        (DataLoader(DATA, batch_size=None, sampler=RandomSampler(DATA)), None),  # items are whole batches
        (DataLoader(DATA, batch_size=8, sampler=RandomSampler(DATA, replacement=True)), None),
        (DataLoader(DATA, batch_size=8, sampler=WeightedRandomSampler([1.0] * 100, 50)), None),
        (DataLoader(Stream(), batch_size=2), None),
        (DataLoader(DATA, batch_sampler=OddBatches(SequentialSampler(DATA), 8, False)), None),
        ([1, 2, 3], None),
    ],
    ids=[
        "shuffled", "sequential", "subset", "distributed", "sampler_batches", "with_replacement", "weighted",
        "iterable", "custom_batch_sampler", "not_a_loader",
    ],
)  # fmt: skip
def test_population_size_and_reason(loader, size):
    population = training_population(loader)
    assert population.size == size
    assert population.description  # every case says which it is


@pytest.mark.parametrize(
    ("loader", "batches_read", "world_size", "size"),
    [
        (DataLoader(DATA, batch_size=8), 3, 1, 24),  # in order: the same first 3 batches every epoch
        (DataLoader(DATA, batch_size=8), 12.0, 1, 96),
        (DataLoader(DATA, batch_size=8), 13, 1, 100),  # every batch (the last one short)
        (DataLoader(DATA, batch_size=8), float("inf"), 1, 100),
        (DataLoader(DATA, batch_size=8, shuffle=True), 3, 1, 100),  # another subset each epoch
        (DataLoader(DATA, batch_size=8, sampler=DistributedSampler(DATA, 2, 0, shuffle=False)), 3, 2, 48),
        (DataLoader(DATA, batch_size=8, sampler=DistributedSampler(DATA, 2, 0, shuffle=True)), 3, 2, 100),
        (DataLoader(DATA, batch_sampler=BatchSampler(SequentialSampler(DATA), 8, False)), 2, 1, 16),
    ],
    ids=[
        "in_order", "in_order_float", "all", "unlimited", "shuffled", "distributed", "distributed_shuffled",
        "own_batch_sampler",  # (the loader's batch_size is None then)
    ],
)
def test_an_epoch_of_its_first_batches_draws_from_them(loader, batches_read, world_size, size):
    population = training_population(loader, world_size, batches_read=batches_read)
    assert population.size == size
    assert ("first" in population.description) == (size < 100)
