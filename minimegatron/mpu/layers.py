"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding and LM head.

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

Under sequence parallelism the column layer's input arrives as the (s/tp, b, h) shard and is
all-gathered first; :class:`_LinearWithSequenceParallelGather` keeps only the shard for backward and
gathers it again there (Korthikanti et al. 2022, §4.2.2), as Megatron does.

Initialisation rule: every layer draws its FULL (unpadded) master weight on the CPU from torch's
default generator, then keeps its shard. So after ``torch.manual_seed(s)`` on every rank, a TP=k
layer holds exactly the shards of the TP=1 layer built with seed s (independent of k).
"""
from __future__ import annotations

import math
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

InitMethod = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "ParallelLMHead",
           "linear_with_sequence_parallel_gather",
           "shard_weight", "gather_weight", "init_normal", "pad_vocab_size", "vocab_range"]


def init_normal(std: float = 0.02) -> InitMethod:
    """Megatron's default: W ~ N(0, std²), in place."""
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def _check_split(size: int, tp: int, what: str, stride: int = 1) -> int:
    """size / (tp·stride) blocks, or a ValueError naming the size, the TP size and the fix."""
    parts = tp * stride
    if size % parts != 0:
        how = f"tensor-parallel size {tp}" + (f" × stride {stride} = {parts}" if stride > 1 else "")
        raise ValueError(f"{what}={size} is not divisible by {how}: every TP rank must "
                         f"hold an equal slice; make {what} a multiple of {parts} or pick a "
                         f"tensor-parallel size that divides it")
    return size // parts


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


def _parallel_param(full_shape: tuple[int, ...], partition_dim: int, state: ParallelState,
                    init_method: InitMethod, dtype, device, stride: int = 1,
                    pad_dim0_to: int | None = None) -> nn.Parameter:
    """Draw the full master weight (fp32, CPU, default generator), zero-pad dim 0, keep this shard."""
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    if pad_dim0_to is not None and pad_dim0_to > full_shape[0]:
        zeros = master.new_zeros(pad_dim0_to - full_shape[0], *full_shape[1:])
        master = torch.cat([master, zeros])  # (V_pad, h): padded rows are zero
    shard = shard_weight(master, partition_dim, state.tp_rank, state.tp, stride)
    param = nn.Parameter(shard.to(device=device, dtype=dtype or torch.get_default_dtype()))
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, partition_dim, stride
    return param


def _replicated_zeros(n: int, dtype, device, sequence_parallel: bool = False) -> nn.Parameter:
    param = nn.Parameter(torch.zeros(n, dtype=dtype or torch.get_default_dtype(), device=device))
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = False, -1, 1
    if sequence_parallel:
        param.sequence_parallel = True  # its grad is partial per rank: allreduce_sequence_parallel_gradients
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
    def forward(ctx, x, weight, bias, state):
        ctx.state, ctx.has_bias = state, bias is not None
        ctx.save_for_backward(x, weight)  # the (s/tp, b, in) shard, not the gathered input
        full = _gather_first_dim(x, state)  # (s/tp, b, in) -> (s, b, in)
        return F.linear(full, weight, bias)  # (s, b, out/tp); full is freed on return

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        dtype = grad.dtype  # under autocast the matmuls ran in grad's dtype; cast results back
        if need_x:
            grad_full = grad.matmul(weight.to(dtype))  # (s, b, in): this rank's partial ∂L/∂X
            grad_x = _reduce_scatter_first_dim(grad_full, ctx.state).to(x.dtype)  # (s/tp, b, in)
        if need_w:
            full = _gather_first_dim(x, ctx.state).to(dtype)  # (s, b, in): the re-gather
            grad_w = (grad.flatten(0, -2).t() @ full.flatten(0, -2)).to(weight.dtype)  # (out/tp, in)
        if ctx.has_bias and need_b:
            grad_b = grad.flatten(0, -2).sum(0)  # (out/tp,)
        return grad_x, grad_w, grad_b, None


def linear_with_sequence_parallel_gather(x: torch.Tensor, weight: torch.Tensor,
                                         bias: torch.Tensor | None, state: ParallelState) -> torch.Tensor:
    """(s/tp, b, in) -> (s, b, out/tp), saving only the shard; ``F.linear`` at tp == 1."""
    if state.tp == 1:
        return F.linear(x, weight, bias)
    return _LinearWithSequenceParallelGather.apply(x, weight, bias, state)


class ColumnParallelLinear(nn.Module):
    """``Y = X·A + b``, ``A = [A_1 … A_p]`` split by output columns; rank i holds W_i (out/p, in).

    Forward: f (identity) — or under sequence parallelism the all-gather of the (s/tp, b, in) input —
    then ``X·A_i + b_i``; with ``gather_output`` the slices are all-gathered to (…, out).
    Backward: all-reduce of ∂L/∂X (or reduce-scatter to (s/tp, b, in) under SP, where only the
    shard is kept and re-gathered for ∂L/∂W: :class:`_LinearWithSequenceParallelGather`).
    """

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
            y = linear_with_sequence_parallel_gather(x, self.weight, self.bias, self.state)
        else:
            x = copy_to_tensor_model_parallel_region(x, self.state)  # (…, in), f
            y = F.linear(x, self.weight, self.bias)  # (…, out/tp)
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
    Backward: identity for ∂L/∂Y (all-gather of it under SP).
    """

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
        y = F.linear(x, self.weight)  # (…, out): this rank's partial sum
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.state)  # (s, b, out) -> (s/tp, b, out)
        else:
            y = reduce_from_tensor_model_parallel_region(y, self.state)  # (…, out), g
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.input_size} (/{self.state.tp} per rank), out={self.output_size}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Round the vocab up to a multiple of make_vocab_size_divisible_by·tp (Megatron's padding)."""
    if make_vocab_size_divisible_by < 1:
        raise ValueError(f"make_vocab_size_divisible_by={make_vocab_size_divisible_by} must be >= 1")
    m = make_vocab_size_divisible_by * tp
    return m * math.ceil(vocab_size / m)


def vocab_range(padded_vocab_size: int, tp_rank: int, tp: int) -> tuple[int, int]:
    """[start, end) of the vocab rows rank ``tp_rank`` holds."""
    per = _check_split(padded_vocab_size, tp, "padded vocab size")
    return tp_rank * per, (tp_rank + 1) * per


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocab rows: rank i holds rows [vocab_start_index, vocab_end_index).

    Each rank looks up the tokens it owns, writes zeros for the others, and g (all-reduce) sums the
    p partial results: exactly one rank contributed each row. Backward: identity; each rank's weight
    gradient lands in its own rows only.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, state: ParallelState,
                 make_vocab_size_divisible_by: int = 128, init_method: InitMethod | None = None,
                 dtype=None, device=None, check_token_ids: bool = True) -> None:
        super().__init__()
        self.state, self.num_embeddings, self.embedding_dim = state, num_embeddings, embedding_dim
        self.check_token_ids = check_token_ids  # False: skip the id-range check (a host sync)
        self.padded_vocab_size = pad_vocab_size(num_embeddings, make_vocab_size_divisible_by, state.tp)
        self.vocab_start_index, self.vocab_end_index = vocab_range(self.padded_vocab_size,
                                                                   state.tp_rank, state.tp)
        self.weight = _parallel_param((num_embeddings, embedding_dim), 0, state,
                                      init_method or init_normal(), dtype, device,
                                      pad_dim0_to=self.padded_vocab_size)  # (V_pad/tp, h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.check_token_ids and input_ids.numel() > 0:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.num_embeddings:
                raise ValueError(f"token id {hi if hi >= self.num_embeddings else lo} is outside the "
                                 f"vocabulary [0, {self.num_embeddings}); check that the tokenizer's "
                                 f"vocab size matches the model's vocab_size={self.num_embeddings}")
        if self.state.tp == 1:  # one rank holds the whole table: a plain lookup
            return F.embedding(input_ids, self.weight)  # (b, s, h)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)  # (b, s)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)  # (b, s)
        out = F.embedding(local_ids, self.weight)  # (b, s, h): rows of this rank's slice
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # tokens owned by other ranks -> 0
        return reduce_from_tensor_model_parallel_region(out, self.state)  # (b, s, h)

    def extra_repr(self) -> str:
        return (f"vocab={self.num_embeddings} (padded {self.padded_vocab_size}), h={self.embedding_dim}, "
                f"rows [{self.vocab_start_index}, {self.vocab_end_index})")


class ParallelLMHead(nn.Module):
    """Vocab-parallel output projection: logits shard ``h·W_iᵀ`` of shape (…, V_pad/tp), no gather.

    Same padding and row split as :class:`VocabParallelEmbedding`, so ``weight=embedding.weight`` ties
    them (the tied weight is borrowed, not registered: ``state_dict`` has no ``lm_head.weight``).
    A borrowed reference goes stale when the owner's Parameter is *replaced* (``load_state_dict(...,
    assign=True)``), so an owner that holds both should pass its current weight at call time:
    ``head(hidden, weight=embedding.weight)`` (LanguageModel does). Feed
    the shard straight to ``vocab_parallel_cross_entropy``. The input goes through f (or the SP
    all-gather, keeping only the (s/tp, b, h) shard for backward), whose backward sums ∂L/∂h over
    the vocab slices.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *, state: ParallelState,
                 make_vocab_size_divisible_by: int = 128, weight: nn.Parameter | None = None,
                 sequence_parallel: bool = False, init_method: InitMethod | None = None,
                 dtype=None, device=None) -> None:
        super().__init__()
        self.state, self.vocab_size, self.hidden_size = state, vocab_size, hidden_size
        self.sequence_parallel = sequence_parallel
        self.padded_vocab_size = pad_vocab_size(vocab_size, make_vocab_size_divisible_by, state.tp)
        self.vocab_start_index, self.vocab_end_index = vocab_range(self.padded_vocab_size,
                                                                   state.tp_rank, state.tp)
        self.tied = weight is not None
        if weight is None:
            self.weight = _parallel_param((vocab_size, hidden_size), 0, state, init_method or init_normal(),
                                          dtype, device, pad_dim0_to=self.padded_vocab_size)
        else:
            expected = (self.padded_vocab_size // state.tp, hidden_size)
            if tuple(weight.shape) != expected:
                raise ValueError(f"tied weight has shape {tuple(weight.shape)}, expected {expected} "
                                 "(V_pad/tp, h): tie to a VocabParallelEmbedding with the same vocab, "
                                 "hidden size, make_vocab_size_divisible_by and state")
            object.__setattr__(self, "weight", weight)  # borrowed: not a parameter of this module

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(…, h) -> (…, V_pad/tp) with ``weight`` (the tied embedding's, (V_pad/tp, h)) or our own."""
        weight = self.weight if weight is None else weight
        if weight.shape != self.weight.shape:
            raise ValueError(f"LM head weight has shape {tuple(weight.shape)}, expected "
                             f"{tuple(self.weight.shape)} (V_pad/tp, h): pass the tied embedding's weight")
        if self.sequence_parallel:  # (s/tp, b, h) -> (s, b, V_pad/tp), keeps the shard only
            return linear_with_sequence_parallel_gather(hidden, weight, None, self.state)
        hidden = copy_to_tensor_model_parallel_region(hidden, self.state)  # (…, h), f
        return F.linear(hidden, weight)  # (…, V_pad/tp)

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab_size} (padded {self.padded_vocab_size}), h={self.hidden_size}, "
                f"rows [{self.vocab_start_index}, {self.vocab_end_index}), tied={self.tied}")
