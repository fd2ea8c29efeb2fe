"""The LM head and the vocab-parallel cross-entropy in one pass, a chunk of tokens at a time.

The unfused path (``ParallelLMHead`` → ``vocab_parallel_cross_entropy``) builds the logits shard
``Z = H·W_iᵀ`` of all ``N = s·b`` tokens, (N, V_pad/tp), and keeps its softmax for backward: at a real
vocabulary (V = 128k) that one fp32 tensor outweighs every other activation of a small model. Here the
logits of ``c`` tokens at a time exist, and only while their chunk runs (the idea of Liger's fused
linear cross-entropy, applied to Megatron's vocab-parallel loss). For the chunk ``H_c`` (c, h) of the
full hidden states and this rank's head rows ``W_i`` (V_pad/tp, h)::

    Z   = H_c·W_iᵀ                              (c, V_pad/tp), fp32 math; padding columns → −inf
    m   = all-reduce MAX over TP of max_v Z     (c)   the same shift on every rank
    S   = all-reduce SUM of Σ_v exp(Z − m)      (c) ┐ one all-reduce of (2, c):
    z_t = all-reduce SUM of (Z − m)[t]          (c) ┘ only t's owner adds a non-zero
    ℓ   = log S − z_t                           (c)   0 where t = ignore_index
    P   = exp(Z − m)/S − onehot(t)              (c, V_pad/tp), rows of ignored tokens zeroed
    ∂H_c = P·W_i                                (c, h)   this rank's share; see the sum below
    ∂W_i += Pᵀ·H_c                              (V_pad/tp, h)

— so the loss *and* the gradients of ``Σ ℓ`` with respect to ``H`` and ``W_i`` are done when forward
returns ``Σ_local ℓ`` (a scalar, identical on every TP rank). Backward only scales them: for any loss
``L = α·Σℓ`` (a mean: α = 1/count; context parallelism's share: cp/N, :func:`mean_over_labels` in
``layers/loss.py``), ``∂L/∂H = grad_output·∂H`` and ``∂L/∂W = grad_output·∂W``.

**The collectives.** Forward: 2 all-reduces of ``c`` and ``2c`` numbers per chunk (the unfused loss
makes 3 of ``N``). ``∂H`` is this rank's part of ``Σ_i P_i·W_i``: the caller feeds ``H`` in through
Megatron's f (identity forward, all-reduce backward) or, under sequence parallelism, through the
all-gather of the (s/tp, b, h) shard (reduce-scatter backward) — the head's own mapping — so ∂H is
summed over the vocab slices exactly once, in backward, by that mapping. ``∂W_i`` needs no
communication (rank i's rows only); tied to the embedding, autograd adds it to the lookup's gradient.

**Memory** (saved for backward, fp32 hidden): unfused ``N·h·4`` (the head's input) ``+ N·(V_pad/tp)·4``
(the softmax); fused ``N·h·4`` (∂H) ``+ (V_pad/tp)·h·4`` (∂W, the size of the weight's own ``.grad``),
plus ``~2·c·(V_pad/tp)·4`` transient while a chunk runs: the (N × V/tp) term is gone.

**Where it falls back.** With a :class:`~minimegatron.mpu.weight_grad.WeightGradStore` deferring (zero-bubble
schedules) the ``grad_output·∂W`` hand-over is queued for the W pass like any weight gradient (the
product itself was done in forward). DeepSpeed's pipeline (``pipe.py``) keeps the unfused head: its
last stage hands logits to a ``loss_fn`` that has no access to the head weight.

No grad needed (eval, ``torch.no_grad``): only the loss is computed, no ∂H, ∂W.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region,
                                       gather_from_sequence_parallel_region)
from minimegatron.mpu.state import ParallelState
from minimegatron.mpu.weight_grad import WeightGradStore, defer_or_compute

__all__ = ["fused_vocab_parallel_cross_entropy", "default_chunk_tokens", "fused_saved_bytes",
           "unfused_saved_bytes"]

MIN_CHUNK_TOKENS, MIN_CHUNK_LOGITS = 256, 2 ** 21  # the default chunk: at least this much work


def default_chunk_tokens(vocab_part: int) -> int:
    """Tokens per chunk when none is set: ``max(256, ⌈2²¹ / (V_pad/tp)⌉)``.

    Each chunk pays a fixed cost (three matmul calls, two all-reduces, a few element-wise passes over
    the chunk); below ~2M logits per chunk it shows (measured on CPU, 1 thread: 256-token chunks at
    V = 512 cost 1.1× the unfused loss, one 1024-token chunk 1.0×; at V = 8192 and 32000, 128–256
    tokens were fastest, 1.2–1.35× faster than unfused). So: 256 tokens at V ≥ 8192 (per rank),
    more at smaller vocabularies — there the whole batch is often one chunk, still never saved.
    """
    return max(MIN_CHUNK_TOKENS, -(-MIN_CHUNK_LOGITS // vocab_part))


def _all_reduce_(x: torch.Tensor, state: ParallelState, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if state.tp > 1:
        dist.all_reduce(x, op=op, group=state.tp_group)
    return x


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """``Σ ℓ`` of (N, h) hidden states against (V_pad/tp, h) head rows; ∂H, ∂W made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, state, vocab_size, ignore_index, chunk, store):
        need_h, need_w = ctx.needs_input_grad[:2]
        part, n = weight.size(0), hidden.size(0)
        start = state.tp_rank * part
        first_pad = min(max(vocab_size - start, 0), part)  # local column where padding starts
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for i in range(0, n, chunk):
            x, t = hidden[i:i + chunk], target[i:i + chunk]  # (c, h), (c)
            z_low = x @ weight.t()  # (c, V_pad/tp), in the matmul dtype (autocast's, if on)
            z = z_low.float()  # (c, V_pad/tp), fp32 math (no copy when already fp32)
            del z_low
            real = z[:, :first_pad]  # (c, real cols of this shard)
            z_max = real.max(dim=-1).values if first_pad else z.new_full((z.size(0),), -torch.inf)  # (c)
            _all_reduce_(z_max, state, dist.ReduceOp.MAX)
            z.sub_(z_max.unsqueeze(-1))  # every real entry ≤ 0
            if first_pad < part:
                z[:, first_pad:] = float("-inf")  # padding: probability 0, gradient 0
            outside = (t < start) | (t >= start + part)  # (c) targets owned elsewhere (or ignored)
            local_t = (t - start).masked_fill(outside, 0)  # (c) column in this shard
            z_t = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)  # (c), a copy
            stats = torch.stack([z_t, z.exp_().sum(dim=-1)])  # (2, c): [z_t − m, Σ exp] partial sums
            _all_reduce_(stats, state)
            ignored = t == ignore_index  # (c)
            total += (stats[1].log() - stats[0]).masked_fill(ignored, 0.0).sum()
            if not (need_h or need_w):
                continue
            p = z.div_(stats[1].unsqueeze(-1))  # (c, V_pad/tp) softmax, in place
            owns = (~outside).to(p.dtype).unsqueeze(-1)  # (c, 1)
            p.scatter_add_(-1, local_t.unsqueeze(-1), -owns)  # softmax − onehot(t)
            p.masked_fill_(ignored.unsqueeze(-1), 0.0)  # ignored tokens: no gradient
            p = p.to(x.dtype)  # (c, V_pad/tp), the matmul dtype
            if need_h:
                grad_h[i:i + chunk] = p @ weight.to(p.dtype)  # (c, h), this rank's share of ∂H
            if need_w:
                if p.dtype == torch.float32:
                    grad_w.addmm_(p.t(), x.to(p.dtype))  # (V_pad/tp, h) += Pᵀ·H_c
                else:
                    grad_w += (p.t() @ x).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.store, ctx.targets, ctx.weight_dtype = store, (weight,), weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        dx = None if grad_h is None else grad_h * grad_total.to(grad_h.dtype)  # (N, h), a new tensor

        def weight_grads():  # ∂L/∂W = grad_output·∂W: now, or queued for a zero-bubble W pass
            return (None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype),)

        (dw,) = defer_or_compute(ctx.store, weight_grads, ctx.targets)
        return dx, dw, None, None, None, None, None, None


def fused_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                       state: ParallelState, vocab_size: int | None = None,
                                       ignore_index: int = -100, chunk_tokens: int | None = None,
                                       sequence_parallel: bool = False,
                                       store: WeightGradStore | None = None) -> torch.Tensor:
    """``Σ ℓ`` over the tokens (a scalar, the same on every TP rank), logits never built whole.

    ``hidden`` (s, b, h), or this rank's (s/tp, b, h) under ``sequence_parallel``; ``weight`` this
    rank's (V_pad/tp, h) head rows (tied: the embedding's table); ``target`` (s, b), every TP rank the
    same. Equals ``vocab_parallel_cross_entropy(head(hidden), target, …).sum()`` in value and in
    gradients (hidden, weight). ``vocab_size=None``: no padding; ``chunk_tokens=None``:
    :func:`default_chunk_tokens`. ``store``: see the module docstring.
    """
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.size(0))
    if not (isinstance(chunk_tokens, int) and chunk_tokens > 0):
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive int: the tokens whose "
                         "logits exist at once (e.g. 256), or None for the default")
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.size(-1) != weight.size(-1):
        raise ValueError(f"hidden {tuple(hidden.shape)} must be (s, b, h) and weight {tuple(weight.shape)} "
                         "(V_pad/tp, h) with the same h")
    padded = weight.size(0) * state.tp
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded}] (the padded vocab: "
                         f"{weight.size(0)} head rows on each of {state.tp} TP ranks)")
    s = hidden.size(0) * (state.tp if sequence_parallel else 1)
    if tuple(target.shape) != (s, hidden.size(1)):
        raise ValueError(f"target shape {tuple(target.shape)} does not match the tokens {(s, hidden.size(1))} "
                         "(targets are (s, b), the hidden states' layout)")
    if target.is_floating_point():
        raise TypeError(f"targets must be integer token ids, got dtype {target.dtype}")
    if sequence_parallel:  # (s/tp, b, h) -> (s, b, h); backward reduce-scatter sums ∂H over TP
        hidden = gather_from_sequence_parallel_region(hidden, state)
    else:  # f: identity; backward all-reduce sums ∂H over TP
        hidden = copy_to_tensor_model_parallel_region(hidden, state)
    flat = hidden.reshape(-1, hidden.size(-1))  # (N, h), N = s·b in (s, b) order
    return _FusedLinearCrossEntropy.apply(flat, weight, target.reshape(-1), state, vocab_size,
                                          ignore_index, chunk_tokens, store)


def unfused_saved_bytes(tokens: int, hidden: int, vocab_part: int, elem: int = 4) -> int:
    """Bytes the unfused head + loss keep for backward: the head's input, the fp32 softmax and, per
    token, the int64 local target and two bool masks (``mpu/cross_entropy.py``)."""
    return tokens * hidden * elem + tokens * vocab_part * 4 + tokens * (8 + 1 + 1)


def fused_saved_bytes(tokens: int, hidden: int, vocab_part: int, elem: int = 4) -> int:
    """Bytes the fused head + loss keep for backward: ∂H (tokens, h) and the fp32 ∂W (V_pad/tp, h)."""
    return tokens * hidden * elem + vocab_part * hidden * 4
