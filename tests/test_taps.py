"""GradientTaps: the hooks' per-parameter norms against each backward's own gradients, in every dtype and
layout, with a parameter that gets no gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snrmon.measure.groups import group_parameters
from snrmon.measure.taps import GradientTaps


class Mixed(nn.Module):
    """An embedding, a norm, a head, and a layer never used."""

    def __init__(self, sparse: bool = False):
        super().__init__()
        self.embed = nn.Embedding(300, 20, sparse=sparse)  # 6,000 values: large
        self.norm = nn.LayerNorm(20)  # small
        self.head = nn.Linear(20, 3)  # small
        self.unused = nn.Linear(20, 3)  # no gradient in any backward

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens).mean(1)))


def taps_on(model: nn.Module) -> tuple[GradientTaps, list[nn.Parameter]]:
    named = list(model.named_parameters())
    membership = group_parameters([name for name, _ in named], None)[1]
    parameters = [p for _, p in named]
    taps = GradientTaps(parameters, membership)
    taps.attach()
    taps.start_backward()
    return taps, parameters


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 300, (8, 5), generator=generator)
    return model(tokens).square().mean()


def exact_norms(model: nn.Module, seed: int) -> torch.Tensor:
    """Per-parameter norms of one backward's gradient, from ``torch.autograd.grad`` (0 for no gradient)."""
    parameters = list(model.parameters())
    grads = torch.autograd.grad(loss_of(model, seed), parameters, allow_unused=True)
    norms = [0.0 if g is None else float(torch.linalg.vector_norm(g.to_dense().double())) for g in grads]
    return torch.tensor(norms, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_norms_of_every_backward_match_its_gradients(dtype, monkeypatch):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    taps, parameters = taps_on(model)
    if dtype != torch.float64:
        # The usual gradients take the hook's one op: the path for unusual ones is not called.
        def fallback(*args):
            raise AssertionError("the fused read fell back")

        monkeypatch.setattr(taps, "_record_unusual_norm", fallback)
    rel = 1e-6  # the slots are float32 (bf16 gradients are summed in float32)
    for seed in range(3):  # accumulating microbatches: each backward's own gradient, not `.grad`
        expected = exact_norms(model, seed)
        taps.start_backward()
        loss_of(model, seed).backward()
        assert taps.norms.double() == pytest.approx(expected, rel=rel, abs=0)
        assert float(taps.norms[-1]) == 0.0 and float(taps.norms[-2]) == 0.0  # `unused` got none
        assert taps.most_calls() == 1
    taps.detach()


def test_sparse_and_graph_carrying_gradients_are_read_too():
    torch.manual_seed(0)
    model = Mixed(sparse=True)
    taps, _ = taps_on(model)
    expected = exact_norms(model, seed=1)
    taps.start_backward()
    loss_of(model, seed=1).backward()
    total = taps.backward_sq_norms()
    assert taps.error is None
    assert taps.norms.double() == pytest.approx(expected, rel=1e-6, abs=0)
    assert total.tolist() == pytest.approx([float(expected.square().sum())], rel=2e-6)

    # A gradient penalty's backward: gradients that carry a graph (`create_graph=True`).
    dense = Mixed()
    taps, parameters = taps_on(dense)
    expected = exact_norms(dense, seed=2)
    taps.start_backward()
    grads = torch.autograd.grad(loss_of(dense, seed=2), parameters, allow_unused=True, create_graph=True)
    assert any(g is not None and g.requires_grad for g in grads)
    assert taps.error is None
    assert not taps.norms.requires_grad
    assert taps.norms.double() == pytest.approx(expected, rel=1e-6, abs=0)


def test_a_second_backward_before_the_read_is_refused_not_mixed():
    model = Mixed()
    taps, _ = taps_on(model)
    taps.start_backward()
    loss_of(model, 0).backward()
    loss_of(model, 1).backward()
    with pytest.raises(RuntimeError, match="received 2 gradients"):
        taps.backward_sq_norms()
