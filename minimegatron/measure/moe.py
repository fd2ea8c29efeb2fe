"""Mixture of experts by the numbers: all-to-all volume, dropped tokens, expert load.

**All-to-all bytes per MoE layer** (:class:`~minimegatron.mpu.expert_parallel.AllToAllDispatcher`), on
one rank of an EP group of ``ep`` ranks, ``N`` kept slots (``tokens · k`` without drops), hidden ``h``,
``e`` bytes per element. Four all-to-alls of rows::

    forward   dispatch   sends its N rows          (counts first: E int64, L = E/ep to each rank)
              combine    sends back the rows it received
    backward  combine    ∂ of the rows it sent     (the reverse of combine's forward)
              dispatch   ∂ of the rows it received (the reverse of dispatch's forward)

With **uniform routing** each rank keeps ``1/ep`` of every all-to-all at home, so each of the four
sends ``N·h·(ep−1)/ep`` elements to other ranks: ``2·N·h·e·(ep−1)/ep`` bytes forward and again backward
(:func:`moe_a2a_comm`). For a **given routing** let ``R[src, dst]`` be the kept rows rank ``src``
sends to rank ``dst``: rank ``r`` sends ``Σ_dst R[r, dst]`` rows in dispatch and receives
``Σ_src R[src, r]``, of which ``R[r, r]`` never leave it (:func:`routing_a2a_comm`). The
count exchange adds ``E·8`` bytes (``(ep−1)·L·8`` off the rank) once per forward.

``CommCounter`` records an all-to-all's ``bytes`` as its whole input (the rows kept at home too) and
``wire_bytes`` as ``(t−1)·⌈n/t⌉·e``, exact only for even splits; :class:`MoECommCounter` also reads the
split sizes and adds the exact bytes sent to *other* ranks (``off_rank_bytes``).

**Dropped tokens.** An expert of capacity ``C = ⌈capacity_factor · T·k / E⌉`` (Megatron's, GShard's)
keeps at most ``C`` of the ``T·k`` slots routed to it: for loads ``c_e`` the dropped fraction is
``Σ_e max(0, c_e − C) / Σ_e c_e`` (:func:`dropped_fraction`); for a router that picks expert ``e``
with probability ``p_e`` each slot, ``c_e ~ Binomial(T·k, p_e)`` and the expected fraction is
``Σ_e E[max(0, c_e − C)] / (T·k)`` (:func:`expected_dropped_fraction`). Uniform routing with
capacity factor 1 still drops (the binomial's spread); a factor of 1.25–2 is the usual cure.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.distributed as dist

from minimegatron.layers.router import expert_capacity as router_capacity
from minimegatron.measure.comm import CommCounter, OpTotal, _process_group, ring_wire_bytes

__all__ = ["moe_a2a_comm", "routing_rows", "routing_a2a_comm", "MoECommCounter", "expert_capacity",
           "dropped_fraction", "expected_dropped_fraction", "plot_expert_load"]

COUNT_BYTES = 8  # the count exchange moves int64s


def _count_exchange(num_experts: int, ep: int) -> OpTotal:
    return OpTotal(1, num_experts * COUNT_BYTES, ring_wire_bytes("all_to_all", num_experts, COUNT_BYTES, ep))


def moe_a2a_comm(tokens: int, k: int, hidden: int, ep: int, num_experts: int,
                 bytes_per_element: int = 4) -> dict[tuple[str, str], OpTotal]:
    """Uniform routing, no drops: ``{(phase, "all_to_all"): OpTotal(calls, bytes, wire_bytes)}`` on one
    rank, in :meth:`CommCounter.totals` (``by_phase=True``) form. Each row all-to-all: ``tokens·k·h``
    elements in, ``tokens·k·h·(ep−1)/ep`` of them to other ranks."""
    if ep < 1 or num_experts % ep or (tokens * k) % ep:
        raise ValueError(f"uniform routing needs ep={ep} to divide num_experts={num_experts} and "
                         f"tokens·k={tokens * k}; choose sizes that split evenly")
    n, e = tokens * k * hidden, bytes_per_element
    rows = OpTotal(2, 2 * n * e, 2 * n * e * (ep - 1) // ep)  # dispatch + combine
    return {("forward", "all_to_all"): rows + _count_exchange(num_experts, ep),
            ("backward", "all_to_all"): rows}


def routing_rows(experts: torch.Tensor, keep: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``R[src, dst]``: kept rows EP rank ``src`` sends to ``dst``, from every EP rank's routing,
    ``experts`` and ``keep`` of shape (ep, n, k)."""
    ep = experts.shape[0]
    if experts.dim() != 3 or keep.shape != experts.shape or num_experts % ep:
        raise ValueError(f"routing_rows wants experts and keep of shape (ep, n, k) with ep dividing "
                         f"num_experts={num_experts}; got {tuple(experts.shape)}, {tuple(keep.shape)}")
    dst = experts // (num_experts // ep)                                  # (ep, n, k) destination rank
    src = torch.arange(ep).view(ep, 1, 1).expand_as(dst)
    rows = torch.zeros(ep * ep, dtype=torch.long)
    rows.index_add_(0, (src * ep + dst)[keep], torch.ones(int(keep.sum()), dtype=torch.long))
    return rows.view(ep, ep)


def routing_a2a_comm(experts: torch.Tensor, keep: torch.Tensor, num_experts: int, hidden: int,
                     ep_rank: int, bytes_per_element: int = 4) -> dict[str, Any]:
    """The exact all-to-all traffic of EP rank ``ep_rank`` for this routing (every EP rank's
    ``experts``/``keep``, (ep, n, k)): ``totals`` in CommCounter form (its ``bytes``: whole inputs) and
    ``off_rank_bytes`` per phase (what actually leaves the rank; counts included in forward)."""
    R = routing_rows(experts, keep, num_experts)
    ep, r, e = R.shape[0], ep_rank, bytes_per_element
    sent, recv, home = int(R[r].sum()), int(R[:, r].sum()), int(R[r, r])
    counts = _count_exchange(num_experts, ep)
    rows = OpTotal(2, (sent + recv) * hidden * e, 0)
    off = (sent + recv - 2 * home) * hidden * e
    return {"totals": {("forward", "all_to_all"): OpTotal(3, rows.bytes + counts.bytes, 0),
                       ("backward", "all_to_all"): rows},
            "off_rank_bytes": {"forward": off + counts.wire_bytes, "backward": off},
            "rows": R}


class MoECommCounter(CommCounter):
    """A :class:`CommCounter` that also reads each all-to-all's split sizes: ``off_rank_bytes[phase]``
    is the exact bytes this rank sent to *other* ranks (its own split stays home)."""

    def __init__(self, time_ops: bool = False) -> None:
        super().__init__(time_ops)
        self.off_rank_bytes: dict[str, int] = defaultdict(int)

    def _record(self, name: str, op: str, args, seconds: float) -> None:
        super()._record(name, op, args, seconds)
        if name != "alltoall_base_":  # (output, input, group, output_splits, input_splits, ...)
            return
        x, group = args[1], _process_group(args)
        size, me = group.size(), dist.get_group_rank(group, dist.get_rank())
        splits = list(args[4]) or [x.shape[0] // size] * size            # [] = equal splits
        row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
        self.off_rank_bytes[self._phase] += (sum(splits) - splits[me]) * row_bytes


def expert_capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots one expert keeps: ``⌈capacity_factor · tokens·k / E⌉`` — the router's own rule."""
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be > 0 (1.0 = an even share)")
    return router_capacity(tokens, k, num_experts, capacity_factor)


def dropped_fraction(counts: Sequence[int] | torch.Tensor, capacity: int) -> float:
    """Fraction of routed slots dropped when each expert keeps at most ``capacity``: counts (E,)."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    return float((c - capacity).clamp(min=0).sum() / c.sum()) if c.sum() > 0 else 0.0


def expected_dropped_fraction(load: Sequence[float] | torch.Tensor, tokens: int, k: int,
                              capacity_factor: float) -> float:
    """Expected dropped fraction when each of ``tokens·k`` slots picks expert ``e`` with probability
    ``load[e]`` (independently): ``Σ_e E[max(0, Binomial(T·k, p_e) − C)] / (T·k)``."""
    p = torch.as_tensor(load, dtype=torch.float64)
    if p.dim() != 1 or (p < 0).any() or abs(float(p.sum()) - 1) > 1e-6:
        raise ValueError("load must be one probability per expert, summing to 1 (e.g. the router's "
                         "mean softmax); normalise it first")
    slots, cap = tokens * k, expert_capacity(tokens, k, p.numel(), capacity_factor)
    c = torch.arange(slots + 1, dtype=torch.float64)                       # every possible count
    pmf = torch.distributions.Binomial(slots, probs=p.clamp(1e-300, 1).unsqueeze(1)).log_prob(c).exp()
    pmf = torch.where(p.unsqueeze(1) > 0, pmf, (c == 0).double())          # (E, slots+1)
    return float((pmf * (c - cap).clamp(min=0)).sum() / slots)


def plot_expert_load(counts: Sequence[int] | torch.Tensor, capacity: int | None = None,
                     ep: int = 1, ax=None):
    """Bar chart of slots routed to each expert, the capacity line and the EP ranks' boundaries."""
    import matplotlib.pyplot as plt

    c = torch.as_tensor(counts).tolist()
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4, 0.4 * len(c)), 2.5))
    ax.bar(range(len(c)), c, color=["C0" if capacity is None or n <= capacity else "C3" for n in c])
    if capacity is not None:
        ax.axhline(capacity, color="k", ls="--", lw=1, label=f"capacity {capacity}")
        ax.legend(loc="upper right")
    for b in range(1, ep):
        ax.axvline(b * len(c) / ep - 0.5, color="gray", lw=0.8)
    ax.set(xlabel="expert", ylabel="slots routed", title="expert load")
    return ax
