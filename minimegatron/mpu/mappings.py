"""The communication of tensor parallelism: conjugate pairs of collectives, as autograd Functions.

Megatron (Shoeybi et al. 2019, §3) splits an MLP ``Z = GeLU(X·A)·B`` over ``p`` ranks as
``A = [A_1 … A_p]`` (by columns) and ``B = [B_1; …; B_p]`` (by rows), so that rank ``i`` computes
``Z_i = GeLU(X·A_i)·B_i`` with no communication and ``Z = Σ_i Z_i``. Two operators stitch it up:

* ``f`` = :func:`copy_to_tensor_model_parallel_region` — forward: identity (every rank gets the same
  ``X``); backward: all-reduce, because ``∂L/∂X = Σ_i ∂L_i/∂X`` sums the contributions of every rank
  that used ``X``.
* ``g`` = :func:`reduce_from_tensor_model_parallel_region` — forward: all-reduce (``Z = Σ_i Z_i``);
  backward: identity (``∂L/∂Z_i = ∂L/∂Z``, the same on every rank).

``f`` and ``g`` are *conjugate*: each one's backward is the other's forward. The same holds for split
and all-gather (:func:`scatter_to_tensor_model_parallel_region` / :func:`gather_from_...`).

Sequence parallelism (Korthikanti et al. 2022, §4.2.2) replaces the all-reduce of ``g`` by a
reduce-scatter along the sequence dim, and the identity of ``f`` by an all-gather along it:

* ``g``  = :func:`gather_from_sequence_parallel_region` — forward all-gather dim 0 ``(s/tp,b,h) →
  (s,b,h)``; backward reduce-scatter dim 0 (every rank's TP branch contributed to the full gradient).
* ``ḡ``  = :func:`reduce_scatter_to_sequence_parallel_region` — forward reduce-scatter dim 0
  ``(s,b,h) partial sums → (s/tp,b,h)``; backward all-gather dim 0.

Careful with the letters: the SP paper reuses ``g``/``ḡ`` for its own pair, and SP's ``g`` is an
*all-gather* that stands where TP's ``f`` stood (before the column-parallel layer), not TP's
all-reduce ``g``; SP's ``ḡ`` (reduce-scatter) is what stands where TP's ``g`` stood.

An all-reduce *is* a reduce-scatter followed by an all-gather, so SP moves the same bytes as plain TP
while the norms and dropouts between the two run on ``s/tp`` tokens only. A weight every rank holds
whole but applies to its own ``s/tp`` tokens (a norm's γ, β; a row-parallel bias) gets only a partial
gradient per rank; it enters through ``f`` too — ``f(γ)``: identity forward, all-reduce of ∂L/∂γ
backward — so the sum is autograd's own (``layers/norms.py``), in every engine.

Every function takes ``(x, state)`` and is the identity when ``state.tp == 1``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from minimegatron.compat import all_gather_single as _all_gather_single
from minimegatron.compat import reduce_scatter_single as _reduce_scatter_single
from minimegatron.mpu.state import ParallelState
from minimegatron.sizes import divide  # the one divisibility check (re-exported: mpu.mappings.divide)


# ---- the raw collectives (no autograd) ------------------------------------------------------------

def _all_reduce(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    x = x.clone()  # never modify a tensor autograd may still need
    dist.all_reduce(x, group=state.tp_group)
    return x


def _split_last_dim(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    part = divide(x.size(-1), state.tp, "last dim")
    return x.narrow(-1, state.tp_rank * part, part).contiguous()  # (..., h/tp)


def _gather_last_dim(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    out = _gather_first_dim(x, state)  # (tp·n, ..., h/tp): the rank slices stacked along dim 0
    return torch.cat(out.chunk(state.tp, dim=0), dim=-1)  # (n, ..., h)


def _split_first_dim(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    part = divide(x.size(0), state.tp, "sequence length (dim 0)")
    return x.narrow(0, state.tp_rank * part, part).contiguous()  # (s/tp, b, h)


def _gather_first_dim(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    out = torch.empty((state.tp * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous(), group=state.tp_group)
    return out  # (s, b, h)


def _reduce_scatter_first_dim(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    part = divide(x.size(0), state.tp, "sequence length (dim 0)")
    out = torch.empty((part,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x.contiguous(), group=state.tp_group)
    return out  # (s/tp, b, h)


# ---- autograd Functions: forward collective / backward collective --------------------------------

class _CopyToModelParallelRegion(torch.autograd.Function):
    """f: forward identity, backward all-reduce."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.state), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """g: forward all-reduce, backward identity."""

    @staticmethod
    def forward(ctx, x, state):
        return _all_reduce(x, state)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim. Backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return _split_last_dim(x, state)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.state), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-gather the last dim. Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return _gather_last_dim(x, state)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.state), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's chunk of dim 0. Backward: all-gather dim 0."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return _split_first_dim(x, state)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first_dim(grad, ctx.state), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward: all-gather dim 0. Backward: reduce-scatter dim 0 (or split, if the output grad is
    already complete on every rank, i.e. the consumer was not tensor-parallel)."""

    @staticmethod
    def forward(ctx, x, state, tensor_parallel_output_grad):
        ctx.state, ctx.tp_output_grad = state, tensor_parallel_output_grad
        return _gather_first_dim(x, state)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tp_output_grad:
            return _reduce_scatter_first_dim(grad, ctx.state), None, None
        return _split_first_dim(grad, ctx.state), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """ḡ: forward reduce-scatter dim 0, backward all-gather dim 0."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return _reduce_scatter_first_dim(x, state)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first_dim(grad, ctx.state), None


# ---- the public functions (identity at tp == 1) ---------------------------------------------------

def copy_to_tensor_model_parallel_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Megatron's f — enter a TP region: fwd identity, bwd all-reduce over the TP group."""
    return x if state.tp == 1 else _CopyToModelParallelRegion.apply(x, state)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Megatron's g — leave a TP region: fwd all-reduce (sum of partial results), bwd identity."""
    return x if state.tp == 1 else _ReduceFromModelParallelRegion.apply(x, state)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """(..., h) → (..., h/tp), this rank's slice; bwd all-gather the last dim."""
    return x if state.tp == 1 else _ScatterToModelParallelRegion.apply(x, state)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """(..., h/tp) → (..., h), all-gather the last dim; bwd keep this rank's slice."""
    return x if state.tp == 1 else _GatherFromModelParallelRegion.apply(x, state)


def scatter_to_sequence_parallel_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """(s, b, h) → (s/tp, b, h), this rank's contiguous chunk; bwd all-gather dim 0."""
    return x if state.tp == 1 else _ScatterToSequenceParallelRegion.apply(x, state)


def gather_from_sequence_parallel_region(x: torch.Tensor, state: ParallelState,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """SP's g: (s/tp, b, h) → (s, b, h), all-gather dim 0.

    Backward reduce-scatters dim 0 when the output feeds a tensor-parallel layer (each rank holds a
    partial ∂L/∂X that must be summed); with ``tensor_parallel_output_grad=False`` (the consumer is
    replicated, so every rank already has the full gradient) it only keeps this rank's chunk.
    """
    if state.tp == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, state, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """SP's ḡ: (s, b, h) partial sums → (s/tp, b, h) of the total; bwd all-gather dim 0."""
    return x if state.tp == 1 else _ReduceScatterToSequenceParallelRegion.apply(x, state)
