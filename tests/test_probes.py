"""Perturbation probes: the framework-free perturbations (snrmon.measure.probes) and their callbacks through
real (small, CPU, sub-second) Trainer.fit runs.

Run as a script, this file is also the worker of the DDP test (Lightning relaunches it for rank 1):
``python tests/test_probes.py --out DIR`` writes each rank's probe values to ``DIR/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snrmon.callbacks import BasinEarlyStopping, GaussianNoiseProbe, QuantizationProbe
from snrmon.measure.probes import (
    GaussianNoise,
    Quantization,
    fake_quantize,
    perturbed,
    perturbed_loss,
    probe_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the perturbations, without Lightning --------------------------------------------------------------------


class Zoo(nn.Module):
    """A layer of each kind: perturbed (Linear, Conv1d, ConvTranspose1d, Embedding) or not (LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 4, 3)
        self.deconv = nn.ConvTranspose1d(4, 5, 3)
        self.norm = nn.LayerNorm(5)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(5, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.deconv(self.conv(self.embed(tokens).transpose(1, 2))).transpose(1, 2)
        return self.head(self.drop(self.norm(h))).mean()


@pytest.mark.parametrize("perturbation", [GaussianNoise(10, draws=2), Quantization(3)], ids=repr)
def test_weights_and_modes_restored_bit_exactly(perturbation):
    torch.manual_seed(0)
    model = Zoo().train()
    model.norm.eval()  # a mixed train/eval state must come back as it was, not as all-train
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = {name for name, _, _ in probe_parameters(model)}
    assert targets == {"embed.weight", "conv.weight", "deconv.weight", "head.weight"}

    with perturbed(model, perturbation, draw=1) as inside:
        assert not torch.is_grad_enabled() and not any(m.training for m in inside.modules())
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == targets  # biases and the norm untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and not model.norm.training and model.drop.training

    with pytest.raises(KeyError), perturbed(model, perturbation):  # restored on an exception too
        raise KeyError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.is_grad_enabled() and model.training and not model.norm.training


def test_attention_projections_are_perturbed_by_default():
    attention = nn.TransformerEncoderLayer(8, 2, 16)
    names = [name for name, _, _ in probe_parameters(attention)]
    assert names == [
        "self_attn.in_proj_weight",  # the query, key and value projections: no Linear of their own
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]


def test_own_generator_fixed_draws_and_global_rng_untouched():
    torch.manual_seed(0)
    model, noise = nn.Linear(50, 40), GaussianNoise(10, draws=3, seed=7)
    tokens = torch.randn(4, 50)
    state = torch.get_rng_state()

    def draw(i: int) -> torch.Tensor:
        with perturbed(model, noise, draw=i):
            return model.weight.clone()

    first = draw(0)
    torch.manual_seed(123)  # the global seed has no say in the probe's draws
    assert torch.equal(draw(0), first) and not torch.equal(draw(1), first)
    torch.set_rng_state(state)
    loss = perturbed_loss(model, noise, lambda: model(tokens).square().mean())
    assert torch.equal(torch.get_rng_state(), state)  # the probe drew nothing from the global RNG
    by_hand = [0.0] * 3
    for i in range(3):
        with perturbed(model, noise, draw=i):
            by_hand[i] = model(tokens).square().mean().item()
    assert loss.item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)


@pytest.mark.parametrize("snr_db", [-3.0, 10.0, 20.0])
def test_noise_power_matches_the_db_definition(snr_db):
    torch.manual_seed(0)
    layer = nn.Linear(400, 250)  # 1e5 weights: the noise variance is known to ~0.5%
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 3, 250)[:, None])  # a per-tensor, not per-row, σ
    w = layer.weight.detach().clone()
    with perturbed(layer, GaussianNoise(snr_db)):
        noise = layer.weight - w
    assert noise.mean().abs() < 5 * noise.std() / math.sqrt(noise.numel())
    measured_db = 10 * math.log10(w.square().mean().item() / noise.var().item())
    assert measured_db == pytest.approx(snr_db, abs=0.05)
    # Gaussian: the 4th moment is 3σ⁴ (within a few percent at 1e5 samples)
    assert (noise**4).mean().item() / noise.var().item() ** 2 == pytest.approx(3.0, rel=0.05)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_quantization_levels_and_per_channel_scale(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 20) * torch.tensor([0.01, 0.1, 1.0, 10.0, 0.5, 0.0])[:, None]  # last row all zero
    q = fake_quantize(w, bits)
    levels = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / levels
    for c in range(5):
        k = q[c] / scale[c]
        assert torch.allclose(k, k.round(), atol=1e-4)  # on the channel's grid
        assert k.abs().max().round() == levels  # its largest weight lands on the top level
        assert len(k.round().unique()) <= 2 * levels + 1
        assert ((q[c] - w[c]).abs() <= scale[c] / 2 * (1 + 1e-5)).all()  # round to nearest
    assert torch.equal(q[5], torch.zeros(20))
    # A transposed convolution's output channel is its dim 1: one scale per column of (in, out, k).
    deconv = nn.ConvTranspose1d(3, 4, 2)
    ((_, weight, channel_dim),) = [p for p in probe_parameters(deconv)]
    assert channel_dim == 1
    with perturbed(deconv, Quantization(bits)):
        per_out = deconv.weight.transpose(0, 1).reshape(4, -1)
        ref = weight.detach().transpose(0, 1).reshape(4, -1)
    assert torch.allclose(per_out.abs().amax(dim=1), ref.abs().amax(dim=1), rtol=1e-6)


def test_bad_arguments_give_clear_errors():
    for snr_db in (math.nan, math.inf, -math.inf, "10"):
        with pytest.raises(ValueError, match="snr_db must be a finite"):
            GaussianNoiseProbe(snr_db=snr_db)
    for bits in (1, 0, -4, 2.5, True):
        with pytest.raises(ValueError, match="bits must be an integer >= 2"):
            QuantizationProbe(bits=bits)
    with pytest.raises(ValueError, match="draws"):
        GaussianNoiseProbe(snr_db=10, draws=0)
    with pytest.raises(ValueError, match="num_batches"):
        QuantizationProbe(bits=4, num_batches=0)
    with pytest.raises(ValueError, match="every_n_validations"):
        QuantizationProbe(bits=4, every_n_validations=0)


# -- the callbacks, through Trainer.fit ----------------------------------------------------------------------


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, torch.sin(2 * x[:, :1]) + 0.5 * torch.randn(n, 1, generator=g))


class Regressor(L.LightningModule):
    """With dropout (it draws from the global RNG in training: a probe that drew from it would show)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Dropout(0.2), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class NoValidation(Regressor):
    validation_step = L.LightningModule.validation_step


class Losses(Callback):
    """Every training loss, and the train/eval state at each training batch (restored after each probe)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.training: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())
        self.training.append(all(m.training for m in pl_module.modules()))


def _fit(callbacks: list, max_epochs: int = 3, model: L.LightningModule | None = None, **options):
    torch.manual_seed(0)
    model = model or Regressor()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=options.pop("num_sanity_val_steps", 0),
        **options,
    )
    train = DataLoader(_data(96, 0), batch_size=16, shuffle=True)
    trainer.fit(model, train, DataLoader(_data(64, 1), batch_size=16))
    return trainer, model


def test_training_is_bit_identical_with_and_without_probes():
    plain = Losses()
    _fit([plain])
    probed, probes = Losses(), [GaussianNoiseProbe(snr_db=10, draws=2), QuantizationProbe(bits=4)]
    trainer, _ = _fit([probed, *probes], num_sanity_val_steps=2)  # the probes skip the sanity check
    assert len(plain.losses) == 18
    assert all(torch.equal(a, b) for a, b in zip(plain.losses, probed.losses, strict=True))
    assert all(probed.training)  # the probe's eval mode never leaks into training
    assert all(p.metric in trainer.callback_metrics for p in probes)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_logs_the_perturbed_validation_loss_under_its_name(precision):
    probe = GaussianNoiseProbe(snr_db=5, draws=2, num_batches=2)
    quant = QuantizationProbe(bits=3, num_batches=2)
    trainer, model = _fit([probe, quant], max_epochs=2, precision=precision)
    assert probe.metric == "snr/probe/gaussian_5db" and quant.metric == "snr/probe/int3"
    # The last validation ran after the last step: the logged value is the loss of the final weights on the
    # first two validation batches, under the probe's two fixed draws (and Lightning's autocast, if any).
    batches = list(DataLoader(_data(64, 1), batch_size=16))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def loss(n: int = 2) -> torch.Tensor:
        with autocast:
            return torch.stack([nn.functional.mse_loss(model.net(x), y) for x, y in batches[:n]]).mean()

    for p in (probe, quant):
        expected = perturbed_loss(model, p.perturbation, loss).item()
        assert trainer.callback_metrics[p.metric].item() == pytest.approx(expected, rel=1e-6)
        assert p.last_value == p.local_value == pytest.approx(expected, rel=1e-6)
    # The muted validation_step did not log the perturbed loss as val_loss: it is the clean loss of all 4.
    model.eval()  # no dropout, as in validation
    with torch.no_grad():
        clean = loss(4).item()
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(clean, rel=1e-6)
    assert probe.last_value > clean  # 5 dB of noise hurts


def test_basin_early_stopping_can_monitor_a_probe():
    probe = QuantizationProbe(bits=3)
    # Listed before the probe on purpose: the probe logs in on_validation_epoch_end, the stopper reads in
    # on_validation_end, whatever the order; strict=True would raise if the metric were missing.
    stopper = BasinEarlyStopping(monitor=probe.metric, strict=True)
    seen = []

    class Watch(Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            seen.append(probe.last_value)

    _fit([stopper, probe, Watch()], max_epochs=4)
    assert stopper.forecaster.points.x == [6.0, 12.0, 18.0, 24.0]  # one point per validation
    assert stopper.forecaster.points.loss == pytest.approx(seen, rel=1e-6)


def test_every_n_validations_and_a_validation_step_without_loss():
    probe = GaussianNoiseProbe(snr_db=10, draws=1, every_n_validations=2)
    values = []

    class Watch(Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            values.append(probe.last_value)

    _fit([probe, Watch()], max_epochs=3)
    assert values[0] is not None and values[1] == values[0] and values[2] != values[0]

    class Silent(Regressor):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)  # logs, returns nothing

    # Said at the sanity check's first batch, once; training goes on, and nothing is probed or logged.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = _fit([QuantizationProbe(bits=4)], max_epochs=2, model=Silent(), num_sanity_val_steps=2)
    said = [str(w.message) for w in record if "needs the loss of a validation batch" in str(w.message)]
    assert len(said) == 1 and "returned NoneType" in said[0] and "loss_fn=" in said[0]
    assert trainer.current_epoch == 2 and "snr/probe/int4" not in trainer.callback_metrics
    custom = QuantizationProbe(bits=4, loss_fn=lambda m, b, i: nn.functional.l1_loss(m.net(b[0]), b[1]))
    trainer, _ = _fit([custom], max_epochs=1, model=Silent())
    assert math.isfinite(trainer.callback_metrics["snr/probe/int4"].item())


def test_a_probe_reads_the_first_batches_of_the_first_of_several_dataloaders():
    """Several validation dataloaders: validation_step takes a dataloader_idx (the probe passes 0), and only
    what the probe reads must return a loss (here the first 2 batches of dataloader 0)."""

    class Several(Regressor):
        def validation_step(self, batch, batch_idx, dataloader_idx):
            loss = super().validation_step(batch, batch_idx)
            return loss if dataloader_idx == 0 and batch_idx < 2 else None

        def val_dataloader(self):
            return [DataLoader(_data(64, 1), batch_size=16), DataLoader(_data(64, 2), batch_size=16)]

    probe = GaussianNoiseProbe(snr_db=10, draws=1, num_batches=2)
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[probe], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=2,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(Several(), DataLoader(_data(96, 0), batch_size=16))
    assert not [w for w in record if "needs the loss" in str(w.message)]
    assert probe.last_value is not None and math.isfinite(probe.last_value)


def test_a_perturbed_validation_step_without_a_loss_gives_nan_not_a_crash():
    class NoLossWhenMuted(Regressor):  # (the probe mutes self.log while it runs validation_step)
        def validation_step(self, batch, batch_idx):
            loss = super().validation_step(batch, batch_idx)
            return None if "log" in self.__dict__ else loss

    probe = GaussianNoiseProbe(snr_db=10, draws=1)
    trainer, _ = _fit([probe], max_epochs=1, model=NoLossWhenMuted())
    assert trainer.current_epoch == 1 and math.isnan(probe.last_value)


def test_no_validation_loop_warns():
    with pytest.warns(RuntimeWarning, match="no validation loop"):
        _fit([GaussianNoiseProbe(snr_db=10)], max_epochs=1, model=NoValidation())
    with pytest.warns(RuntimeWarning, match="no validation loop"):
        _fit([QuantizationProbe(bits=4)], max_epochs=1, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        probe = QuantizationProbe(bits=8)
        _fit([probe], max_epochs=1)  # with a validation loop: no warning
        assert probe.last_value is not None


# -- DDP: 2 CPU ranks (gloo) ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
def test_ranks_draw_the_same_noise_and_log_the_mean(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK"):
        env.pop(name, None)
    command = [sys.executable, str(Path(__file__).resolve()), "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["draw_checksum"] == ranks[1]["draw_checksum"]  # the same perturbed weights
    assert ranks[0]["local"] != ranks[1]["local"]  # each rank saw its own validation shard
    mean = (ranks[0]["local"] + ranks[1]["local"]) / 2
    for r in ranks:
        assert r["logged"] == pytest.approx(mean, rel=1e-6)
        assert r["last_value"] == pytest.approx(mean, rel=1e-6)


def _ddp_worker(out: Path) -> None:
    torch.set_num_threads(1)
    probe = GaussianNoiseProbe(snr_db=10, draws=2)
    torch.manual_seed(0)
    model = Regressor()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=[probe],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    train = DataLoader(_data(64, 0), batch_size=16, shuffle=True)
    trainer.fit(model, train, DataLoader(_data(64, 1), batch_size=16))
    with perturbed(model, probe.perturbation, draw=1):
        checksum = sum(p.double().sum().item() * (i + 1) for i, p in enumerate(model.parameters()))
    result = {
        "local": probe.local_value,
        "last_value": probe.last_value,
        "logged": trainer.callback_metrics[probe.metric].item(),
        "draw_checksum": checksum,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    _ddp_worker(parser.parse_args().out)
