"""The backward of a linear layer split in two: B (∂L/∂X, now) and W (∂L/∂W, later).

For ``Y = X·Wᵀ + b`` with the incoming gradient ``G = ∂L/∂Y`` (tokens × out) the backward is two
independent matrix products::

    B:  ∂L/∂X = G·W          what the previous layer (and the previous pipeline stage) waits for
    W:  ∂L/∂W = Gᵀ·X,  ∂L/∂b = Σ_tokens G      needed only by the optimizer step

Autograd runs both at once. Zero-bubble pipeline schedules (Qi et al. 2023) run B on the critical path
and push W into the idle slots of the pipeline's cool-down, so a pipeline stage must be able to say
"this backward: input gradients only, remember the rest". That is :class:`WeightGradStore`:

    store = WeightGradStore()
    layer.weight_grad_store = store        # every ColumnParallelLinear, RowParallelLinear,
                                           # ReplicatedLinear, ParallelLMHead that should defer
    with store.defer():                    # B: the layers compute ∂L/∂X and queue closures
        outputs.backward(grad)
    ...
    store.run_oldest()                     # W: that micro-batch's ∂L/∂W, ∂L/∂b land in .grad

Each closure keeps ``G`` and ``X`` alive until W runs (the activation memory W needs: Table 1 of the
paper; ``G`` must not be a buffer someone overwrites before then — DeepSpeed's received gradient is,
so ``pipe_engine`` hands B a copy). At W it computes the products (under ``no_grad``, as autograd's
own backward does) and hands them to autograd, ``torch.autograd.backward(W_in, ∂L/∂W_in)``, for the very
tensor the layer multiplied by: a leaf Parameter accumulates into ``.grad`` exactly as it would have
in one backward (DeepSpeed's gradient hooks see it), and a weight that entered through ``f`` (a
replicated weight: identity forward, all-reduce backward) gets its TP all-reduce there. So after the
last W every ``.grad`` holds what one undivided backward would have left: gradient accumulation,
the tied-embedding all-reduce, clipping, ZeRO and the optimizer step see complete gradients.

Outside ``defer()`` — or with no store attached, ``weight_grad_store = None``, the default — nothing
is deferred: a layer without a store calls ``F.linear`` itself, bit for bit as before. The queue is
first in, first out: one entry per ``defer()`` block (a micro-batch's backward), in the order the
schedule ran its B passes.
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["WeightGradStore", "linear", "defer_or_compute"]

Grads = tuple[torch.Tensor | None, ...]


class WeightGradStore:
    """The weight-gradient work of the B passes, queued per micro-batch until its W pass."""

    def __init__(self) -> None:
        self.deferring = False
        self._open: list[Callable[[], None]] = []
        self._queue: deque[list[Callable[[], None]]] = deque()

    @contextmanager
    def defer(self) -> Iterator["WeightGradStore"]:
        """Inside: the layers queue their ∂L/∂W work; on exit it becomes one queue entry (even if empty,
        so that every B has its W)."""
        if self.deferring:
            raise RuntimeError("WeightGradStore.defer() is already active: one B pass at a time")
        self.deferring = True
        try:
            yield self
        finally:
            self.deferring = False
            self._queue.append(self._open)
            self._open = []

    def put(self, compute: Callable[[], Grads], targets: Sequence[torch.Tensor | None]) -> None:
        """Queue ``compute() -> (∂L/∂t for t in targets)``, to be accumulated into ``targets`` at W."""
        self._open.append(lambda: _accumulate(targets, compute))

    def run_oldest(self) -> None:
        """W: run the oldest queued B pass's weight-gradient work (accumulated into ``.grad``)."""
        if not self._queue:
            raise RuntimeError("a W pass ran with no deferred weight gradients queued: the schedule "
                               "must run each micro-batch's B (BackwardPass) before its W")
        for work in self._queue.popleft():
            work()

    def run_all(self) -> None:
        """Every queued W, oldest first (e.g. before an optimizer step that must see all gradients)."""
        while self._queue:
            self.run_oldest()

    def __len__(self) -> int:
        """Queued W passes (micro-batches whose B ran but not their W)."""
        return len(self._queue)


def _accumulate(targets: Sequence[torch.Tensor | None], compute: Callable[[], Grads]) -> None:
    with torch.no_grad():  # as inside autograd's backward: the products are not recorded
        grads = compute()
    pairs = [(t, g) for t, g in zip(targets, grads) if t is not None and g is not None]
    if pairs:  # one autograd call: leaves accumulate into .grad (hooks fire), f(W) all-reduces first
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def defer_or_compute(store: WeightGradStore | None, compute: Callable[[], Grads],
                     targets: Sequence[torch.Tensor | None]) -> Grads:
    """Inside a backward: ``compute()`` now, or (store deferring) queue it and return ``None`` grads."""
    if store is not None and store.deferring:
        store.put(compute, targets)
        return (None,) * len(targets)
    return compute()


class _Linear(torch.autograd.Function):
    """``Y = X·Wᵀ + b`` whose backward computes ∂L/∂X and either ∂L/∂W, ∂L/∂b or a closure for them."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.targets = store, (weight, bias)  # the tensors W accumulates into
        return F.linear(x, weight, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = grad.dtype  # under autocast the matmuls ran in grad's dtype; cast results back
        grad_x = grad.matmul(weight.to(dtype)).to(x.dtype) if need_x else None  # B: (..., in)

        def weight_grads() -> Grads:  # W
            g = grad.flatten(0, -2)  # (tokens, out)
            grad_w = (g.t() @ x.flatten(0, -2).to(dtype)).to(weight.dtype) if need_w else None
            grad_b = g.sum(0) if ctx.targets[1] is not None and need_b else None
            return grad_w, grad_b

        grad_w, grad_b = defer_or_compute(ctx.store, weight_grads, ctx.targets)
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           store: WeightGradStore | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with a store, its weight gradient can be deferred (see above)."""
    if store is None:
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias, store)
