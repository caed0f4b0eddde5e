"""benchmarks/corpus.py's second-order drift terms (docs/forecast.md, "The second-order term, measured")
against their exact values: per-example gradients and the explicit Hessian of the validation loss."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import corpus  # noqa: E402


def random_task(n_train: int = 256, n_val: int = 32, n_in: int = 6, classes: int = 3) -> corpus.Task:
    """A classification task of random inputs labelled by a random linear teacher (no data set needed)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_val, n_in, generator=gen)
    y = (x @ torch.randn(n_in, classes, generator=gen)).argmax(1)
    x_train, y_train = x[:n_train], y[:n_train]

    def train_batch(g: torch.Generator, size: int) -> corpus.Batch:
        idx = torch.randint(0, n_train, (size,), generator=g)
        return x_train[idx], y_train[idx]

    return corpus.Task(
        "random classification",
        n_in,
        classes,
        train_batch,
        corpus._chunks(x[n_train:], y[n_train:]),
        corpus._chunks(x_train, y_train),
        corpus._cross_entropy,
    )


def adam_scale(opt: torch.optim.Optimizer, params: list) -> torch.Tensor:
    """AdamW's per-coordinate step scale 1/(√v̂ + ε), from its state (bias-corrected)."""
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    return torch.cat(
        [
            (
                1 / ((opt.state[p]["exp_avg_sq"] / (1 - beta2 ** float(opt.state[p]["step"]))).sqrt() + eps)
            ).reshape(-1)
            for p in params
        ]
    ).double()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_drift_terms_match_the_exact_hessian_and_per_example_gradients(monkeypatch, optimizer: str):
    """Each term against its definition: the gain and the curvature exactly, the noise term's mean over random
    partitions within its standard error; AdamW's rate and preconditioner, SGD's momentum (effective rate
    η/(1 − momentum), weight decay in the step); and the training state left as it was."""
    # Four pieces instead of 16: the same estimator, and a wrong divisor (C for C − 1) would be 1/4 off.
    monkeypatch.setattr(corpus, "NOISE_PIECES", 4)
    torch.manual_seed(0)
    s = corpus.Scenario(
        "check", "tuning", "mlp", "random", 256, 0.05, 10, optimizer, width=8, batch=8, weight_decay=0.01
    )
    task = random_task()
    model = corpus.make_model(s, task)
    opt = corpus.make_optimizer(s, model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # an optimizer state to precondition with
        x, y = task.train_batch(gen, s.batch)
        opt.zero_grad()
        task.losses(model, x, y).mean().backward()
        opt.step()

    params = [p for p in model.parameters() if p.requires_grad]
    names = [name for name, _ in model.named_parameters()]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    x_train = torch.cat([c[0] for c in task.train_chunks])
    y_train = torch.cat([c[1] for c in task.train_chunks])
    x_val = torch.cat([c[0] for c in task.val_chunks])
    y_val = torch.cat([c[1] for c in task.val_chunks])

    def loss_at(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weights = {
            n: t.view(shape).float() for n, t, shape in zip(names, theta.split(sizes), shapes, strict=True)
        }
        return F.cross_entropy(torch.func.functional_call(model, weights, (x,)), y)

    model.eval()
    theta = corpus.flat(p.detach() for p in params)
    per_example = torch.stack(
        [torch.func.grad(loss_at)(theta, x_train[i : i + 1], y_train[i : i + 1]) for i in range(len(x_train))]
    ).double()
    covariance = torch.cov(per_example.T)  # the training set's, (N − 1) normalised
    hessian = torch.autograd.functional.hessian(lambda t: loss_at(t, x_val, y_val), theta).double()
    g_val = torch.func.grad(lambda t: loss_at(t, x_val, y_val))(theta).double()
    if optimizer == "adamw":  # decoupled weight decay, not preconditioned
        scale, rate = adam_scale(opt, params), s.lr
    else:  # torch's SGD adds λθ to the gradient, and momentum β multiplies the long-run step by 1/(1 − β)
        scale, rate = torch.ones_like(theta), s.lr / (1 - opt.param_groups[0]["momentum"])
    step = scale * per_example.mean(0) + s.weight_decay * theta
    exact_first = -rate * float(g_val @ step)
    exact_curvature = rate**2 / 2 * float(step @ hessian @ step)
    exact_noise = (
        rate**2 / 2 * float(torch.trace(scale[:, None] * hessian * scale[None, :] @ covariance)) / s.batch
    )

    # The training state: the weights' .grad, the optimizer's state, the model's mode (eval here).
    grads = [p.grad.clone() for p in params]
    state = {k: v.clone() for p in params for k, v in opt.state[p].items() if torch.is_tensor(v)}
    estimates = []
    for k in range(160):  # the estimator's only randomness: which examples form each piece
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(k))
        shuffled = corpus.Task(
            **{**vars(task), "train_chunks": corpus._chunks(x_train[order], y_train[order])}
        )
        drift = corpus.step_drift(model, shuffled, s, opt, s.lr)
        assert math.isclose(drift.first, exact_first, rel_tol=1e-5)
        assert math.isclose(drift.curvature, exact_curvature, rel_tol=1e-5)
        estimates.append(drift.noise)
    assert not model.training
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params, strict=True))
    after = {k: v for p in params for k, v in opt.state[p].items() if torch.is_tensor(v)}
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    mean, se = float(np.mean(estimates)), float(np.std(estimates, ddof=1) / math.sqrt(len(estimates)))
    # Unbiased: within 4 standard errors of the exact value. With 4 pieces a divisor of C instead of C − 1
    # would be 25% low: over 4 standard errors while the standard error is under a sixteenth of the value
    # (160 partitions: about 3% with AdamW, 5% with SGD).
    assert abs(mean - exact_noise) < 4 * se + 1e-9 * abs(exact_noise)
    assert se < abs(exact_noise) / 16
