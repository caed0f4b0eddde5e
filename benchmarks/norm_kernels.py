"""What one gradient-norm read costs on the named model's own gradients (4 layers, 128 wide, 8 x 64 bytes).

Two settings, one torch thread:

1. *Warm*: the 52 gradients of one backward, kept, read in a loop of one kernel per tensor (the cost of the
   kernel and its dispatch when code and data are in cache), for each candidate kernel, with its largest
   relative error against a float64 sum of squares.
2. *In the backward*: a hook body on each of the 52 parameters during the model's backward (gradients
   accumulating, as on microbatches 2..K), each call timed with the thread's CPU clock, against a do-nothing
   body timed the same way (rounds interleaved; the median difference per microbatch). The timer's system call
   between the backward's kernels leaves the caches colder than they would be without it, so these figures
   are upper bounds; their differences are what to compare.

    python benchmarks/norm_kernels.py [--rounds 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from char_gpt import CharGPT  # noqa: E402

NORM, FLOAT32 = torch.linalg.vector_norm, torch.float32


def kernels(slot_of):
    """Candidate ways to write a gradient's norm (or squared norm) into a float32 slot."""

    def vector_norm(grad, i):
        NORM(grad, dtype=FLOAT32, out=slot_of[i])

    def vector_norm_no_dtype(grad, i):
        NORM(grad, out=slot_of[i])

    def dot(grad, i):
        torch.dot(grad.view(-1), grad.view(-1), out=slot_of[i])

    def vecdot(grad, i):
        flat = grad.view(-1)
        torch.linalg.vecdot(flat, flat, out=slot_of[i])

    def square_sum(grad, i):
        slot_of[i].copy_((grad * grad).sum())

    squared = {"dot", "vecdot", "square_sum"}
    candidates = (vector_norm, vector_norm_no_dtype, dot, vecdot, square_sum)
    return {f.__name__: (f, f.__name__ in squared) for f in candidates}


def hook_bodies(slot_of, calls):
    """The hook bodies compared inside the backward: main's before this round, its kernel alone, and now."""

    def before(grad, i):  # 425b1fe: the checks on every call
        calls[i] += 1
        if grad.is_sparse:
            grad = grad.coalesce()._values()
        if grad.requires_grad:
            grad = grad.detach()
        if grad.dtype == torch.float64:
            slot_of[i].copy_(NORM(grad))
        else:
            NORM(grad, dtype=FLOAT32, out=slot_of[i])

    def checks_only(grad, i):
        calls[i] += 1
        if grad.is_sparse:
            grad = grad.coalesce()._values()
        if grad.requires_grad:
            grad = grad.detach()
        if grad.dtype == torch.float64:
            pass

    def kernel_only(grad, i):
        NORM(grad, dtype=FLOAT32, out=slot_of[i])

    def now(grad, i):  # this round: the checks only where the norm raises
        try:
            calls[i] += 1
            NORM(grad, dtype=FLOAT32, out=slot_of[i])
        except Exception:
            before(grad, i)

    return {f.__name__: f for f in (before, checks_only, kernel_only, now)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CharGPT(n_layer=4, n_embd=128, block_size=64)
    x, y = torch.randint(0, 256, (8, 64)), torch.randint(0, 256, (8, 64))
    parameters = list(model.parameters())
    slots = torch.zeros(len(parameters))
    slot_of = list(slots.unbind())

    def loss():
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    # 1. warm
    grads: list[torch.Tensor] = []
    handles = [p.register_hook(lambda g: grads.append(g.clone())) for p in parameters]
    loss().backward()
    for handle in handles:
        handle.remove()
    exact = torch.stack([g.double().square().sum() for g in grads])
    small = [i for i, g in enumerate(grads) if g.numel() <= 512]
    large = [i for i, g in enumerate(grads) if g.numel() > 512]
    print(f"{len(grads)} gradients: {len(small)} of <= 512 values, {len(large)} of 8,192-65,536")
    print("warm, µs per call:      small   large   all 52   max rel. error of |g|^2")
    for name, (kernel, squared) in kernels(slot_of).items():

        def loop(indices, kernel=kernel):
            start = time.thread_time_ns()
            for i in indices:
                kernel(grads[i], i)
            return time.thread_time_ns() - start

        times = {"small": [], "large": [], "all": []}
        for _ in range(300):
            times["small"].append(loop(small))
            times["large"].append(loop(large))
            times["all"].append(loop(range(len(grads))))
        sq = slots.double() if squared else slots.double() ** 2
        error = ((sq - exact).abs() / exact).max().item()
        print(f"  {name:<20} {statistics.median(times['small']) / 1e3 / len(small):7.2f}"
              f" {statistics.median(times['large']) / 1e3 / len(large):7.2f}"
              f" {statistics.median(times['all']) / 1e3:8.1f}   {error:.1e}")  # fmt: skip

    # 2. in the backward
    calls = [0] * len(parameters)
    spent = [0]

    def timed(body, i):
        def hook(grad):
            start = time.thread_time_ns()
            body(grad, i)
            spent[0] += time.thread_time_ns() - start

        return hook

    bodies = {"nothing": lambda grad, i: None, **hook_bodies(slot_of, calls)}
    hooks = {name: [timed(body, i) for i in range(len(parameters))] for name, body in bodies.items()}

    def backward(name):
        handles = [p.register_hook(h) for p, h in zip(parameters, hooks[name], strict=True)]
        value = loss()
        spent[0] = 0
        value.backward()
        for handle in handles:
            handle.remove()
        return spent[0]

    for _ in range(5):
        for name in hooks:
            backward(name)
    times = {name: [] for name in hooks}
    for _ in range(args.rounds):
        for name in hooks:
            times[name].append(backward(name))
    print(f"in the backward, µs per microbatch (52 hooks) above a do-nothing body, {args.rounds} rounds:")
    for name in bodies:
        if name != "nothing":
            diffs = sorted(a - b for a, b in zip(times[name], times["nothing"], strict=True))
            quartiles = f"{diffs[len(diffs) // 4] / 1e3:.0f}-{diffs[3 * len(diffs) // 4] / 1e3:.0f}"
            print(f"  {name:<20} {statistics.median(diffs) / 1e3:7.0f}   (quartiles {quartiles})")


if __name__ == "__main__":
    main()
