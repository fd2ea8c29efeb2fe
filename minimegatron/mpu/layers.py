"""Tensor-parallel linear layers: column-parallel, row-parallel, and replicated inside a TP region.

A linear layer computes ``Y = X·A + b`` with ``A = Wᵀ`` of shape (in, out); torch stores ``W`` as
(out, in). Megatron (Shoeybi et al. 2019, §3) splits ``A`` two ways over ``p`` TP ranks:

* **Column-parallel**: ``A = [A_1 … A_p]``, so ``Y = [X·A_1 … X·A_p]``; rank i holds rows
  ``out/p`` of ``W`` and computes its slice ``Y_i = X·A_i + b_i`` — no communication forward (``f``
  is the identity), an all-reduce of ``∂L/∂X`` backward.
* **Row-parallel**: ``A = [A_1; …; A_p]`` and ``X = [X_1 … X_p]``, so ``Y = Σ_i X_i·A_i``; rank i
  holds columns ``in/p`` of ``W``, computes a partial sum, and ``g`` all-reduces it. The bias is
  added once, after the reduction (adding it on every rank would count it p times).

Column then Row (the MLP, attention) needs exactly one all-reduce forward and one backward: the
column output ``Y_i`` is exactly the row layer's input slice ``X_i``.

* **Replicated** (:class:`ReplicatedLinear`): the whole ``A`` on every rank, for a matrix too small to
  split (GQA/MQA key/value heads when ``num_kv_heads < tp``). Each rank uses only part of ``Y``, so
  both ``∂L/∂X`` and ``∂L/∂A`` are partial sums per rank: ``X`` *and* ``A`` enter through ``f``
  (identity forward, all-reduce backward).

The vocab-parallel embedding and LM head (the same split, over the vocabulary) are in ``embedding.py``.

Under sequence parallelism the column layer's input arrives as the (s/tp, b, h) shard and is
all-gathered first; :class:`_LinearWithSequenceParallelGather` keeps only the shard for backward and
gathers it again there (Korthikanti et al. 2022, §4.2.2), as Megatron does. The row layer's output
is the (s/tp, b, out) shard; its replicated bias, added there, enters through ``f`` (its gradient is
a partial sum over this rank's rows, all-reduced over TP in backward).

Initialisation rule: every layer draws its FULL (unpadded) master weight on the CPU from torch's
default generator, then keeps its shard. So after ``torch.manual_seed(s)`` on every rank, a TP=k
layer holds exactly the shards of the TP=1 layer built with seed s (independent of k).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minimegatron.mpu.mappings import (_gather_first_dim, _reduce_scatter_first_dim,
                                       copy_to_tensor_model_parallel_region,
                                       gather_from_tensor_model_parallel_region,
                                       reduce_from_tensor_model_parallel_region,
                                       reduce_scatter_to_sequence_parallel_region,
                                       scatter_to_tensor_model_parallel_region)
from minimegatron.mpu.state import ParallelState
from minimegatron.mpu.weight_grad import WeightGradStore, defer_or_compute, linear
from minimegatron.sizes import divide

InitMethod = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "ReplicatedLinear",
           "linear_with_sequence_parallel_gather", "shard_weight", "gather_weight", "init_normal"]


def init_normal(std: float = 0.02) -> InitMethod:
    """Megatron's default: W ~ N(0, std²), in place."""
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def _check_split(size: int, tp: int, what: str, stride: int = 1) -> int:
    """size / (tp·stride) blocks, or a ValueError naming the size, the TP size and the fix
    (:func:`minimegatron.sizes.divide`, with the stride in the message when there is one)."""
    parts = tp * stride
    how = f"tensor-parallel size {tp}" + (f" × stride {stride} = {parts}" if stride > 1 else "")
    return divide(size, parts, what, by=how,
                  fix=f"every TP rank must hold an equal slice; make {what} a multiple of {parts} or "
                      "pick a tensor-parallel size that divides it")


def shard_weight(full: torch.Tensor, dim: int, tp_rank: int, tp: int, stride: int = 1) -> torch.Tensor:
    """This rank's shard of ``full`` along ``dim``.

    With ``stride=k`` the dim is seen as k equal blocks (fused [Q; K; V] for k=3, [K; V] for k=2) and
    the rank takes its 1/tp of every block: ``[Q_i; K_i; V_i]``, so each rank gets whole q, k and v
    slices instead of, say, all of Q.
    """
    dim = dim % full.dim()
    _check_split(full.size(dim), tp, f"size of dim {dim}", stride)
    blocks = full.chunk(stride, dim)  # stride × (…, n/stride, …)
    return torch.cat([b.chunk(tp, dim)[tp_rank] for b in blocks], dim).contiguous()  # (…, n/tp, …)


def gather_weight(shard: torch.Tensor, dim: int, state: ParallelState, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_weight`: all-gather the shards over TP and undo the striding (detached)."""
    dim = dim % shard.dim()
    x = shard.detach().movedim(dim, 0).contiguous()  # (n/tp, …)
    block = _check_split(x.size(0), 1, f"shard size of dim {dim}", stride)
    full = _gather_first_dim(x, state) if state.tp > 1 else x  # (tp·n/tp, …), rank-major
    full = full.view(state.tp, stride, block, *x.shape[1:]).transpose(0, 1)  # (stride, tp, n/(tp·stride), …)
    return full.reshape(-1, *x.shape[1:]).movedim(0, dim)  # (…, n, …) block-major


def _as_param(t: torch.Tensor, dtype, device, split: bool, partition_dim: int = -1,
              stride: int = 1) -> nn.Parameter:
    """A Parameter with Megatron's attributes (``tensor_model_parallel``, ``partition_dim``, stride)."""
    param = nn.Parameter(t.to(device=device, dtype=dtype or torch.get_default_dtype()))
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = split, partition_dim, stride
    return param


def _master_weight(full_shape: tuple[int, ...], init_method: InitMethod) -> torch.Tensor:
    """The full master weight: fp32, on the CPU, drawn from torch's default generator."""
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    return master


def _parallel_param(full_shape: tuple[int, ...], partition_dim: int, state: ParallelState,
                    init_method: InitMethod, dtype, device, stride: int = 1,
                    pad_dim0_to: int | None = None) -> nn.Parameter:
    """Draw the full master weight, zero-pad dim 0, keep this rank's shard."""
    master = _master_weight(full_shape, init_method)
    if pad_dim0_to is not None and pad_dim0_to > full_shape[0]:
        zeros = master.new_zeros(pad_dim0_to - full_shape[0], *full_shape[1:])
        master = torch.cat([master, zeros])  # (V_pad, h): padded rows are zero
    shard = shard_weight(master, partition_dim, state.tp_rank, state.tp, stride)
    return _as_param(shard, dtype, device, True, partition_dim, stride)


def _replicated_param(full_shape: tuple[int, ...], init_method: InitMethod, dtype, device) -> nn.Parameter:
    """The same draw as :func:`_parallel_param`, kept whole: every TP rank holds all of it."""
    return _as_param(_master_weight(full_shape, init_method), dtype, device, False)


def _replicated_zeros(n: int, dtype, device, sequence_parallel: bool = False) -> nn.Parameter:
    param = _replicated_param((n,), nn.init.zeros_, dtype, device)
    param.sequence_parallel = sequence_parallel  # Megatron's mark: added on s/tp tokens (grad: via f)
    return param


class _LinearWithSequenceParallelGather(torch.autograd.Function):
    """``Y = all-gather(x)·Wᵀ + b`` for an (s/tp, b, in) shard ``x``, keeping only the shard.

    Forward: all-gather dim 0 ``(s/tp, b, in) -> X (s, b, in)``, then ``X·Wᵀ + b`` (out/tp columns).
    Backward: all-gather the saved shard *again* to rebuild ``X``, then
    ``∂L/∂W = (∂L/∂Y)ᵀ·X``, ``∂L/∂b = Σ_{s,b} ∂L/∂Y`` and ``∂L/∂x = reduce-scatter(∂L/∂Y·W)`` dim 0
    (every rank's column slice contributed to the whole ∂L/∂X; this rank keeps its s/tp rows).

    Memory: ``F.linear`` on the gathered ``X`` would keep all ``s·b·in`` elements for the weight
    gradient; this keeps ``s·b·in/tp`` — that is what turns the QKV and fc1 inputs into ``sbh/t`` in
    Korthikanti et al. 2022 (§4.2.2). Price: one more all-gather per column layer in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, state, store=None):
        ctx.state, ctx.has_bias, ctx.store, ctx.targets = state, bias is not None, store, (weight, bias)
        ctx.save_for_backward(x, weight)  # the (s/tp, b, in) shard, not the gathered input
        full = _gather_first_dim(x, state)  # (s/tp, b, in) -> (s, b, in)
        return F.linear(full, weight, bias)  # (s, b, out/tp); full is freed on return

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = grad.dtype  # under autocast the matmuls ran in grad's dtype; cast results back
        grad_x = None
        if need_x:  # this rank's partial ∂L/∂X (s, b, in), reduce-scattered to (s/tp, b, in)
            grad_x = _reduce_scatter_first_dim(grad.matmul(weight.to(dtype)), ctx.state).to(x.dtype)

        def weight_grads():  # ∂L/∂W, ∂L/∂b: now, or deferred to a zero-bubble W pass (weight_grad.py)
            grad_w = grad_b = None
            if need_w:
                full = _gather_first_dim(x, ctx.state).to(dtype)  # (s, b, in): the re-gather
                grad_w = (grad.flatten(0, -2).t() @ full.flatten(0, -2)).to(weight.dtype)  # (out/tp, in)
            if ctx.has_bias and need_b:
                grad_b = grad.flatten(0, -2).sum(0)  # (out/tp,)
            return grad_w, grad_b
        return (grad_x, *defer_or_compute(ctx.store, weight_grads, ctx.targets), None, None)


def linear_with_sequence_parallel_gather(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                         state: ParallelState, store: WeightGradStore | None = None):
    """(s/tp, b, in) -> (s, b, out/tp), saving only the shard; ``linear`` at tp == 1 (``store``: above)."""
    if state.tp == 1:
        return linear(x, weight, bias, store)
    return _LinearWithSequenceParallelGather.apply(x, weight, bias, state, store)


class ColumnParallelLinear(nn.Module):
    """``Y = X·A + b``, ``A = [A_1 … A_p]`` split by output columns; rank i holds W_i (out/p, in).

    Forward: f (identity) — or under sequence parallelism the all-gather of the (s/tp, b, in) input —
    then ``X·A_i + b_i``; with ``gather_output`` the slices are all-gathered to (…, out).
    Backward: all-reduce of ∂L/∂X (or reduce-scatter to (s/tp, b, in) under SP, where only the
    shard is kept and re-gathered for ∂L/∂W: :class:`_LinearWithSequenceParallelGather`).
    """
    weight_grad_store: WeightGradStore | None = None  # set to defer ∂L/∂W (mpu/weight_grad.py)

    def __init__(self, input_size: int, output_size: int, *, state: ParallelState, bias: bool = True,
                 gather_output: bool = True, stride: int = 1, sequence_parallel: bool = False,
                 init_method: InitMethod | None = None, dtype=None, device=None) -> None:
        super().__init__()
        self.state, self.input_size, self.output_size = state, input_size, output_size
        self.gather_output, self.stride, self.sequence_parallel = gather_output, stride, sequence_parallel
        self.output_size_per_partition = _check_split(
            output_size, state.tp, "ColumnParallelLinear output_size", stride) * stride
        self.weight = _parallel_param((output_size, input_size), 0, state, init_method or init_normal(),
                                      dtype, device, stride)  # (out/tp, in)
        self.bias = None
        if bias:
            self.bias = _parallel_param((output_size,), 0, state, nn.init.zeros_, dtype, device, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # (s/tp, b, in) -> (s, b, out/tp), keeps the shard only
            y = linear_with_sequence_parallel_gather(x, self.weight, self.bias, self.state, self.weight_grad_store)
        else:
            x = copy_to_tensor_model_parallel_region(x, self.state)  # (…, in), f
            y = linear(x, self.weight, self.bias, self.weight_grad_store)  # (…, out/tp)
        if not self.gather_output:
            return y
        y = gather_from_tensor_model_parallel_region(y, self.state)  # (…, out), rank-major
        if self.stride > 1 and self.state.tp > 1:  # [Q0 K0 V0 Q1 K1 V1] -> [Q0 Q1 K0 K1 V0 V1]
            block = self.output_size // (self.stride * self.state.tp)
            y = y.unflatten(-1, (self.state.tp, self.stride, block))  # (…, tp, stride, out/(tp·stride))
            y = y.transpose(-3, -2).flatten(-3)  # (…, out)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (/{self.state.tp} per rank), "
                f"stride={self.stride}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``Y = Σ_i X_i·A_i + b``, ``A = [A_1; …; A_p]`` split by input rows; rank i holds W_i (out, in/p).

    Forward: (split X unless ``input_is_parallel``), partial product, then g = all-reduce — or under
    sequence parallelism ḡ = reduce-scatter to (s/tp, b, out) — then the bias, once.
    Backward: identity for ∂L/∂Y (all-gather of it under SP). Under SP the bias is added to this
    rank's s/tp rows only, so ``∂L/∂b = Σ_r Σ_{rows of r} ∂L/∂Y_r``: it enters through ``f`` (identity
    forward, all-reduce of its gradient backward), as ReplicatedLinear's weight does.
    """
    weight_grad_store: WeightGradStore | None = None  # set to defer ∂L/∂W (mpu/weight_grad.py)

    def __init__(self, input_size: int, output_size: int, *, state: ParallelState, bias: bool = True,
                 input_is_parallel: bool = False, sequence_parallel: bool = False,
                 init_method: InitMethod | None = None, dtype=None, device=None) -> None:
        super().__init__()
        self.state, self.input_size, self.output_size = state, input_size, output_size
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.input_size_per_partition = _check_split(input_size, state.tp, "RowParallelLinear input_size")
        self.weight = _parallel_param((output_size, input_size), 1, state, init_method or init_normal(),
                                      dtype, device)  # (out, in/tp)
        self.bias = _replicated_zeros(output_size, dtype, device, sequence_parallel) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.state)  # (…, in) -> (…, in/tp)
        y = linear(x, self.weight, None, self.weight_grad_store)  # (…, out): this rank's partial sum
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.state)  # (s, b, out) -> (s/tp, b, out)
        else:
            y = reduce_from_tensor_model_parallel_region(y, self.state)  # (…, out), g
        if self.bias is None:
            return y
        bias = self.bias
        if self.sequence_parallel:  # added to this rank's s/tp rows only: f sums its gradient over TP
            bias = copy_to_tensor_model_parallel_region(bias, self.state)
        return y + bias  # (…, out) or (s/tp, b, out)

    def extra_repr(self) -> str:
        return (f"in={self.input_size} (/{self.state.tp} per rank), out={self.output_size}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


class ReplicatedLinear(nn.Module):
    """``Y = X·A + b`` with the whole ``A`` (out, in) on every TP rank, inside a TP region.

    For a weight too small to split, of which each rank then uses only part of ``Y`` (the kv heads
    its queries read). Every rank's ∂L/∂A and ∂L/∂X are partial sums, so both enter through ``f``:
    Forward: identity for ``A``, ``b`` and ``X`` — or under sequence parallelism the all-gather of the
    (s/tp, b, in) input — then ``X·Aᵀ + b`` (s, b, out). Backward: all-reduce of ∂L/∂A, ∂L/∂b and
    ∂L/∂X (reduce-scatter of ∂L/∂X to (s/tp, b, in) under SP).
    Parameters: ``tensor_model_parallel = False``, drawn exactly like the TP=1 column layer.
    """
    weight_grad_store: WeightGradStore | None = None  # set to defer ∂L/∂W (mpu/weight_grad.py)

    def __init__(self, input_size: int, output_size: int, *, state: ParallelState, bias: bool = True,
                 sequence_parallel: bool = False, init_method: InitMethod | None = None,
                 dtype=None, device=None) -> None:
        super().__init__()
        self.state, self.input_size, self.output_size = state, input_size, output_size
        self.sequence_parallel = sequence_parallel
        self.weight = _replicated_param((output_size, input_size), init_method or init_normal(),
                                        dtype, device)  # (out, in), whole
        self.bias = _replicated_param((output_size,), nn.init.zeros_, dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tensor_model_parallel_region(self.weight, self.state)  # f: sums ∂L/∂A
        bias = None if self.bias is None else copy_to_tensor_model_parallel_region(self.bias, self.state)
        if self.sequence_parallel:  # (s/tp, b, in) -> (s, b, out), keeps the shard only
            return linear_with_sequence_parallel_gather(x, weight, bias, self.state, self.weight_grad_store)
        x = copy_to_tensor_model_parallel_region(x, self.state)  # (…, in), f
        return linear(x, weight, bias, self.weight_grad_store)  # (…, out)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (whole on each of {self.state.tp} ranks), "
                f"sequence_parallel={self.sequence_parallel}")
