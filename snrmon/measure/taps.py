"""Per-group squared gradient norms of each backward pass, without keeping a copy of any gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

# Gradients whose norms are taken with float32 accumulation in one fused kernel; any other (float64, complex)
# gets its own norm in its own precision.
NARROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _local_values(grad: Tensor) -> Tensor:
    """What of ``grad`` this process holds: the values of a sparse gradient, the local shard of a DTensor."""
    if isinstance(grad, DTensor):
        return grad.to_local()
    return grad.coalesce()._values() if grad.is_sparse else grad


def several_gradients_message(calls: int) -> str:
    """Why a parameter's hook ran ``calls`` > 1 times where one backward was expected."""
    # Reentrant activation checkpointing delivers a parameter's gradient in parts; the norm of the sum cannot
    # be had from the parts' norms without keeping a copy.
    return (
        f"a parameter received {calls} gradients where one backward was expected: several backwards without"
        " GradientMeter.after_backward() between them (call it once after each microbatch's backward; a"
        " `torch.autograd.grad` before the backward counts too: then call before_backward() right before"
        " it), or a backward that delivers a gradient in parts (reentrant activation checkpointing: use"
        " `use_reentrant=False`)"
    )


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
        # Runs once per parameter per microbatch: it does as little as it can (the checks only where the usual
        # norm fails), and what it uses is bound here, not looked up at each call.
        slot, calls = self._slots[index], self._calls
        norm, float32 = torch.linalg.vector_norm, torch.float32

        def record_norm(grad: Tensor) -> None:
            try:
                calls[index] += 1
                # The usual gradient: dense, float32 or narrower, without a graph. Any other makes this
                # raise before it writes anything (sparse: not implemented; float64: a narrowing dtype; a
                # graph, from `create_graph=True`: `out=` under autograd).
                norm(grad, dtype=float32, out=slot)
            except Exception:
                self._record_unusual_norm(slot, grad)

        return record_norm

    def _record_unusual_norm(self, slot: Tensor, grad: Tensor) -> None:
        """The norm of a sparse or float64 gradient, or of one with a graph (a gradient penalty)."""
        try:
            if grad.is_sparse:
                grad = grad.coalesce()._values()
            if grad.requires_grad:
                grad = grad.detach()
            if grad.dtype == torch.float64 or grad.is_complex():  # (a complex one: the norm of ℝ²ⁿ, real)
                slot.copy_(torch.linalg.vector_norm(grad))
            else:
                torch.linalg.vector_norm(grad, dtype=torch.float32, out=slot)
        except Exception as error:  # never break the user's backward; the owner reports it
            self.error = error

    def start_backward(self) -> None:
        """Clear the slots: a parameter that gets no gradient in this backward then counts as zero."""
        self.norms.zero_()
        self._calls[:] = self._no_calls

    def forget_calls(self) -> None:
        """Clear the hook calls only (the slots are cleared by the next :meth:`start_backward`)."""
        self._calls[:] = self._no_calls

    def most_calls(self) -> int:
        """The most hook calls of one parameter since the last clearing: 0 when no backward reached the
        watched parameters, 1 after one backward, more after several (or a gradient delivered in parts)."""
        return max(self._calls)

    def _check_single_delivery(self) -> None:
        if max(self._calls) > 1:
            raise RuntimeError(several_gradients_message(max(self._calls)))

    def backward_sq_norms(self, scale: Tensor | float = 1.0) -> Tensor:
        """Per-group squared norms of the last backward's gradient, divided by ``scale`` (AMP loss scale)."""
        self._check_single_delivery()
        norms = self.norms.double()
        if not (isinstance(scale, float) and scale == 1.0):  # (x / 1.0 is x: one op fewer without a scaler)
            norms = norms / scale
        return self.membership @ norms.square()

    def add_backward_to_window(self, weight: float | Tensor) -> None:
        """Add weight × the last backward's squared norms to the step's window (one op for a number). The
        caller checks first that one backward ran (:meth:`most_calls` is 1)."""
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
        grads = [p.grad for p in self.parameters]
        plain = (type(g) is Tensor and g.layout is torch.strided and g.dtype in NARROW_DTYPES for g in grads)
        if all(plain):
            # The usual case, every gradient present, dense, plain and narrow: the fused norms are stacked
            # straight into the slots (the same values as below, in two ops fewer and without the sorting).
            torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32), out=self.norms)
            return self.backward_sq_norms(scale)
        pairs = zip(self._slots, self.parameters, strict=True)
        present = [(slot, p.grad) for slot, p in pairs if p.grad is not None]
        self.norms.zero_()
        if present:
            slots, grads = zip(*present, strict=True)
            grads = [_local_values(g) for g in grads]
            narrow = [i for i, g in enumerate(grads) if g.dtype in NARROW_DTYPES]
            wide = [i for i, g in enumerate(grads) if g.dtype not in NARROW_DTYPES]  # float64, complex
            if narrow:  # one fused kernel; float32 accumulation also for bf16/fp16 gradients
                norms = torch._foreach_norm([grads[i] for i in narrow], 2, dtype=torch.float32)
                torch._foreach_copy_([slots[i] for i in narrow], list(norms))
            for i in wide:
                slots[i].copy_(torch.linalg.vector_norm(grads[i]))
        return self.backward_sq_norms(scale)


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
