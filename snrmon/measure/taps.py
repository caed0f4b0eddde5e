"""Per-group squared gradient norms of each backward pass, without keeping a copy of any gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle


def _local_values(grad: Tensor) -> Tensor:
    """What of ``grad`` this process holds: the values of a sparse gradient, the local shard of a DTensor."""
    if isinstance(grad, DTensor):
        return grad.to_local()
    return grad.coalesce()._values() if grad.is_sparse else grad


class GradientTaps:
    """Tensor hooks that record the norm of each backward's gradient before it is accumulated.

    A hook registered on a leaf parameter sees the gradient of one backward pass (one microbatch) before
    autograd adds it to ``.grad`` and before DDP's all-reduce, which is exactly the *small* gradient
    T2/T3 need. Each hook does one fused op: the norm is written into a preallocated slot, so the hot
    path allocates nothing and never syncs with the host.

    Args:
        parameters: the parameters to watch (those with ``requires_grad``).
        membership: ``[num_groups, num_parameters]`` 0/1 matrix from
            :func:`snrmon.measure.groups.group_parameters`.
    """

    #: Whether :meth:`accumulated_sq_norms` gives this process's share of the applied gradient (local shards,
    #: to be summed over processes) rather than the whole of it.
    reads_shards = False

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
        # Hook calls per parameter in the current backward; cleared in place, since the hooks hold this list.
        self._calls = [0] * len(parameters)
        self._no_calls = [0] * len(parameters)
        # The parameters whose norm in this backward is to be read from `.grad` after it (see `defers`).
        self._deferred: list[int] = []
        #: Whether a hook that finds its parameter's ``.grad`` empty leaves the norm to be read from ``.grad``
        #: after the backward, where autograd stores that same gradient (the first microbatch after
        #: ``zero_grad()``). Only where nothing else writes ``.grad`` in the backward: one process, no FSDP.
        self.defers = False
        self._hooks: list | None = None  # one hook function per parameter, made at the first attach
        self.error: BaseException | None = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if not self._handles:
            # With every_n_steps > 1 the hooks come and go every measured window: made once, registered again.
            if self._hooks is None:
                self._hooks = [self._hook(i) for i in range(len(self.parameters))]
            pairs = zip(self.parameters, self._hooks, strict=True)
            self._handles = [parameter.register_hook(hook) for parameter, hook in pairs]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        # Runs once per parameter per microbatch, between the backward's own kernels, which leave the caches
        # cold for it: it does as little as it can, and what it uses is bound here, not looked up per call.
        slot, calls, deferred = self._slots[index], self._calls, self._deferred
        parameter = self.parameters[index]
        norm, float32 = torch.linalg.vector_norm, torch.float32

        def record_norm(grad: Tensor) -> None:
            try:
                calls[index] += 1
                if self.defers and parameter.grad is None:
                    # Autograd stores this very gradient as `.grad`: it is read there after the backward,
                    # with the others, in one fused op (on CPU a third of the cost of a norm here).
                    deferred.append(index)
                    return
                # The usual gradient: dense, float32 or narrower, no graph. The others make this raise.
                norm(grad, dtype=float32, out=slot)
            except Exception:
                self._record_unusual_norm(slot, grad)

        return record_norm

    def _record_unusual_norm(self, slot: Tensor, grad: Tensor) -> None:
        """A sparse or float64 gradient, or one with a graph (``create_graph=True``, a gradient penalty)."""
        try:
            if grad.is_sparse:
                grad = grad.coalesce()._values()
            if grad.requires_grad:
                grad = grad.detach()
            if grad.dtype == torch.float64:
                slot.copy_(torch.linalg.vector_norm(grad))
            else:
                torch.linalg.vector_norm(grad, dtype=torch.float32, out=slot)
        except Exception as error:  # never break the user's backward; the owner reports it
            self.error = error

    def start_backward(self) -> None:
        """Clear the slots: a parameter that gets no gradient in this backward then counts as zero."""
        self.norms.zero_()
        self._calls[:] = self._no_calls
        self._deferred.clear()

    def _finish_backward(self) -> None:
        """Check that each parameter got its gradient in one piece, and read the norms left to ``.grad``."""
        if max(self._calls) > 1:
            # Reentrant activation checkpointing delivers a parameter's gradient in parts; the norm of the
            # sum cannot be had from the parts' norms without keeping a copy.
            raise RuntimeError(
                "a parameter received its gradient in several parts within one backward (reentrant"
                " activation checkpointing?); use `use_reentrant=False`"
            )
        if self._deferred:
            if any(self.parameters[i].grad is None for i in self._deferred):
                raise RuntimeError(
                    "a parameter's `.grad` was emptied during the backward (an optimizer step in a"
                    " post-accumulate-grad hook?): the gradient the optimizer applies cannot be read"
                )
            # Usually all of them: the first microbatch after `zero_grad()`.
            everyone = len(self._deferred) == len(self.parameters)
            self._read_grad_norms(None if everyone else self._deferred)
            self._deferred.clear()

    def backward_sq_norms(self, scale: Tensor | float = 1.0) -> Tensor:
        """Per-group squared norms of the last backward's gradient, divided by ``scale`` (AMP loss scale)."""
        self._finish_backward()
        norms = self.norms.double()
        if not (isinstance(scale, float) and scale == 1.0):  # (x / 1.0 is x: one op fewer without a scaler)
            norms = norms / scale
        return self.membership @ norms.square()

    def add_backward_to_window(self, weight: float | Tensor) -> None:
        """Add weight × the last backward's squared norms to the step's window (one op for a number)."""
        self._finish_backward()
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
        self._read_grad_norms(None)
        return self.backward_sq_norms(scale)

    def _read_grad_norms(self, indices: list[int] | None) -> None:
        """Write the norms of the ``.grad`` of the parameters at ``indices`` into their slots (``None``: of
        every parameter, zero where ``.grad`` is empty)."""
        parameters = self.parameters if indices is None else [self.parameters[i] for i in indices]
        with torch.no_grad():  # (a `.grad` made with `create_graph=True` carries a graph)
            self._write_norms(indices, [p.grad for p in parameters])

    def _write_norms(self, indices: list[int] | None, grads: list[Tensor | None]) -> None:
        plain = (type(g) is Tensor and g.layout is torch.strided and g.dtype != torch.float64 for g in grads)
        if indices is None and all(plain):
            # The usual case, every gradient present, dense, plain and narrow: the fused norms are stacked
            # straight into the slots (the same values as below, in two ops fewer and without the sorting).
            torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32), out=self.norms)
            return
        slots = self._slots if indices is None else [self._slots[i] for i in indices]
        if indices is None:
            self.norms.zero_()
        present = [(slot, g) for slot, g in zip(slots, grads, strict=True) if g is not None]
        if present:
            slots, grads = zip(*present, strict=True)
            grads = [_local_values(g) for g in grads]
            wide = [i for i, g in enumerate(grads) if g.dtype == torch.float64]
            narrow = [i for i, g in enumerate(grads) if g.dtype != torch.float64]
            if narrow:  # one fused kernel; float32 accumulation also for bf16/fp16 gradients
                norms = torch._foreach_norm([grads[i] for i in narrow], 2, dtype=torch.float32)
                torch._foreach_copy_([slots[i] for i in narrow], list(norms))
            for i in wide:
                slots[i].copy_(torch.linalg.vector_norm(grads[i]))


class ShardedGradientTaps(GradientTaps):
    """The taps under FSDP2 (``fully_shard``), where a hook on a sharded DTensor parameter never fires.

    For forward and backward, FSDP materialises each module's unsharded parameters: plain ``nn.Parameter``
    objects, the same ones step after step. A forward pre-hook on each FSDP module, which runs after FSDP's
    own unshard, finds them as the module's parameters that are not DTensors (those of nested FSDP modules are
    still sharded then) and hooks each once: the hook sees this rank's local gradient of every microbatch,
    before the reduce-scatter. The applied gradient is read from the local shards of the sharded ``.grad``;
    the squared norms are then summed over ranks (``reads_shards``).

    Hooks are found at the first forward after :meth:`attach`: attach before the forward of the first
    microbatch that should be measured.

    Args:
        parameters: the sharded parameters to watch, named by ``names`` (as in ``module.named_parameters()``).
        membership: as for :class:`GradientTaps`.
        names: the parameters' qualified names.
        fsdp_modules: ``(qualified name, module)`` of every module ``fully_shard`` was applied to.
    """

    reads_shards = True

    def __init__(
        self,
        parameters: list[nn.Parameter],
        membership: Tensor,
        names: list[str],
        fsdp_modules: list[tuple[str, nn.Module]],
    ):
        super().__init__(parameters, membership)
        self._index = {name: index for index, name in enumerate(names)}
        self._fsdp_modules = fsdp_modules
        self._pre_hooks: list[RemovableHandle] = []
        self._hooked: set[int] = set()  # ids of the unsharded parameters that carry a hook

    @property
    def attached(self) -> bool:
        return bool(self._pre_hooks)

    def attach(self) -> None:
        if not self._pre_hooks:
            self._pre_hooks = [
                module.register_forward_pre_hook(self._find_unsharded(f"{name}." if name else ""))
                for name, module in self._fsdp_modules
            ]

    def detach(self) -> None:
        for handle in self._pre_hooks:
            handle.remove()
        self._pre_hooks = []
        self._hooked = set()
        super().detach()

    def _find_unsharded(self, prefix: str):  # prefix: the module's qualified name and a dot
        def hook_unsharded_parameters(module: nn.Module, args: object) -> None:
            try:
                for name, parameter in module.named_parameters():
                    if isinstance(parameter, DTensor) or id(parameter) in self._hooked:
                        continue  # a nested FSDP module's (still sharded), or hooked at an earlier forward
                    index = self._index.get(prefix + name)
                    if index is not None:
                        self._hooked.add(id(parameter))
                        self._handles.append(parameter.register_hook(self._hook(index)))
            except Exception as error:  # never break the user's forward; the owner reports it
                self.error = error

        return hook_unsharded_parameters

