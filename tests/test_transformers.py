"""The Hugging Face Trainer callbacks through real ``Trainer.train()`` runs (CPU, seconds each).

* SNRMonitorCallback against the closed-form truth of least squares (the problem and its truth are those of
  ``test_ground_truth.py``): a model returning ``{"loss": ...}`` at lr = 0, gradient_accumulation_steps=4,
  with the Trainer's default clipping active, once with the mean loss (the Trainer's 1/K) and once token-
  weighted (``num_items_in_batch``, ragged microbatches);
* a tiny random GPT-2 (from a config, no download): the values in ``log_history`` and TensorBoard, tokens
  counted as the Trainer counts them;
* BasinEarlyStoppingCallback on the overfitting regression of ``test_basin_early_stopping.py``: it stops
  near the minimum of the evaluation loss, and its state survives a resume from a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_ddp import free_port
from test_ground_truth import DIM, NOISE_STD, least_squares_truth
from torch import nn
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install snrmon[hf]")
pytest.importorskip("accelerate", reason="the Hugging Face extra: pip install snrmon[hf]")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from snrmon.callbacks.transformers import (  # noqa: E402
    BasinEarlyStoppingCallback,
    SNRMonitorCallback,
    add_callbacks,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

Z = 4.0  # the band, in reported standard errors (as test_ground_truth.py and the DDP test)


def training_arguments(tmp_path: Path, **options) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return TrainingArguments(**(defaults | options))


def assert_matches_truth(latest: dict[str, float], truth: dict[str, float]) -> None:
    """|estimate − truth| < Z·se for signal and noise, with se < 0.1·truth so the band is tight."""
    for key in ("signal", "noise"):
        value, se, expected = latest[f"snr/{key}"], latest[f"snr/{key}_se"], truth[key]
        print(f"{key}: {value:.5g} ± {se:.3g}, truth {expected:.5g}, z = {(value - expected) / se:+.2f}")
        assert 0 < se < 0.1 * expected, f"{key}: se {se:.4g} vs truth {expected:.4g}"
        assert abs(value - expected) < Z * se, f"{key}: {value:.5g} ± {se:.3g}, truth {expected:.5g}"


# ---------------------------------------------------------------------- the closed-form truth


class GaussianSamples(Dataset):
    """y = x·w* + ε with x ~ N(0, I), ε ~ N(0, σ²), a fresh draw at every index (an infinite population).
    ``masked``: a quarter of the samples (at random) carry the label -100 and are left out of the loss."""

    def __init__(self, w_star: torch.Tensor, size: int, seed: int, masked: bool = False):
        self.w_star, self.size, self.seed, self.masked = w_star, size, seed, masked

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = torch.randn(DIM, generator=generator)
        label = x @ self.w_star + NOISE_STD * torch.randn((), generator=generator)
        if self.masked and torch.rand((), generator=generator) < 0.25:
            label = torch.tensor(-100.0)
        return {"x": x, "labels": label}


class LeastSquares(nn.Module):
    """Returns ``{"loss": mean squared residual}``: the Trainer divides it by the K microbatches."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (x @ self.weight - labels).square().mean()}


class TokenWeightedLeastSquares(LeastSquares):
    """Accepts the Trainer's loss kwargs: the loss is summed over the samples whose label is not -100 and
    divided by ``num_items_in_batch``, their count over the whole step, as a causal LM's loss over tokens."""

    def forward(self, x, labels, num_items_in_batch=None, **kwargs):
        kept = labels.ne(-100)
        squares = (x[kept] @ self.weight - labels[kept]).square()
        return {"loss": squares.sum() / num_items_in_batch}


@pytest.mark.parametrize("weighting", ["mean", "tokens"])
def test_least_squares_matches_closed_form(tmp_path, weighting):
    """300 steps of 4 microbatches of 32 at lr = 0; the applied gradient's norm exceeds max_grad_norm, so the
    Trainer clips every step: the estimates would be biased if the monitor read the clipped gradient."""
    generator = torch.Generator().manual_seed(4)
    w_star = torch.randn(DIM, generator=generator)
    delta = 0.4 * torch.randn(DIM, generator=generator)
    tokens = weighting == "tokens"
    model = (TokenWeightedLeastSquares if tokens else LeastSquares)(w_star + delta)
    steps, accumulate, batch = 300, 4, 32
    data = GaussianSamples(w_star, steps * accumulate * batch, seed=1, masked=tokens)
    monitor = SNRMonitorCallback(ema_decay=0.99)
    args = training_arguments(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        max_steps=steps,
        learning_rate=0.0,
        logging_steps=steps // 2,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[monitor])
    assert trainer.model_accepts_loss_kwargs == tokens
    trainer.train()
    assert torch.equal(model.weight.detach(), w_star + delta), "lr = 0 must keep the parameters fixed"

    logged = [entry for entry in trainer.state.log_history if "snr/noise" in entry]
    assert [entry["step"] for entry in logged] == [steps // 2, steps]
    latest = logged[-1]
    assert latest == {**latest, **monitor.latest} and latest["grad_norm"] > args.max_grad_norm  # clipped
    assert_matches_truth(latest, least_squares_truth(delta))
    assert latest["snr/skipped_steps"] == 0
    if tokens:  # the step's kept samples, about 3/4 of 128: B_eff = Σ b_k for weights b_k / Σ b_k
        assert 72 <= latest["snr/batch_size"] <= 120 and latest["snr/batch_size"] % 1 == 0
    else:
        assert latest["snr/batch_size"] == pytest.approx(accumulate * batch)


# ---------------------------------------------------------------------- a tiny GPT-2

VOCAB, CONTEXT = 48, 16


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config)


class Sequences(Dataset):
    """Random token sequences; the last ``padding`` labels of each are -100 (left out of the loss)."""

    def __init__(self, count: int, padding: int = 4, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(VOCAB, (count, CONTEXT), generator=generator)
        self.padding = padding

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        labels = self.tokens[index].clone()
        labels[CONTEXT - self.padding :] = -100
        return {"input_ids": self.tokens[index], "labels": labels}


def test_gpt2_values_reach_log_history_and_tensorboard(tmp_path):
    """Token-weighted (GPT-2 accepts the loss kwargs): the batch size is the step's predicted tokens (labels
    shifted by one: the tokens the loss sums over, whatever the Trainer's count); with add_callbacks the
    values reach TensorBoard through report_to."""
    from snrmon.logs.scalars import tensorboard_runs

    accumulate, batch, padding = 2, 4, 4
    args = training_arguments(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        max_steps=6,
        logging_steps=3,
        report_to="tensorboard",  # (into output_dir/runs)
    )
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Sequences(64, padding))
    monitor = SNRMonitorCallback(groups=2)
    add_callbacks(trainer, monitor)
    assert trainer.callback_handler.callbacks[0] is monitor
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # placed first: no warning that values miss TB
        trainer.train()
    logged = [entry for entry in trainer.state.log_history if "snr/noise" in entry]
    assert [entry["step"] for entry in logged] == [3, 6]
    for entry in logged:
        assert all(math.isfinite(entry[f"snr/{key}"]) for key in ("signal", "noise", "noise_scale", "ratio"))
        assert entry["snr/noise"] > 0 and "snr/transformer.h/noise" in entry
        # labels[..., 1:] that are not -100: CONTEXT - 1 - padding per sequence
        assert entry["snr/batch_size"] == accumulate * batch * (CONTEXT - 1 - padding)
    runs = tensorboard_runs(tmp_path / "runs")
    (run,) = runs
    assert {"train/snr/noise", "train/snr/signal", "train/loss"} <= run.tags, sorted(run.tags)
    assert run.values("train/snr/noise") == pytest.approx({e["step"]: e["snr/noise"] for e in logged})


def test_the_monitor_s_emas_go_on_after_a_resume(tmp_path):
    def train(monitor, max_steps, resume=None):
        args = training_arguments(
            tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=max_steps,
            logging_steps=2, save_strategy="steps", save_steps=4,
        )  # fmt: skip
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Sequences(64))
        add_callbacks(trainer, monitor)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    first = SNRMonitorCallback()
    train(first, max_steps=4)
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["SNRMonitorCallback"]["attributes"]["saved"]["estimator"]["updates"]
    resumed = SNRMonitorCallback()
    train(resumed, max_steps=8, resume=str(tmp_path / "checkpoint-4"))
    # Four measured steps before the checkpoint, four after: the EMAs went on, not started anew.
    assert resumed.saved["estimator"]["updates"] == pytest.approx(8)
    assert math.isfinite(resumed.latest["snr/noise"])


def test_a_monitor_not_placed_first_says_its_values_miss_the_integrations(tmp_path):
    args = training_arguments(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        logging_steps=2, report_to="tensorboard",
    )  # fmt: skip
    monitor = SNRMonitorCallback()
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Sequences(16), callbacks=[monitor])
    with pytest.warns(RuntimeWarning, match="add_callbacks"):
        trainer.train()
    assert "snr/noise" in trainer.state.log_history[-2]  # (the last entry is the run's summary)


def test_one_microbatch_per_step_is_refused_with_a_warning_not_a_crash(tmp_path):
    args = training_arguments(tmp_path, per_device_train_batch_size=4, max_steps=2, logging_steps=1)
    monitor = SNRMonitorCallback()
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Sequences(16), callbacks=[monitor])
    with pytest.warns(RuntimeWarning, match="gradient_accumulation_steps >= 2"):
        trainer.train()
    assert trainer.state.global_step == 2 and not any("snr/noise" in e for e in trainer.state.log_history)


def test_a_run_shorter_than_logging_steps_still_leaves_its_values_in_latest(tmp_path):
    # As the Lightning monitor computes at the end of fit: no training log came, the steps were measured.
    args = training_arguments(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3, logging_steps=50
    )
    monitor = SNRMonitorCallback()
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Sequences(32))
    add_callbacks(trainer, monitor)
    trainer.train()
    assert not any("snr/noise" in e for e in trainer.state.log_history)
    assert monitor.latest["snr/batch_size"] > 0 and math.isfinite(monitor.latest["snr/noise"])


# ---------------------------------------------------------------------- basin early stopping


class Regressor(nn.Module):
    """The overfitting regression of test_basin_early_stopping.py, as a model returning its loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


class Noisy(Dataset):
    """y = sin(2x₀) + x₁ + heavy noise: 64 training samples are memorised, the evaluation loss turns up."""

    def __init__(self, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(count, 8, generator=generator)
        noise = 0.5 * torch.randn(count, 1, generator=generator)
        self.y = torch.sin(2 * self.x[:, :1]) + self.x[:, 1:2] + noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


class NaNInEvaluation(Regressor):
    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = super().forward(x, labels)["loss"]
        return {"loss": loss if self.training else loss * math.nan}


def overfitting_run(
    tmp_path: Path, stopper, max_steps: int, resume: str | None = None, model=None, **options
):
    args = training_arguments(
        tmp_path,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=512,
        max_steps=max_steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=2,
        **options,
    )
    model = model or Regressor()
    trainer = Trainer(model=model, args=args, train_dataset=Noisy(64, 0), eval_dataset=Noisy(512, 1))
    add_callbacks(trainer, stopper)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_stops_an_overfitting_run_near_its_minimum(tmp_path):
    stopper = BasinEarlyStoppingCallback()
    with pytest.warns(RuntimeWarning, match="basin"):
        trainer = overfitting_run(tmp_path / "stopped", stopper, max_steps=400)
    steps = stopper.forecaster.points.x
    assert trainer.state.global_step == stopper.stopped_step == steps[-1] < 400
    assert "eval_loss" in stopper.stopping_reason and "basin" in stopper.stopping_reason
    # Each check fed the training loss the Trainer logged over the same two steps.
    train_logs = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert stopper.forecaster.points.train == pytest.approx([train_logs[int(x)] for x in steps])
    # The forecasts joined the evaluation logs.
    forecasts = [e for e in trainer.state.log_history if "snr/forecast/eval_loss/d_star" in e]
    assert forecasts and all("eval_loss" in e for e in forecasts)
    assert forecasts[-1]["step"] == stopper.stopped_step
    # The same run to the end, never stopping: a real basin, and the stop is within 1% of its minimum.
    reference = BasinEarlyStoppingCallback(min_points=10**9)
    overfitting_run(tmp_path / "full", reference, max_steps=2 * len(steps) + 100)
    full = reference.forecaster.points.loss
    assert reference.forecaster.points.x[: len(steps)] == steps  # the same run up to the stop
    assert min(full) < full[-1] and full.index(min(full)) < len(full) - 1
    assert stopper.forecaster.points.loss[-1] <= 1.01 * min(full)


def test_the_training_set_snr_of_the_monitor_is_fed_and_replayed(tmp_path, capsys):
    """With an SNRMonitorCallback (whichever comes first), each check feeds the latest training-set SNR it
    logged since the previous one; trainer_state.json replays to the live decisions."""
    from snrmon.cli import main

    args = training_arguments(
        tmp_path, per_device_train_batch_size=32, gradient_accumulation_steps=2,
        per_device_eval_batch_size=512, max_steps=300, learning_rate=1e-3, lr_scheduler_type="constant",
        max_grad_norm=0.0, eval_strategy="steps", eval_steps=2, logging_steps=2,
    )  # fmt: skip
    trainer = Trainer(model=Regressor(), args=args, train_dataset=Noisy(64, 0), eval_dataset=Noisy(512, 1))
    monitor, stopper = SNRMonitorCallback(dataset_size=64, ema_decay=0.8), BasinEarlyStoppingCallback()
    add_callbacks(trainer, stopper, monitor)  # the stopper first: it reads the monitor's values all the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logged = {e["step"]: e["snr/dataset_snr"] for e in trainer.state.log_history if "snr/dataset_snr" in e}
    fed = {e["step"]: e["snr/forecast/eval_loss/dataset_snr"] for e in trainer.state.log_history
           if "snr/forecast/eval_loss/dataset_snr" in e}  # fmt: skip
    assert fed and fed == {step: logged[step] for step in fed}
    assert min(fed.values()) <= 1 < max(fed.values()) and stopper.forecaster.decider.memorising
    trainer.save_state()
    capsys.readouterr()
    assert main(["forecast", str(tmp_path / "trainer_state.json"), "--metric", "eval_loss", "--json"]) == 0
    replay = json.loads(capsys.readouterr().out)
    history = stopper.forecaster.history
    assert [p["x"] for p in replay["points"]] == [f.x for f in history]
    assert replay["first_warning"] == next((f.x for f in history if f.warning), None)
    assert replay["stop"] == (stopper.stopped_step or None)


def test_checks_without_a_training_loss_replay_as_live_and_the_logging_interval_is_said(tmp_path, capsys):
    """Evaluations more often than training logs: the checks without a training-loss mean forecast from the
    loss alone (said at the start), and trainer_state.json still replays every check as it was live (the
    checks were read off the training-loss means, logged at some of them only)."""
    from snrmon.cli import main

    args = training_arguments(
        tmp_path, per_device_train_batch_size=32, per_device_eval_batch_size=512, max_steps=60,
        learning_rate=1e-3, eval_strategy="steps", eval_steps=2, logging_steps=6,
    )  # fmt: skip
    trainer = Trainer(model=Regressor(), args=args, train_dataset=Noisy(64, 0), eval_dataset=Noisy(512, 1))
    stopper = BasinEarlyStoppingCallback()
    add_callbacks(trainer, stopper)
    with pytest.warns(UserWarning, match=r"no training loss was logged since the previous check \(step 2\)"):
        trainer.train()
    history = stopper.forecaster.history
    assert len(history) == 30 and any(f.method == "law" for f in history)
    trainer.save_state()
    capsys.readouterr()
    assert main(["forecast", str(tmp_path / "trainer_state.json"), "--metric", "eval_loss", "--json"]) == 0
    replay = json.loads(capsys.readouterr().out)
    assert [(p["x"], p["method"], p["p_basin"]) for p in replay["points"]] == [
        (f.x, f.method, f.p_basin) for f in history
    ]


def test_a_dataset_size_in_samples_for_a_token_weighted_model_is_said(tmp_path):
    # GPT-2 counts a step's batch in predicted tokens (2 × 4 sequences of CONTEXT - 1 - 4): a training set
    # given as its 64 sequences is in another unit: its dataset_snr would be off by the tokens per sequence.
    args = training_arguments(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3, logging_steps=3
    )
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Sequences(64, 4))
    add_callbacks(trainer, SNRMonitorCallback(dataset_size=64))
    with pytest.warns(RuntimeWarning, match="smaller than one step's batch"):
        trainer.train()


def test_its_trainer_state_and_tensorboard_logs_replay_alike(tmp_path, capsys):
    """The logs a Hugging Face run writes, replayed by `snrmon forecast`: trainer_state.json holds the
    stopper's own points (the live decisions), and it and the run's TensorBoard log give one replay."""
    from snrmon.cli import main

    def replay(*argv) -> dict:
        assert main(["forecast", *(str(arg) for arg in argv), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    stopper = BasinEarlyStoppingCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the basin warnings
        trainer = overfitting_run(tmp_path, stopper, max_steps=400, report_to="tensorboard")
    assert stopper.stopped_step > 0
    trainer.save_state()  # output_dir/trainer_state.json, as a user saves it at the end
    capsys.readouterr()  # (what the Trainer printed)
    state = tmp_path / "trainer_state.json"
    live = replay(state, "--metric", "eval_loss")
    assert live["stop"] == stopper.stopped_step
    assert [p["x"] for p in live["points"]] == [f.x for f in stopper.forecaster.history]
    (run,) = (tmp_path / "runs").iterdir()
    logged = replay(state, "--metric", "eval_loss", "--train-metric", "loss")
    board = replay(run, "--metric", "eval/loss", "--train-metric", "train/loss")
    assert [p["x"] for p in logged["points"]] == [p["x"] for p in board["points"]]
    assert [p["loss"] for p in logged["points"]] == pytest.approx([p["loss"] for p in board["points"]])
    assert (logged["first_warning"], logged["stop"]) == (board["first_warning"], board["stop"])
    # Without --train-metric, the TensorBoard log replays the stopper's own points, as trainer_state.json
    # does: its series are there as train/snr/forecast/eval_loss/... (Hugging Face's names for them).
    own = replay(run, "--metric", "eval/loss")
    assert [p["x"] for p in own["points"]] == [p["x"] for p in live["points"]]
    assert [p["state"] for p in own["points"]] == [p["state"] for p in live["points"]]
    assert [p["d_star"] for p in own["points"]] == pytest.approx([p["d_star"] for p in live["points"]])
    assert (own["first_warning"], own["stop"]) == (live["first_warning"], live["stop"])


@pytest.mark.parametrize("restore_by_the_trainer", [False, True])
def test_forecast_state_survives_resume(tmp_path, restore_by_the_trainer):
    """Checkpointed at step 24 (12 checks, past min_points: forecasts to save) of a 32-step run, resumed with
    a new callback: its points and forecasts continue the uninterrupted run's exactly."""
    options = dict(
        save_strategy="steps", save_steps=24, restore_callback_states_from_checkpoint=restore_by_the_trainer
    )
    whole = BasinEarlyStoppingCallback(min_points=10)
    overfitting_run(tmp_path / "whole", whole, max_steps=32)
    first = BasinEarlyStoppingCallback(min_points=10)
    overfitting_run(tmp_path / "run", first, max_steps=24, **options)
    checkpoint = tmp_path / "run" / "checkpoint-24"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["BasinEarlyStoppingCallback"]["attributes"]["saved"]["forecaster"]["points"]["x"][-1] == 24
    resumed = BasinEarlyStoppingCallback(min_points=10)
    trainer = overfitting_run(tmp_path / "run", resumed, max_steps=32, resume=str(checkpoint), **options)
    live = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BasinEarlyStoppingCallback))
    assert (live is resumed) != restore_by_the_trainer  # the Trainer's restore makes a new instance
    assert live.forecaster.points.x == whole.forecaster.points.x == [float(s) for s in range(2, 33, 2)]
    assert live.forecaster.points.loss == pytest.approx(whole.forecaster.points.loss, rel=1e-5)
    assert any(f.d_star is not None for f in live.forecaster.history[:12])
    assert len(live.forecaster.history) == 16


def test_evaluation_off_is_an_error_at_train_start(tmp_path):
    args = training_arguments(tmp_path, per_device_train_batch_size=32, max_steps=2)
    trainer = Trainer(model=Regressor(), args=args, train_dataset=Noisy(64, 0))
    add_callbacks(trainer, BasinEarlyStoppingCallback())
    with pytest.raises(RuntimeError, match="eval_strategy='no'"):
        trainer.train()


def test_a_missing_metric_names_the_evaluated_ones(tmp_path):
    # As the Trainer's EarlyStoppingCallback: a warning and a run that goes on, unless strict.
    with pytest.warns(UserWarning, match="`eval_loss`") as caught:
        missing = BasinEarlyStoppingCallback(monitor="eval_accuracy")
        trainer = overfitting_run(tmp_path / "a", missing, max_steps=6)
    assert trainer.state.global_step == 6
    assert sum("did not give" in str(w.message) for w in caught) == 1  # once, not at each of 3 evaluations
    with pytest.raises(RuntimeError, match="`eval_loss`"):
        strict = BasinEarlyStoppingCallback(monitor="eval_accuracy", strict=True)
        overfitting_run(tmp_path / "b", strict, max_steps=4)


def test_a_non_finite_evaluation_loss_is_said_once(tmp_path):
    stopper = BasinEarlyStoppingCallback()
    with pytest.warns(UserWarning) as caught:
        trainer = overfitting_run(tmp_path, stopper, max_steps=8, model=NaNInEvaluation())
    said = [w for w in caught if "`eval_loss` is nan" in str(w.message)]
    assert len(said) == 1 and trainer.state.global_step == 8
    assert all(f.d_star is None for f in stopper.forecaster.history)


# ---------------------------------------------------------------------- DDP


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_agree_and_match_closed_form(tmp_path):
    """2 gloo ranks × 2 token-weighted microbatches of 16 per step (hf_ddp_script.py): the microbatches of
    both ranks are the small gradients, DDP's average the applied one; the Trainer sums num_items_in_batch
    over the ranks and multiplies each loss by 2, which the weights follow."""
    script = Path(__file__).with_name("hf_ddp_script.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(script.parent))
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(script), "--out", str(tmp_path), "--weighting", "tokens",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["weight_unchanged"] for r in ranks)
    assert not any(r["warnings"] for r in ranks), ranks[0]["warnings"]
    latest = ranks[0]["latest"]
    assert latest and ranks[1]["latest"] == latest  # every rank computes the same, all-reduced estimates
    assert_matches_truth(latest, ranks[0]["truth"])
    # The step's kept samples over both ranks, about 3/4 of 64: B_eff = Σ b for weights b / Σ b.
    assert 36 <= latest["snr/batch_size"] <= 60 and latest["snr/batch_size"] % 1 == 0


# ---------------------------------------------------------------------- TRL


def test_trl_sft_trainer(tmp_path):
    """TRL's SFTTrainer (a Trainer subclass): the stopper forecasts from its logs; the monitor refuses, with
    a warning and not a crash: SFTTrainer normalises the loss by num_items_in_batch outside the forward."""
    pytest.importorskip("trl", reason="TRL is optional: pip install trl")
    from datasets import Dataset as Rows
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    words = "the cat sat on a mat and dog ran to big red sun".split()
    vocab = {word: index for index, word in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(len(words), (40, 8), generator=generator).tolist()
    texts = [" ".join(words[i] for i in draw) for draw in draws]
    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4, logging_steps=2,
        eval_strategy="steps", eval_steps=2, max_length=16,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=Rows.from_dict({"text": texts[:32]}),
        eval_dataset=Rows.from_dict({"text": texts[32:]}),
        processing_class=tokenizer,
    )
    monitor, stopper = SNRMonitorCallback(), BasinEarlyStoppingCallback()
    add_callbacks(trainer, monitor, stopper)
    with pytest.warns(RuntimeWarning, match="outside the model's forward"):
        trainer.train()
    assert trainer.state.global_step == 4 and stopper.forecaster.points.x == [2.0, 4.0]
    assert all(math.isfinite(t) for t in stopper.forecaster.points.train)
    assert not any("snr/noise" in entry for entry in trainer.state.log_history)
