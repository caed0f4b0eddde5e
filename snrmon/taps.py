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
        # Σ over this step's backwards of weight × |g|², per parameter: one fused op per backward, and the
        # group sums (a matrix product) once per step.
        # float32 like the norms themselves; the group sums are formed in float64.
        self.window = torch.zeros(len(parameters), dtype=torch.float32, device=device)
        self._handles: list[RemovableHandle] = []
        self._calls = [0] * len(parameters)  # hook calls per parameter in the current backward
        self.error: BaseException | None = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if not self._handles:
            self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(self.parameters)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        slot = self._slots[index]

        def record_norm(grad: Tensor) -> None:
            try:
                self._calls[index] += 1
                if grad.is_sparse:
                    grad = grad.coalesce()._values()
                if grad.requires_grad:  # `autograd.grad(..., create_graph=True)`, e.g. a gradient penalty
                    grad = grad.detach()
                if grad.dtype == torch.float64:
                    slot.copy_(torch.linalg.vector_norm(grad))
                else:
                    torch.linalg.vector_norm(grad, dtype=torch.float32, out=slot)
            except Exception as error:  # never break the user's backward; the owner reports it
                self.error = error

        return record_norm

    def start_backward(self) -> None:
        """Clear the slots: a parameter that gets no gradient in this backward then counts as zero."""
        self.norms.zero_()
        self._calls = [0] * len(self.parameters)

    def _check_single_delivery(self) -> None:
        if max(self._calls) > 1:
            # Reentrant activation checkpointing delivers a parameter's gradient in parts; the norm of the
            # sum cannot be had from the parts' norms without keeping a copy.
            raise RuntimeError(
                "a parameter received its gradient in several parts within one backward (reentrant"
                " activation checkpointing?); use `use_reentrant=False`"
            )

    def backward_sq_norms(self, scale: Tensor | float = 1.0) -> Tensor:
        """Per-group squared norms of the last backward's gradient, divided by ``scale`` (AMP loss scale)."""
        self._check_single_delivery()
        return self.membership @ (self.norms.double() / scale).square()

    def add_backward_to_window(self, weight: float | Tensor) -> None:
        """Add weight × the last backward's squared norms to the step's window (one op for a number)."""
        self._check_single_delivery()
        if isinstance(weight, Tensor):
            self.window.addcmul_(self.norms, self.norms * weight)
        else:
            self.window.addcmul_(self.norms, self.norms, value=weight)

    def take_window(self, scale: Tensor | float = 1.0) -> Tensor:
        """Per-group Σ weight × |g|² over the step's backwards, divided by ``scale``²; clears the window."""
        sums = self.membership @ self.window.double()
        self.window.zero_()
        return sums if isinstance(scale, float) and scale == 1.0 else sums / scale**2

    def clear_window(self) -> None:
        self.window.zero_()

    def accumulated_sq_norms(self, scale: Tensor | float = 1.0) -> Tensor:
        """Per-group squared norms of ``.grad`` (the accumulated, and under DDP all-reduced, gradient)."""
        pairs = zip(self._slots, self.parameters, strict=True)
        present = [(slot, p.grad) for slot, p in pairs if p.grad is not None]
        self.norms.zero_()
        if present:
            slots, grads = zip(*present, strict=True)
            grads = [g.coalesce()._values() if g.is_sparse else g for g in grads]
            wide = [i for i, g in enumerate(grads) if g.dtype == torch.float64]
            narrow = [i for i, g in enumerate(grads) if g.dtype != torch.float64]
            if narrow:  # one fused kernel; float32 accumulation also for bf16/fp16 gradients
                norms = torch._foreach_norm([grads[i] for i in narrow], 2, dtype=torch.float32)
                torch._foreach_copy_([slots[i] for i in narrow], list(norms))
            for i in wide:
                slots[i].copy_(torch.linalg.vector_norm(grads[i]))
        return self.backward_sq_norms(scale)
