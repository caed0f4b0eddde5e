"""Per-group squared gradient norms of each backward pass, without keeping a copy of any gradient."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle


class GradientTaps:
    """Tensor hooks that record the norm of each backward's gradient before it is accumulated.

    A hook registered on a leaf parameter sees the gradient of one backward pass (one microbatch) before
    autograd adds it to ``.grad`` and before DDP's all-reduce, which is exactly the *small* gradient
    T2/T3 need. Each hook does one fused op: the norm is written into a preallocated slot, so the hot
    path allocates nothing and never syncs with the host.

    Args:
        parameters: the parameters to watch (those with ``requires_grad``).
        membership: ``[num_groups, num_parameters]`` 0/1 matrix from :func:`snrmon.groups.group_parameters`.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], membership: Tensor):
        if not parameters:
            raise ValueError("no trainable parameters to watch")
        if membership.shape[1] != len(parameters):
            raise ValueError("membership must have one column per parameter")
        self.parameters = parameters
        device = parameters[0].device
        self.membership = membership.to(device=device, dtype=torch.float64)
        self.norms = torch.zeros(len(parameters), dtype=torch.float32, device=device)
        self._slots = list(self.norms.unbind())
        self._handles: list[RemovableHandle] = []
        self.error: BaseException | None = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if not self._handles:
            pairs = zip(self.parameters, self._slots, strict=True)
            self._handles = [parameter.register_hook(self._hook(slot)) for parameter, slot in pairs]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, slot: Tensor):
        def record_norm(grad: Tensor) -> None:
            try:
                torch.linalg.vector_norm(grad, dtype=torch.float32, out=slot)
            except Exception as error:  # never break the user's backward; the owner reports it
                self.error = error

        return record_norm

    def start_backward(self) -> None:
        """Clear the slots: a parameter that gets no gradient in this backward then counts as zero."""
        self.norms.zero_()

    def backward_sq_norms(self, scale: Tensor | float = 1.0) -> Tensor:
        """Per-group squared norms of the last backward's gradient, divided by ``scale`` (AMP loss scale)."""
        return self.membership @ (self.norms.double() / scale).square()

    def accumulated_sq_norms(self, scale: Tensor | float = 1.0) -> Tensor:
        """Per-group squared norms of ``.grad`` (the accumulated, and under DDP all-reduced, gradient)."""
        pairs = zip(self._slots, self.parameters, strict=True)
        present = [(slot, p.grad) for slot, p in pairs if p.grad is not None]
        self.norms.zero_()
        if present:
            slots, grads = zip(*present, strict=True)
            norms = torch._foreach_norm(list(grads), 2, dtype=torch.float32)
            torch._foreach_copy_(list(slots), list(norms))
        return self.backward_sq_norms(scale)
