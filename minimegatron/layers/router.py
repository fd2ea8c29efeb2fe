"""TopKRouter: which k experts each token goes to, with what weight, and the two router losses.

Top-k softmax routing (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral, Jiang et al. 2024)::

    logits = x·Wᵀ                 W (E, h) replicated, no bias             (n, E)
    p      = softmax(logits)      in fp32, over the E experts              (n, E)
    experts, w = topk(p, k)       the k largest per token                  (n, k)
    w      = w / Σ_j w_j          Mixtral's renormalisation of the k weights (k = 1: w = 1; Switch
                                  instead keeps the raw p of its one expert: ``normalize=False``)

**Capacity** (Switch §2.2, GShard): an expert takes at most ``C = ⌈cf · n · k / E⌉`` of this rank's
``n·k`` routed slots. Slots are served in (token, slot) order — token 0's k slots, then token 1's, … —
so when an expert is full, the *later tokens* lose their slot to it (``keep[t, j] = False``); a dropped
slot contributes 0 and the token keeps only the residual stream there. ``capacity_factor=None`` is
Mixtral's no-drop mode (``keep`` all True).

**Load-balancing loss** (Switch eq. 4; Mixtral's training)::

    aux = E · Σ_e f_e · P_e,   f_e = (slots routed to e) / (n·k)   (before dropping; Σ_e f_e = 1)
                               P_e = mean over tokens of p[:, e]
It is 1 when routing is uniform; at collapse — every token's k slots on the same k experts, each with
probability ≈ 1/k — f_e = P_e = 1/k on those k, so aux = E/k (E for Switch's k = 1). The gradient flows
through P_e only (f_e counts). Hugging Face's ``load_balancing_loss_func`` takes ``f_e`` as slots / n
(summing to k), so its value is k·aux for one layer (equal for k = 1); over several layers it averages
f and P across layers before multiplying — equal to ours only for one MoE layer.

**Router z-loss** (ST-MoE, Zoph et al. 2022, eq. 5): ``z = mean_t (logsumexp_e logits[t, e])²``,
keeping the logits small so the fp32 softmax stays well conditioned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minimegatron.mpu.layers import init_normal

__all__ = ["TopKRouter", "Routing", "expert_capacity", "capacity_keep", "load_balancing_loss",
           "z_loss"]


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """``⌈cf · n · k / E⌉`` slots per expert, or None (no drop) when ``capacity_factor`` is None."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_keep(experts: torch.Tensor, num_experts: int, capacity: int | None) -> torch.Tensor:
    """(n, k) bool: slot (t, j) kept iff fewer than ``capacity`` earlier slots (in (token, slot)
    order) went to the same expert. All True for ``capacity=None``."""
    if capacity is None:
        return torch.ones_like(experts, dtype=torch.bool)
    one_hot = F.one_hot(experts.reshape(-1), num_experts)  # (n·k, E), rows in (token, slot) order
    position = (one_hot.cumsum(0) - 1).gather(1, experts.reshape(-1, 1))  # (n·k, 1): place in its queue
    return (position < capacity).view_as(experts)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``E · Σ_e f_e · P_e``: probs (n, E) the full softmax, experts (n, k) the routed ids."""
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts)  # (E,)
    f = counts.to(probs.dtype) / experts.numel()  # (E,) share of the n·k slots, Σ = 1
    P = probs.mean(0)  # (E,)
    return num_experts * (f * P).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean_t (logsumexp_e logits[t, e])²`` over the (n, E) router logits (fp32)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


@dataclass
class Routing:
    """One forward's routing of n tokens: what the dispatcher and the losses need, and statistics."""

    probs: torch.Tensor            # (n, k) fp32 weights of the chosen experts (renormalised if asked)
    experts: torch.Tensor          # (n, k) long, global expert ids
    keep: torch.Tensor             # (n, k) bool, False = dropped by capacity
    aux_loss: torch.Tensor         # () load-balancing loss
    z_loss: torch.Tensor           # () router z-loss
    tokens_per_expert: torch.Tensor  # (E,) long, slots routed to each expert before dropping
    capacity: int | None           # slots per expert, None = no drop

    @property
    def dropped(self) -> int:
        """Slots dropped by capacity (a token may lose some of its k slots, or all)."""
        return int((~self.keep).sum())

    @property
    def kept_per_expert(self) -> torch.Tensor:
        """(E,) slots each expert computes (after dropping)."""
        E = self.tokens_per_expert.numel()
        return torch.bincount(self.experts[self.keep], minlength=E)


class TopKRouter(nn.Module):
    """x (n, h) -> :class:`Routing`. The gate W (E, h) is replicated on every rank (all ranks that see
    the same tokens route them the same way); drawn N(0, init_std²) like every linear layer."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 capacity_factor: float | None = None, normalize: bool = True,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]: each token picks "
                             "k distinct experts")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.normalize = capacity_factor, normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # (E, h)
        init_normal(init_std)(self.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x, self.weight).float()  # (n, E), fp32 for the softmax
        probs = torch.softmax(logits, dim=-1)  # (n, E)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (n, k), (n, k)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)  # Mixtral: the k weights sum to 1
        capacity = expert_capacity(x.size(0), self.top_k, self.num_experts, self.capacity_factor)
        keep = capacity_keep(experts, self.num_experts, capacity)  # (n, k)
        return Routing(probs=weights, experts=experts, keep=keep,
                       aux_loss=load_balancing_loss(probs, experts, self.num_experts),
                       z_loss=z_loss(logits),
                       tokens_per_expert=torch.bincount(experts.reshape(-1), minlength=self.num_experts),
                       capacity=capacity)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"normalize={self.normalize}")
