"""Expert parallelism: the all-to-all token dispatcher (Megatron's ``MoEAlltoAllTokenDispatcher``).

``E`` experts are shared out over the ``ep`` ranks of ``state.ep_group``: EP rank ``r`` holds the
``L = E/ep`` experts ``[r·L, (r+1)·L)``. A router has given each of this rank's ``n`` tokens ``k``
expert ids and weights; capacity may have dropped some slots (``keep[t, j] = False``). The layer is::

    out[t] = Σ_j keep[t, j] · probs[t, j] · expert_{e[t, j]}(x[t])

**Dispatch** sends each kept copy ``x[t]`` to the rank that holds ``e[t, j]``; the experts run on
what arrived; **combine** sends each output back and sums it, weighted, into its token. Dropped slots
are never sent (they cost nothing and give 0).

1. Sort the kept slots by global expert id (stable): since ``e = dst·L + local``, the rows come out
   grouped by destination rank, then local expert, then (token, slot) — one contiguous block per
   destination, so ``input_split_sizes[dst]`` = rows for ``dst``.
2. **Count exchange**: ``counts[dst, l]`` (rows for expert ``l`` of ``dst``, ``E`` int64s) goes
   through one ``all_to_all_single`` with equal splits of ``L``: every rank learns
   ``recv[src, l]``, hence its ``output_split_sizes[src] = Σ_l recv[src, l]`` (the data all-to-all
   cannot size its output otherwise).
3. **Token exchange**: ``all_to_all_single(out, rows, output_split_sizes, input_split_sizes)``. What
   arrives is source-major (src, l, token, slot); one permutation makes it expert-major (l, src,
   token, slot), the order the experts (and engineer A's ``MoEMLP``) consume, with
   ``tokens_per_expert[l] = Σ_src recv[src, l]``.
4. **Combine** undoes 3 (inverse permutation, then the all-to-all with the splits swapped) and
   ``index_add``s ``probs · y`` into the token rows.

Collective pairs (:class:`_AllToAll`: the backward of an all-to-all is the reverse all-to-all, its
output and input splits swapped; a row goes back the way it came)::

                    forward                          backward
    dispatch        a2a(splits in→out)               a2a(out→in): ∂x rows come home
    combine         a2a(out→in)                      a2a(in→out): ∂y rows go to the experts

**Volume** per MoE layer and rank, ``N = n·k`` kept slots, hidden ``h``: with uniform routing each
all-to-all keeps ``1/ep`` of its rows at home and sends ``N·h·(ep−1)/ep`` elements; there are four
(two forward, two backward), so ``4·N·h·(ep−1)/ep`` elements, plus ``E`` int64 counts once in
forward (``minimegatron.measure.moe``).

**With tensor parallelism** the ``ep_group`` fixes the tp rank (``grid_groups``): the TP ranks of one
EP rank hold the same tokens (no sequence parallelism) and each dispatches the same rows to the
*same tp rank* of the destination, where the expert's TP layers (column → row parallel, an
all-reduce over ``tp_group``) do the rest. So each TP rank moves the full ``N·h`` volume. With
sequence parallelism each TP rank holds ``n/tp`` different tokens: gather them over ``tp_group``
before routing (``gather_from_sequence_parallel_region``) so that the experts' TP shards see the same
rows, and reduce-scatter after combine.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from minimegatron.mpu.state import ParallelState

__all__ = ["all_to_all", "AllToAllDispatcher"]


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``input_split_sizes`` go to the group's ranks in order; returns the rows
    received, split by ``output_split_sizes``. Backward: the same exchange, splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
                group) -> torch.Tensor:
        ctx.splits, ctx.group = (output_split_sizes, input_split_sizes), group
        out = x.new_empty((sum(output_split_sizes), *x.shape[1:]))  # (rows received, h)
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes, input_split_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_split_sizes, input_split_sizes = ctx.splits
        return _AllToAll.apply(grad, input_split_sizes, output_split_sizes, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
               group) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` over dim 0 with split sizes (row counts per rank)."""
    return _AllToAll.apply(x, list(output_split_sizes), list(input_split_sizes), group)


class AllToAllDispatcher:
    """The :class:`TokenDispatcher` for ep > 1 (see the module docstring): ``dispatch`` then
    ``combine``, once per forward; ``dispatch`` remembers the layout ``combine`` needs."""

    def __init__(self, num_experts: int, state: ParallelState) -> None:
        ep = getattr(state, "ep", 1)
        if not isinstance(num_experts, int) or num_experts < 1 or num_experts % ep:
            raise ValueError(f"num_experts={num_experts!r} must be a positive multiple of the expert-"
                             f"parallel size ep={ep} (each EP rank holds E/ep whole experts); choose "
                             "num_experts divisible by ep")
        self.num_experts, self.state, self.ep = num_experts, state, ep
        self.num_local_experts = num_experts // ep
        self.local_expert_offset = state.ep_rank * self.num_local_experts  # first global id held here
        self._saved: dict | None = None

    def _check(self, x: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor) -> None:
        if x.dim() != 2 or experts.dim() != 2 or experts.shape[0] != x.shape[0] \
                or keep.shape != experts.shape:
            raise ValueError(f"dispatch wants x (n, h), experts (n, k) and keep (n, k); got "
                             f"{tuple(x.shape)}, {tuple(experts.shape)}, {tuple(keep.shape)}: flatten "
                             "(s, b, h) tokens to (s·b, h) first")
        if experts.dtype != torch.long or keep.dtype != torch.bool:
            raise ValueError(f"experts must be int64 and keep bool, got {experts.dtype} and {keep.dtype}")
        if experts.numel() and (experts.min() < 0 or experts.max() >= self.num_experts):
            raise ValueError(f"expert ids must be global ids in [0, {self.num_experts}), got "
                             f"[{int(experts.min())}, {int(experts.max())}]")

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor,
                 keep: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """x (n, h), experts (n, k) global ids, keep (n, k) -> rows (m, h) for the local experts,
        expert-major, and the row count per local expert."""
        self._check(x, experts, keep)
        n, k = experts.shape
        ep, L, group = self.ep, self.num_local_experts, self.state.ep_group
        slots = keep.reshape(-1).nonzero().squeeze(1)                    # (kept,) flat t·k + j
        ids = experts.reshape(-1).index_select(0, slots)                 # (kept,) global expert
        order = slots.index_select(0, torch.sort(ids, stable=True).indices)  # by (dst, local, t, j)
        counts = torch.bincount(ids, minlength=self.num_experts)         # (E,) = (ep·L,) per (dst, l)
        recv = torch.empty_like(counts)                                  # (ep·L,) per (src, l)
        dist.all_to_all_single(recv, counts, group=group)                # equal splits: L each
        input_splits = counts.view(ep, L).sum(1).tolist()
        output_splits = recv.view(ep, L).sum(1).tolist()
        rows = x.index_select(0, order // k)                             # (kept, h), grouped by dst
        arrived = all_to_all(rows, output_splits, input_splits, group)   # (m, h) by (src, l, t, j)
        # source-major -> expert-major: block (src, l) starts at offset[src, l]
        recv_sl = recv.view(ep, L)
        offset = (torch.cumsum(recv, 0) - recv).view(ep, L)
        perm = torch.cat([torch.arange(int(offset[s, l]), int(offset[s, l] + recv_sl[s, l]))
                          for l in range(L) for s in range(ep)] or [torch.zeros(0, dtype=torch.long)])
        perm = perm.to(x.device)
        self._saved = dict(n=n, k=k, order=order, perm=perm, input_splits=input_splits,
                           output_splits=output_splits)
        return arrived.index_select(0, perm), recv_sl.sum(0).tolist()   # (m, h) expert-major

    def combine(self, y: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """y (m, h) in dispatch's row order, probs (n, k) -> (n, h), Σ_j keep·probs·y_row(t, j)."""
        if self._saved is None:
            raise RuntimeError("combine() before dispatch(): call dispatch(x, experts, keep) first, "
                               "it records where each row came from")
        s = self._saved
        if y.dim() != 2 or y.shape[0] != s["perm"].numel() or probs.shape != (s["n"], s["k"]):
            raise ValueError(f"combine wants y ({s['perm'].numel()}, h) in dispatch's row order and "
                             f"probs ({s['n']}, {s['k']}); got {tuple(y.shape)} and {tuple(probs.shape)}")
        source_major = torch.empty_like(s["perm"])
        source_major[s["perm"]] = torch.arange(s["perm"].numel(), device=s["perm"].device)
        back = all_to_all(y.index_select(0, source_major), s["input_splits"], s["output_splits"],
                          self.state.ep_group)                          # (kept, h) in `order`
        weights = probs.reshape(-1).index_select(0, s["order"]).unsqueeze(1).to(back.dtype)  # (kept, 1)
        out = back.new_zeros((s["n"], y.shape[1]))                       # (n, h)
        return out.index_add(0, s["order"] // s["k"], back * weights)
