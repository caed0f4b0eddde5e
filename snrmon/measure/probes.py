"""Weight perturbations for probing a model's loss (theory §4), framework-free (torch only).

Two perturbations of the paper's regimes, applied in place to a module's weights and undone bit-exactly:

* :class:`GaussianNoise`: per tensor, ``W + σ·ε`` with ``σ² = mean(W²) / 10^(snr_db/10)`` and ``ε ~ N(0, 1)``
  drawn from the perturbation's own :class:`torch.Generator` (the global RNG is never touched, so training
  that runs beside a probe draws exactly the numbers it would draw without it);
* :class:`Quantization`: symmetric round-to-nearest fake quantization to ``bits`` bits, one scale per output
  channel (``max|W_c| / (2^(bits-1) − 1)``), computed in float.

:func:`perturbed` applies one draw of a perturbation inside a ``with`` block (``torch.no_grad``, eval mode)
and restores the weights and every submodule's train/eval flag on exit; :func:`perturbed_loss` averages a
loss over a perturbation's draws. By default the weights of ``Linear``, ``Conv*``, ``Embedding`` and
``MultiheadAttention`` layers are perturbed (biases and normalisation layers are left alone, as weight
quantization usually does).

Example::

    >>> import torch
    >>> from snrmon.measure.probes import GaussianNoise, perturbed_loss
    >>> model = torch.nn.Linear(4, 1)
    >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
    >>> loss = perturbed_loss(model, GaussianNoise(snr_db=10, draws=4), lambda: ((model(x) - y) ** 2).mean())
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

#: The layers whose weights are perturbed by default (``MultiheadAttention``: its input projection, which is
#: no ``Linear`` of its own; its output projection is one).
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.MultiheadAttention,
)
_WEIGHT_NAMES = ("weight", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def probe_parameters(
    module: nn.Module,
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
    include: Callable[[str, nn.Parameter], bool] | None = None,
) -> list[tuple[str, nn.Parameter, int]]:
    """The tensors a probe perturbs, as ``(name, parameter, channel_dim)``, each shared tensor once.

    Args:
        module: the model.
        layer_types: perturb the weights (``weight``; a ``MultiheadAttention``'s ``in_proj_weight`` or
            ``q/k/v_proj_weight``) of every submodule of these types (the default).
        include: instead, perturb every parameter ``p`` named ``name`` (as in ``named_parameters``) for which
            ``include(name, p)`` is true; its channel dimension is 0.

    ``channel_dim`` is the output-channel dimension used by per-channel quantization: 0, except for transposed
    convolutions, whose weight is laid out ``(in, out / groups, ...)``.
    """
    if include is not None:
        return [(name, p, 0) for name, p in module.named_parameters() if include(name, p)]
    found: list[tuple[str, nn.Parameter, int]] = []
    seen: set[int] = set()
    for name, layer in module.named_modules():
        if not isinstance(layer, layer_types):
            continue
        channel_dim = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
        for attribute in _WEIGHT_NAMES:
            weight = getattr(layer, attribute, None)
            if not isinstance(weight, nn.Parameter) or id(weight) in seen:
                continue
            # Tied weights (an embedding shared with the output layer) are perturbed once.
            seen.add(id(weight))
            found.append((f"{name}.{attribute}" if name else attribute, weight, channel_dim))
    return found


class Perturbation:
    """A way to perturb weights in place. Subclasses set :attr:`name` and :attr:`draws` and implement
    :meth:`apply_`."""

    #: a short name for logs, e.g. ``"gaussian_10db"`` or ``"int4"``.
    name: str
    #: how many different draws :func:`perturbed_loss` averages over (1 for a deterministic perturbation).
    draws: int = 1

    def generator(self, draw: int, device: torch.device) -> torch.Generator | None:
        """The random generator of one draw (``None``: the perturbation is deterministic)."""
        return None

    def apply_(self, weight: Tensor, channel_dim: int, generator: torch.Generator | None) -> None:
        """Perturb ``weight`` in place."""
        raise NotImplementedError


class GaussianNoise(Perturbation):
    """Gaussian weight noise at a signal-to-noise ratio in dB, per tensor: ``σ² = mean(W²) / 10^(snr_db/10)``.

    Args:
        snr_db: the SNR in dB (10 dB: the noise power is a tenth of the weight power).
        draws: the number of fixed noise draws a loss is averaged over.
        seed: draw ``i`` uses a generator seeded with ``seed + i``, so each draw is the same at every call
            (and on every rank) while the weights change underneath it.

    Raises:
        ValueError: ``snr_db`` not finite, or ``draws`` < 1.
    """

    def __init__(self, snr_db: float, draws: int = 4, seed: int = 0) -> None:
        if not isinstance(snr_db, (int, float)) or not math.isfinite(snr_db):
            raise ValueError(f"snr_db must be a finite number of decibels, got {snr_db!r}")
        if not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws must be a positive integer, got {draws!r}")
        self.snr_db, self.draws, self.seed = float(snr_db), draws, int(seed)
        self.name = f"gaussian_{self.snr_db:g}db"

    def generator(self, draw: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed + draw)

    def apply_(self, weight: Tensor, channel_dim: int, generator: torch.Generator | None) -> None:
        w = weight.float()
        sigma = (w.square().mean() / 10 ** (self.snr_db / 10)).sqrt()
        noise = torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32)
        weight.copy_(w + sigma * noise)

    def __repr__(self) -> str:
        return f"GaussianNoise(snr_db={self.snr_db:g}, draws={self.draws}, seed={self.seed})"


class Quantization(Perturbation):
    """Symmetric per-output-channel round-to-nearest fake quantization to ``bits`` bits, in float.

    Each output channel ``c`` gets the scale ``s_c = max|W_c| / (2^(bits-1) − 1)``; its weights become
    ``s_c · clamp(round(W / s_c), −(2^(bits-1) − 1), 2^(bits-1) − 1)`` (e.g. 15 levels −7…7 for 4 bits). A
    channel of zeros stays zero.

    Raises:
        ValueError: ``bits`` not an integer ≥ 2.
    """

    def __init__(self, bits: int) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
            raise ValueError(f"bits must be an integer >= 2 (symmetric quantization needs ±1), got {bits!r}")
        self.bits, self.draws = bits, 1
        self.name = f"int{bits}"

    @property
    def levels(self) -> int:
        """The largest quantized magnitude, ``2^(bits-1) − 1``."""
        return 2 ** (self.bits - 1) - 1

    def apply_(self, weight: Tensor, channel_dim: int, generator: torch.Generator | None) -> None:
        weight.copy_(fake_quantize(weight, self.bits, channel_dim))

    def __repr__(self) -> str:
        return f"Quantization(bits={self.bits})"


def fake_quantize(weight: Tensor, bits: int, channel_dim: int = 0) -> Tensor:
    """``weight`` quantized symmetrically per channel along ``channel_dim`` and dequantized (float)."""
    w = weight.float()
    levels = 2 ** (bits - 1) - 1
    if w.dim() == 0:
        scale = w.abs() / levels
    else:
        moved = w.movedim(channel_dim, 0)
        scale = moved.reshape(moved.shape[0], -1).abs().amax(dim=1) / levels
        scale = scale.reshape(-1, *([1] * (w.dim() - 1))).movedim(0, channel_dim)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel stays zero
    return ((w / safe).round().clamp(-levels, levels) * scale).to(weight.dtype)


@contextmanager
def perturbed(
    module: nn.Module,
    perturbation: Perturbation,
    draw: int = 0,
    params: list[tuple[str, nn.Parameter, int]] | None = None,
) -> Iterator[nn.Module]:
    """Within the block, ``module`` runs in eval mode under ``torch.no_grad`` with draw ``draw`` of
    ``perturbation`` applied to its weights; on exit (also on an exception) the weights are restored
    bit-exactly from a copy and every submodule gets back its train/eval flag.

    Args:
        module: the model, perturbed in place.
        perturbation: what to apply.
        draw: which of the perturbation's fixed draws.
        params: the tensors to perturb (default :func:`probe_parameters` of ``module``).
    """
    if params is None:
        params = probe_parameters(module)
    modes = [(m, m.training) for m in module.modules()]
    saved: list[tuple[nn.Parameter, Tensor]] = []
    generators: dict[torch.device, torch.Generator | None] = {}
    try:
        with torch.no_grad():
            module.eval()
            for _, p, channel_dim in params:
                saved.append((p, p.detach().clone()))  # a copy, not "subtract the noise": exact restore
                if p.device not in generators:  # one stream per device, in the parameters' fixed order
                    generators[p.device] = perturbation.generator(draw, p.device)
                perturbation.apply_(p.data, channel_dim, generators[p.device])
            yield module
    finally:
        with torch.no_grad():
            for p, copy in saved:
                p.data.copy_(copy)
        for m, training in modes:
            m.training = training


def perturbed_loss(
    module: nn.Module,
    perturbation: Perturbation,
    loss_fn: Callable[[], Tensor | float],
    params: list[tuple[str, nn.Parameter, int]] | None = None,
) -> Tensor:
    """The mean of ``loss_fn()`` over the perturbation's draws, each evaluated inside :func:`perturbed`.

    ``loss_fn`` takes no argument and evaluates the (perturbed) ``module``, e.g. on a few held-out batches.
    The result is a float32 scalar tensor on the device of the losses (no host sync).
    """
    total: Tensor | None = None
    for draw in range(perturbation.draws):
        with perturbed(module, perturbation, draw, params):
            loss = torch.as_tensor(loss_fn()).detach().float()
        total = loss if total is None else total + loss.to(total.device)
    assert total is not None  # draws >= 1
    return total / perturbation.draws
