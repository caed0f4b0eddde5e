"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores: torch's
# default of a thread per core in every worker would oversubscribe them, and its threads then wait on each
# other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add overhead, and stall badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
