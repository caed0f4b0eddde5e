"""SNRMonitor under real CPU DDP (gloo, 2 ranks), against the closed-form truth of least squares.

Runs ``tests/ddp_script.py`` in a subprocess (Lightning relaunches it for rank 1). At lr = 0 with fresh
Gaussian samples, the per-sample gradient g = 2(x·w − y)x has |G|² = 4|Δ|² and
tr Σ = 4((d + 1)|Δ|² + dσ²), Δ = w − w* (see the script's docstring).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_script.py")
WORLD_SIZE = 2
BATCH_SIZE, DIM, SIGMA, DELTA_SQ = 8, 8, 1.0, 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(script: Path, out: Path, accumulate: int, *extra: str) -> list[dict]:
    """Run ``script`` on 2 CPU ranks (Lightning relaunches it for rank 1); each rank's JSON result."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK"):
        env.pop(name, None)
    command = [
        sys.executable, str(script), "--out", str(out), "--accumulate", str(accumulate),
        "--batch-size", str(BATCH_SIZE), "--dim", str(DIM), "--sigma", str(SIGMA),
        "--delta-sq", str(DELTA_SQ), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def assert_closed_form(values: dict[str, float], global_batch: int, prefix: str = "") -> None:
    """Signal, noise, noise scale and SNR at ``global_batch`` within 4 of their reported standard errors of
    the closed forms of the script's least squares (module docstring)."""
    signal = 4 * DELTA_SQ
    noise = 4 * ((DIM + 1) * DELTA_SQ + DIM * SIGMA**2)
    scale = noise / signal
    truth = {"signal": signal, "noise": noise, "noise_scale": scale, "ratio": global_batch / scale}
    for key, value in truth.items():
        estimate, se = values[prefix + key], values[f"{prefix}{key}_se"]
        assert math.isfinite(estimate) and 0 < se < abs(value), (key, estimate, se)
        assert abs(estimate - value) < 4 * se, (key, estimate, value, se)


def run_ddp(out: Path, accumulate: int, *extra: str) -> list[dict]:
    return run_distributed(SCRIPT, out, accumulate, *extra)


@pytest.mark.ddp
@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_ranks_agree_and_match_closed_form(tmp_path: Path, accumulate: int):
    """accumulate=1: the ranks' local gradients are the only small gradients; 2: both sources."""
    ranks = run_ddp(tmp_path, accumulate)

    assert [r["global_rank"] for r in ranks] == list(range(WORLD_SIZE))
    assert all(r["world_size"] == WORLD_SIZE and not r["disabled"] and not r["warnings"] for r in ranks)
    latest = ranks[0]["latest"]
    assert latest, "nothing was logged"
    assert ranks[1]["latest"] == latest  # every rank computes the same, all-reduced estimates

    global_batch = WORLD_SIZE * BATCH_SIZE * accumulate
    assert latest["snr/batch_size"] == pytest.approx(global_batch, rel=1e-12)
    assert latest["snr/skipped_steps"] == 0

    assert_closed_form(latest, global_batch, prefix="snr/")


@pytest.mark.ddp
def test_ddp_monitor_failure_on_one_rank_neither_hangs_nor_diverges(tmp_path: Path):
    """Rank 1's monitor fails from step 5 on: it disables itself (and says so) but keeps joining the
    all-reduce of each measured step, so no rank waits forever and both count the same skipped steps."""
    steps, fail_from = 20, 5
    ranks = run_ddp(tmp_path, 2, "--steps", str(steps), "--fail-rank1-from-step", str(fail_from))

    assert [r["global_step"] for r in ranks] == [steps, steps]  # the run completed on both ranks
    assert [r["disabled"] for r in ranks] == [False, True]
    for name in ("updates", "skipped", "moments"):
        assert ranks[0][name] == ranks[1][name], name
    assert ranks[0]["updates"] == fail_from
    assert ranks[0]["skipped"] == steps - fail_from
    assert ranks[0]["latest"]["snr/skipped_steps"] == steps - fail_from
    assert math.isfinite(ranks[0]["latest"]["snr/signal"])
    # The failing rank says why (rank 0 only sees skipped steps).
    assert ranks[0]["warnings"] == []
    assert any("disabled itself" in message and "rank 1" in message for message in ranks[1]["warnings"])


@pytest.mark.ddp
def test_ddp_distributed_sampler_shards_a_finite_training_set(tmp_path: Path):
    """A shuffled map-style data set of N = 64 samples: Lightning gives each rank a disjoint shard, so the
    microbatches of a step, across ranks too, are disjoint draws. The signal must be the data set's exact |G|²
    (T2 alone is low by S²/N), the noise its S²."""
    n = 64  # two steps an epoch (global batch 32): the bias S²/N is several standard errors
    ranks = run_ddp(tmp_path, 2, "--finite", str(n), "--steps", "400")
    assert all(not r["disabled"] and not r["warnings"] for r in ranks)
    latest, truth = ranks[0]["latest"], ranks[0]["truth"]
    assert ranks[1]["latest"] == latest
    assert latest["snr/dataset_size"] == n
    for key in ("signal", "noise"):
        value, se = latest[f"snr/{key}"], latest[f"snr/{key}_se"]
        assert 0 < se < 0.1 * truth[key] and abs(value - truth[key]) < 4 * se, (key, value, se, truth)
    uncorrected = latest["snr/signal"] - latest["snr/noise"] / n
    assert abs(uncorrected - truth["signal"]) > 4 * latest["snr/signal_se"], "the band misses the bias"
