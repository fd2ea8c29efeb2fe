"""Ring attention: causal attention over a sequence split across ``cp`` context-parallel ranks.

Each rank holds a piece of the sequence of q, k and v (Liu et al. 2023, "Ring Attention with
Blockwise Transformers"). Its queries need every key/value block at or before them, so the k/v blocks
travel round the ring: at step t rank i holds the block of rank ``j = (i - t) mod cp``, computes the
attention of its queries to that block, and passes it on (``send`` to i+1, ``recv`` from i-1, started
before the compute so that the two overlap). After ``cp`` steps every query has seen every key.

**Online softmax (the log-sum-exp merge).** A block gives the partial result of a softmax over only
its keys: ``o_b = softmax(S_b) V_b`` and ``lse_b = log Σ_k exp(S_b[:, k])`` (``S_b = Q K_bᵀ/√d``).
Two partial results over disjoint keys merge exactly::

    lse = log(exp(lse_a) + exp(lse_b))                      (torch.logaddexp: subtracts the max first)
    o   = exp(lse_a - lse) · o_a + exp(lse_b - lse) · o_b

so the full softmax never needs all the keys at once (Milakov & Gimelshein 2018; FlashAttention).

**Which blocks are masked how (causal).** The *zig-zag* (head-tail) split cuts the sequence into
``2·cp`` chunks and gives rank i chunks ``i`` and ``2cp-1-i`` (``context_parallel.zigzag_chunks``). With
local queries ``[q0 | q1]`` (chunks i, 2cp-1-i) and the block of rank j (chunks j, 2cp-1-j):

    j == i (step 0)   the local causal mask (the two chunks are in increasing order)   ½·(2c)² scores
    j <  i            all queries × the first half of the block (k0, v0), no mask     (2c)·c
    j >  i            the second half of the queries (q1) × the whole block, no mask  c·(2c)

so every step after the first costs every rank the same ``2c²`` (c = chunk length): no rank idles.
The *contiguous* split (rank i holds chunk i of cp) is the naive one: rank i computes i full blocks
and a diagonal one and skips the rest — rank cp-1 works ~2cp-1 times as long as rank 0
(:func:`ring_schedule` lists both; ``measure`` and notebook 14 plot them).

**Forward / backward communication.** Forward: cp-1 steps that each send k and v → ``2·(cp-1)``
block transfers. Backward recomputes each block's probabilities from the saved ``lse`` (nothing of
size s² is kept) and needs the blocks again, so k and v go round once more (``2·(cp-1)``), and the
gradient ``(dK_j, dV_j)`` of block j travels with it, collecting each rank's contribution, and arrives
home after the last step (``2·(cp-1)``): ``4·(cp-1)`` transfers, twice the forward. The block backward is
FlashAttention's: ``P = exp(S - lse)``, ``dV = Pᵀ dO``, ``dS = P ⊙ (dO Vᵀ - rowsum(dO ⊙ O))``,
``dQ = dS K/√d``, ``dK = dSᵀ Q/√d``.

Saved for backward: q, k, v, o and lse of the local piece — all ``s/cp`` long.

GQA/MQA: q is viewed as ``(b, kv, g, s, d)`` (g = heads per kv head, Hugging Face's ``repeat_kv`` order)
so a kv head is never copied; its gradient sums over its g query heads. Computed in fp32.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["RingStep", "ring_schedule", "ring_attention", "attention_block", "merge_partial"]

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class RingStep:
    """What rank ``rank`` computes at ``step``: its queries ``q`` (``"all"``, ``"second"`` half or
    ``"none"``) × the block of ``source`` (``"all"`` or its ``"first"`` half), causal or not."""

    rank: int
    step: int
    source: int
    q: str
    kv: str
    causal: bool

    def scores(self, local_len: int) -> int:
        """Scores (q·k pairs) computed, for a local piece of ``local_len`` tokens (the work)."""
        if self.q == "none":
            return 0
        nq = local_len if self.q == "all" else local_len // 2
        nk = local_len if self.kv == "all" else local_len // 2
        return nq * (nk + 1) // 2 if self.causal else nq * nk


def ring_schedule(cp_rank: int, cp: int, layout: str = "zigzag") -> list[RingStep]:
    """The ``cp`` steps of rank ``cp_rank`` (see the module docstring's table): the one schedule the
    forward, the backward, the tests and the load-balance plots read."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: use 'zigzag' (balanced) or 'contiguous' (naive)")
    steps = []
    for t in range(cp):
        j = (cp_rank - t) % cp
        if j == cp_rank:
            q, kv, causal = "all", "all", True
        elif layout == "contiguous":
            q, kv, causal = ("all" if j < cp_rank else "none"), "all", False
        elif j < cp_rank:
            q, kv, causal = "all", "first", False
        else:
            q, kv, causal = "second", "all", False
        steps.append(RingStep(cp_rank, t, j, q, kv, causal))
    return steps


def _rows(x: torch.Tensor, which: str, dim: int = -2) -> torch.Tensor:
    """The ``"all"``/``"first"``/``"second"`` half of ``x`` along the sequence dimension ``dim``."""
    if which == "all":
        return x
    half = x.size(dim) // 2
    return x.narrow(dim, 0, half) if which == "first" else x.narrow(dim, half, half)


def attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block: q (b, kv, g, sq, d), k/v (b, kv, sk, d) -> (o (b, kv, g, sq, d), lse (b, kv, g, sq))."""
    s = torch.einsum("bhgqd,bhkd->bhgqk", q, k) * scale  # (b, kv, g, sq, sk)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1),
                          float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (b, kv, g, sq)
    o = torch.einsum("bhgqk,bhkd->bhgqd", torch.exp(s - lse.unsqueeze(-1)), v)
    return o, lse


def merge_partial(o: torch.Tensor | None, lse: torch.Tensor | None, o_b: torch.Tensor,
                  lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial softmax results over disjoint keys (the log-sum-exp merge)."""
    if o is None:
        return o_b, lse_b
    new = torch.logaddexp(lse, lse_b)  # log(e^lse + e^lse_b), stable
    return (o * torch.exp(lse - new).unsqueeze(-1) + o_b * torch.exp(lse_b - new).unsqueeze(-1)), new


def _block_backward(q, k, v, do, lse, delta, causal: bool, scale: float):
    """FlashAttention's block backward from the final ``lse`` and ``delta = rowsum(dO ⊙ O)``."""
    s = torch.einsum("bhgqd,bhkd->bhgqk", q, k) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1),
                          float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))  # (b, kv, g, sq, sk): the final probabilities of this block
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, do)  # summed over the g query heads of each kv head
    ds = p * (torch.einsum("bhgqd,bhkd->bhgqk", do, v) - delta.unsqueeze(-1))
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, k) * scale
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, q) * scale
    return dq, dk, dv


class _Ring:
    """Send to the next rank of the ring and receive from the previous one (isend/irecv, overlapped)."""

    def __init__(self, group, ranks: list[int], cp_rank: int) -> None:
        cp = len(ranks)
        self.group, self.next, self.prev = group, ranks[(cp_rank + 1) % cp], ranks[(cp_rank - 1) % cp]

    def start(self, *tensors: torch.Tensor, tag: int = 0) -> tuple[list, list[torch.Tensor]]:
        """Post the sends of ``tensors`` and receives of same-shaped ones; ``finish`` waits.
        ``tag`` keeps the k/v messages (0) and the travelling gradients (1) apart."""
        incoming = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in incoming]
        return dist.batch_isend_irecv(ops), incoming

    @staticmethod
    def finish(pending: tuple[list, list[torch.Tensor]]) -> list[torch.Tensor]:
        works, incoming = pending
        for w in works:
            w.wait()
        return incoming


class RingAttention(torch.autograd.Function):
    """``ring_attention``'s forward (k/v round the ring, merged online) and backward (k/v and their
    gradients round the ring). Inputs in the (b, kv, g, s/cp, d) view, fp32."""

    @staticmethod
    def forward(ctx, q, k, v, group, ranks, cp_rank, layout, scale, timeline):
        ring, steps = _Ring(group, ranks, cp_rank), ring_schedule(cp_rank, len(ranks), layout)
        o = lse = None
        o_h, lse_h = {}, {}  # the second-half results, merged separately (zig-zag, j > i)
        block = (k, v)
        for st in steps:
            pending = ring.start(*block) if st.step < len(steps) - 1 else None  # overlap comm/compute
            t0 = _now(timeline)
            if st.q != "none":
                kb, vb = (_rows(t, st.kv) for t in block)
                ob, lb = attention_block(_rows(q, st.q), kb, vb, st.causal, scale)
                if st.q == "all":
                    o, lse = merge_partial(o, lse, ob, lb)
                else:
                    o_h["o"], lse_h["o"] = merge_partial(o_h.get("o"), lse_h.get("o"), ob, lb)
            _record(timeline, st, t0, q.size(-2))
            block = tuple(_Ring.finish(pending)) if pending is not None else block
        if o_h:  # fold the second half's extra blocks into the queries' results
            half = q.size(-2) // 2
            o2, l2 = merge_partial(o[..., half:, :], lse[..., half:], o_h["o"], lse_h["o"])
            o, lse = torch.cat([o[..., :half, :], o2], dim=-2), torch.cat([lse[..., :half], l2], dim=-1)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.group, ctx.ranks, ctx.cp_rank, ctx.layout, ctx.scale = group, ranks, cp_rank, layout, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        ring, steps = _Ring(ctx.group, ctx.ranks, ctx.cp_rank), ring_schedule(ctx.cp_rank, len(ctx.ranks),
                                                                              ctx.layout)
        delta = (do * o).sum(-1)  # (b, kv, g, s/cp): rowsum(dO ⊙ O)
        dq, dk_own, dv_own = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        block, grads, pending_grads = (k, v), None, None
        last = len(steps) - 1
        for st in steps:
            pending = ring.start(*block) if st.step < last else None
            dk_b, dv_b = torch.zeros_like(k), torch.zeros_like(v)
            if st.q != "none":
                kb, vb = (_rows(t, st.kv) for t in block)
                dq_b, dk_p, dv_p = _block_backward(_rows(q, st.q), kb, vb, _rows(do, st.q),
                                                   _rows(lse, st.q, -1), _rows(delta, st.q, -1),
                                                   st.causal, ctx.scale)
                _rows(dq, st.q).add_(dq_b)
                _rows(dk_b, st.kv).add_(dk_p)
                _rows(dv_b, st.kv).add_(dv_p)
            if st.step == 0:  # our own block: its gradient stays here
                dk_own, dv_own = dk_b, dv_b
            else:  # the block's travelling gradient: add ours, pass it on (it ends at its owner)
                if pending_grads is not None:
                    grads = _Ring.finish(pending_grads)
                dk_b, dv_b = (dk_b, dv_b) if grads is None else (dk_b + grads[0], dv_b + grads[1])
                pending_grads = ring.start(dk_b, dv_b, tag=1)
            block = tuple(_Ring.finish(pending)) if pending is not None else block
        if pending_grads is not None:
            dk_home, dv_home = _Ring.finish(pending_grads)
            dk_own, dv_own = dk_own + dk_home, dv_own + dv_home
        return dq, dk_own, dv_own, None, None, None, None, None, None


def _now(timeline: list | None) -> float:
    return time.perf_counter() if timeline is not None else 0.0


def _record(timeline: list | None, st: RingStep, t0: float, local_len: int) -> None:
    if timeline is not None:
        timeline.append({"rank": st.rank, "step": st.step, "source": st.source, "start": t0,
                         "end": time.perf_counter(), "scores": st.scores(local_len)})


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, ranks: list[int],
                   cp_rank: int, layout: str = "zigzag", scale: float | None = None,
                   timeline: list | None = None) -> torch.Tensor:
    """Causal attention of this rank's piece: q (b, n, s/cp, d), k/v (b, kv, s/cp, d) -> (b, n, s/cp, d).

    ``ranks``: the global ranks of the context-parallel group in ring order (``state.cp_ranks``);
    ``layout``: how the sequence was split (``"zigzag"``, or the naive ``"contiguous"``);
    ``timeline``: a list to append each step's ``{rank, step, source, start, end, scores}`` to.
    """
    if layout == "zigzag" and q.size(-2) % 2:
        raise ValueError(f"zig-zag ring attention holds two chunks per rank: the local length "
                         f"{q.size(-2)} must be even (sequence length divisible by 2·cp)")
    b, n, s, d = q.shape
    kv = k.size(1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.float().reshape(b, kv, n // kv, s, d)  # (b, kv, g, s/cp, d): query heads grouped by kv head
    o = RingAttention.apply(qg, k.float().contiguous(), v.float().contiguous(), group, list(ranks), cp_rank, layout, scale, timeline)
    return o.reshape(b, n, s, d).to(q.dtype)  # (b, n, s/cp, d)
