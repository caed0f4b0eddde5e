"""SNRMonitor under FSDP2 (``fully_shard``) on CPU: Lightning's ``ModelParallelStrategy`` with 2 gloo ranks.

Runs ``tests/fsdp_script.py`` in a subprocess, on least squares at lr = 0 with w split over two sharded
layers (rank 1 holds empty shards), against the closed-form truth per group (see the script's docstring).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_ddp import DELTA_SQ, DIM, SIGMA, run_distributed

SCRIPT = Path(__file__).with_name("fsdp_script.py")
STEPS, ACCUMULATE = 200, 2


def closed_form() -> dict[str, float]:
    """Signal and noise of the total and of the two halves a, b of w (|Δ_a|² = 2|Δ_b|²)."""
    half = DIM // 2
    truth = {"snr/signal": 4 * DELTA_SQ, "snr/noise": 4 * ((DIM + 1) * DELTA_SQ + DIM * SIGMA**2)}
    for group, part in (("net.a", 2 / 3), ("net.b", 1 / 3)):
        truth[f"snr/{group}/signal"] = 4 * part * DELTA_SQ
        truth[f"snr/{group}/noise"] = 4 * (half * DELTA_SQ + part * DELTA_SQ + half * SIGMA**2)
    return truth


@pytest.mark.ddp
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_parameters"])
def test_fsdp2_matches_closed_form_per_group_on_every_rank(tmp_path: Path, bf16: bool):
    extra = ["--steps", str(STEPS)] + (["--bf16"] if bf16 else [])
    ranks = run_distributed(SCRIPT, tmp_path, ACCUMULATE, *extra)

    assert all(not r["disabled"] and not r["warnings"] and r["global_step"] == STEPS for r in ranks)
    latest = ranks[0]["latest"]
    assert ranks[1]["latest"] == latest  # one all-reduce: every rank computes the same values
    assert latest["snr/batch_size"] == 2 * 8 * ACCUMULATE
    for key, value in closed_form().items():
        se = latest[f"{key}_se"]
        assert 0 < se < 0.15 * value and abs(latest[key] - value) < 4 * se, (key, latest[key], se, value)

    for rank in ranks:
        # A hook per parameter and microbatch, on the unsharded parameters (the sharded ones never fire).
        assert rank["hook_calls"] == STEPS * ACCUMULATE * 2
        assert rank["updates"] == STEPS
        # Each microbatch's local gradient, as the hooks read it, against an unsharded reference; and the
        # applied gradient (shards summed over ranks) against the norm of the mean of the ranks' gradients.
        tolerance = 2e-2 if bf16 else 1e-5
        for read, reference in rank["small"] + rank["applied"]:
            assert read == pytest.approx(reference, rel=tolerance), (read, reference)
        assert len(rank["small"]) == 3 * ACCUMULATE and len(rank["applied"]) == 3


@pytest.mark.ddp
def test_fsdp2_monitor_failure_on_one_rank_neither_hangs_nor_diverges(tmp_path: Path):
    """As under DDP: the failing rank disables itself but keeps joining each measured step's all-reduce (whose
    vector also carries the applied gradient's shards here), so both ranks skip the same steps."""
    steps, fail_from = 12, 4
    extra = ["--steps", str(steps), "--fail-rank1-from-step", str(fail_from)]
    ranks = run_distributed(SCRIPT, tmp_path, ACCUMULATE, *extra)
    assert [r["global_step"] for r in ranks] == [steps, steps]
    assert [r["disabled"] for r in ranks] == [False, True]
    assert ranks[0]["updates"] == ranks[1]["updates"] == fail_from
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == steps - fail_from


@pytest.mark.ddp
def test_fsdp2_resume_continues_the_estimates(tmp_path: Path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    first.mkdir(), resumed.mkdir()
    run_distributed(SCRIPT, first, ACCUMULATE, "--steps", "6", "--checkpoint-dir", str(tmp_path / "ckpt"))
    (checkpoint,) = (tmp_path / "ckpt").iterdir()
    ranks = run_distributed(SCRIPT, resumed, ACCUMULATE, "--steps", "12", "--resume", str(checkpoint))
    assert all(not r["warnings"] and r["updates"] == 12 for r in ranks)  # 6 restored, 6 new
