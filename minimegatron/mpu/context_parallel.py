"""Context parallelism (CP): the sequence split over ``cp`` ranks, attention made whole by communication.

Everything but attention works token by token (embeddings, norms, MLP, the LM head, the loss), so a
rank that holds ``s/cp`` of the tokens computes them alone, and activation memory per rank drops by
``cp``. Attention mixes tokens: each query needs the keys and values at or before it. Two ways to get
them (Megatron's ``cp_comm_type``):

``"p2p"``  ring attention (``ring_attention.py``): k/v blocks travel round the ring, partial softmaxes
           merged with the log-sum-exp rule. Any head count; ``2·(cp-1)`` block transfers forward.
``"a2a"``  all-to-all (DeepSpeed-Ulysses, Jacobs et al. 2023): trade the sequence split for a head
           split — an all-to-all turns q, k, v ``(s/cp, b, n, d)`` into ``(s, b, n/cp, d)`` (scatter
           heads, gather the sequence), ordinary attention runs on whole sequences of ``n/cp`` heads,
           and the reverse all-to-all brings the output back to ``(s/cp, b, n, d)``. Four all-to-alls
           per layer forward (q, k, v, out; the same four backward, each the conjugate); needs
           ``cp | heads``.

**The split (zig-zag / head-tail).** Under a causal mask the late tokens attend to many more keys than
the early ones, so a contiguous split leaves rank 0 idle. The sequence is cut into ``2·cp`` chunks and
rank i holds chunks ``i`` and ``2cp-1-i`` (:func:`zigzag_chunks`)::

    cp = 2, s = 8:  chunks [0 1 | 2 3 | 4 5 | 6 7]   rank 0: chunks 0, 3 -> tokens 0 1 6 7
                                                     rank 1: chunks 1, 2 -> tokens 2 3 4 5

Both algorithms take this one split (the all-to-all path puts the gathered sequence back in order
before its causal attention), so the data loader (:func:`split_for_context_parallel`), RoPE's and the
learned table's positions (:func:`context_parallel_index`: global positions) and the loss are the
same for both. ``seq_len`` must be divisible by ``2·cp`` (and, under sequence parallelism, the local
``s/cp`` by ``tp``: :func:`context_parallel_split`).

Gradients: CP ranks hold the same weights and see different tokens, so their weight gradients are
averaged with the data-parallel ones over ``state.dp_cp_group`` (``mpu/state.py``).
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.distributed as dist

from minimegatron import kernels
from minimegatron.mpu.ring_attention import ring_attention
from minimegatron.mpu.state import ParallelState
from minimegatron.sizes import divide

__all__ = ["zigzag_chunks", "context_parallel_split", "context_parallel_index",
           "split_for_context_parallel", "gather_from_context_parallel", "all_to_all",
           "ulysses_attention", "context_parallel_attention"]


def zigzag_chunks(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two of the ``2·cp`` chunks rank ``cp_rank`` holds: ``(i, 2cp-1-i)``."""
    return cp_rank, 2 * cp - 1 - cp_rank


def context_parallel_split(seq_len: int, cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """``seq_len / cp``, the tokens each CP rank holds, or the ValueError that names the fix."""
    divide(seq_len, 2 * cp, "seq_len", by=f"2·cp = {2 * cp}", fix=f"context parallelism cuts each sequence into 2·cp = {2 * cp} "
                                           f"chunks (zig-zag); seq_len must be a multiple of {2 * cp}")
    local = seq_len // cp
    if sequence_parallel and tp > 1:
        divide(local, tp, "seq_len/cp", by=f"tensor-parallel size {tp}", fix=f"sequence parallelism splits each CP rank's {local} tokens "
                                            f"over {tp} TP ranks; seq_len must be a multiple of "
                                            f"{math.lcm(2 * cp, cp * tp)}")
    return local


def context_parallel_index(seq_len: int, cp_rank: int, cp: int, layout: str = "zigzag",
                           device: torch.device | None = None) -> torch.Tensor:
    """The global positions (``(seq_len/cp,)``, increasing) of the tokens rank ``cp_rank`` holds."""
    if layout == "contiguous":  # the naive split, for comparison
        local = seq_len // cp
        return torch.arange(cp_rank * local, (cp_rank + 1) * local, device=device)
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in zigzag_chunks(cp_rank, cp)])


def split_for_context_parallel(x: torch.Tensor, state: ParallelState, dim: int = 1) -> torch.Tensor:
    """This CP rank's tokens of whole sequences ``x`` (``dim``: the sequence dimension, 1 for (b, s))."""
    if state.cp == 1:
        return x
    context_parallel_split(x.size(dim), state.cp)
    return x.index_select(dim, context_parallel_index(x.size(dim), state.cp_rank, state.cp, device=x.device))


def gather_from_context_parallel(x: torch.Tensor, state: ParallelState, dim: int = 1) -> torch.Tensor:
    """Whole sequences back from every CP rank's tokens (forward only: for logits and tests)."""
    if state.cp == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(state.cp)]
    dist.all_gather(pieces, x.contiguous(), group=state.cp_group)
    s = x.size(dim) * state.cp
    order = torch.cat([context_parallel_index(s, r, state.cp, device=x.device) for r in range(state.cp)])
    return torch.cat(pieces, dim=dim).index_select(dim, torch.argsort(order))


# ---- all-to-all (Ulysses) ------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Scatter ``scatter_dim`` over the group, gather ``gather_dim``; backward: the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, cp: int, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.cp, ctx.dims = group, cp, (scatter_dim, gather_dim)
        return _all_to_all(x, group, cp, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, ctx.cp, gather_dim, scatter_dim), None, None, None, None


def _all_to_all(x: torch.Tensor, group, cp: int, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    # piece r of scatter_dim goes to rank r; the pieces received are stacked in rank order on gather_dim
    send = torch.stack(x.chunk(cp, dim=scatter_dim)).contiguous()  # (cp, ..., n/cp, ...)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[r]: rank r's piece for us
    return torch.cat(recv.unbind(0), dim=gather_dim)


def all_to_all(x: torch.Tensor, state: ParallelState, scatter_dim: int = 2, gather_dim: int = 0
               ) -> torch.Tensor:
    """(s/cp, b, n, d) -> (s, b, n/cp, d) with the defaults (the sequence in CP-rank order)."""
    return _AllToAll.apply(x, state.cp_group, state.cp, scatter_dim, gather_dim)


def _gathered_order(seq_len: int, cp: int, device) -> torch.Tensor:
    """Global position of each token of the all-gathered sequence (rank 0's tokens, then rank 1's, ...)."""
    return torch.cat([context_parallel_index(seq_len, r, cp, device=device) for r in range(cp)])


def causal_attention_on_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: int,
                                 fused: bool = True) -> torch.Tensor:
    """Causal attention of whole sequences in CP-rank order: q (s, b, n/cp, d), k/v (s, b, kv/cp, d).

    The tokens are put in position order first (the causal mask is about positions), then back.
    """
    order = _gathered_order(q.size(0), cp, q.device)
    natural = torch.argsort(order)
    q, k, v = (t.index_select(0, natural).permute(1, 2, 0, 3) for t in (q, k, v))  # (b, heads, s, d)
    out = kernels.scaled_dot_product_attention(q, k, v, causal=True, fused=fused)  # (b, n/cp, s, d)
    return out.permute(2, 0, 1, 3).index_select(0, order)  # (s, b, n/cp, d), CP-rank order again


def _kv_for_heads(k: torch.Tensor, v: torch.Tensor, n: int, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv heads that the all-to-all can split: as they are when ``cp | kv``, else repeated up to the
    ``n`` query heads (GQA/MQA with fewer kv heads than CP ranks; autograd sums the copies back)."""
    kv = k.size(2)
    if kv % cp == 0:
        return k, v
    return k.repeat_interleave(n // kv, dim=2), v.repeat_interleave(n // kv, dim=2)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ParallelState,
                      engine: str = "ours", fused: bool = True) -> torch.Tensor:
    """All-to-all causal attention: q (s/cp, b, n, d), k/v (s/cp, b, kv, d) -> (s/cp, b, n, d).

    ``engine="ours"``: the four all-to-alls written out below; ``"deepspeed"``: DeepSpeed's
    ``DistributedAttention`` (``compat.deepspeed_ulysses``) around the same local attention.
    """
    cp = state.cp
    divide(q.size(2), cp, "query heads per rank", by=f"context-parallel size {cp}", fix="all-to-all needs cp | heads; use --cp-comm p2p")
    k, v = _kv_for_heads(k, v, q.size(2), cp)

    def local(qh, kh, vh, *_):
        return causal_attention_on_gathered(qh, kh, vh, cp, fused)

    if engine == "deepspeed":
        from minimegatron.compat import deepspeed_ulysses
        return deepspeed_ulysses(local, state.cp_group)(q, k, v)
    qh, kh, vh = (all_to_all(t, state) for t in (q, k, v))  # (s, b, n/cp | kv/cp, d)
    return all_to_all(local(qh, kh, vh), state, scatter_dim=0, gather_dim=2)  # (s/cp, b, n, d)


@functools.cache
def ulysses_engine() -> str:
    """``"deepspeed"`` (the real engine, ``DistributedAttention``) where DeepSpeed is installed, else ours
    (the same four all-to-alls; ``tests/mpu/test_context_parallel.py`` checks one against the other)."""
    return "deepspeed" if importlib.util.find_spec("deepspeed") else "ours"


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ParallelState,
                               fused: bool = True) -> torch.Tensor:
    """Causal attention over the whole sequence of this rank's zig-zag piece, by ``state.cp_comm``:
    q (s/cp, b, n, d), k/v (s/cp, b, kv, d) -> (s/cp, b, n, d)."""
    if state.cp_comm == "a2a":
        return ulysses_attention(q, k, v, state, engine=ulysses_engine(), fused=fused)
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (b, heads, s/cp, d)
    out = ring_attention(qb, kb, vb, state.cp_group, state.cp_ranks, state.cp_rank)  # (b, n, s/cp, d)
    return out.permute(2, 0, 1, 3)  # (s/cp, b, n, d)
