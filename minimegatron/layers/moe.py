"""MoEMLP: a router, E experts (each the dense ParallelMLP) and a dispatcher that moves tokens to them.

A mixture-of-experts MLP (Shazeer et al. 2017; GShard; Switch; Mixtral) replaces the one MLP of a layer
by E of them, of which each token uses k::

    route:    experts, w, keep = TopKRouter(x)                 (n, k) each      (router.py)
    dispatch: rows = x[tokens of the kept slots], grouped by expert            (m, h), m ≤ n·k
    experts:  y_e = MLP_e(rows of e)                                           (m_e, h) each
    combine:  out[t] = Σ_j keep[t, j] · w[t, j] · y(t, j)                      (n, h)

The dispatcher is the only part that depends on the layout (the ``TokenDispatcher`` protocol below):
:class:`LocalDispatcher` (ep = 1) permutes rows with ``index_select`` and sums them back with
``index_add`` (their backward: ``index_add`` and ``index_select`` — a permutation, no communication);
``mpu.expert_parallel.AllToAllDispatcher`` (ep > 1) sends each row to the rank that holds its expert
with an all-to-all and brings the outputs home with the reverse one (forward a2a + backward a2a, twice).
This rank holds experts ``[ep_rank·E/ep, (ep_rank+1)·E/ep)``; expert ``e`` draws its weights from
``init_rng(base, e)`` with ``base`` one draw of the layer's generator, so every EP (and TP) layout holds
the same model. Expert parameters carry ``expert_parallel = True``: their gradients are summed over the
expert-data-parallel group and divided by dp (the a2a backward already summed the EP group's tokens).

**Tensor parallelism** inside each expert is the dense MLP's: ``dense_h_to_4h`` column-parallel (f:
backward all-reduce of ∂L/∂rows), ``dense_4h_to_h`` row-parallel (g: forward all-reduce). Every TP rank
sees the same tokens and routes them alike (the gate is replicated, its gradient equal on every rank).

**Sequence parallelism**: the block receives (s/tp, b, h). It all-gathers the sequence first (backward:
keep this rank's chunk — the gradient arriving there is already the whole one on every TP rank), routes
all s·b tokens on every TP rank (so capacity and routing do not depend on tp), runs the experts as under
plain TP (f, g), and keeps its (s/tp, b, h) chunk of the output (backward: all-gather). Correct, and
simple; it moves one all-reduce more than the dense SP MLP (Megatron's all-gather dispatcher instead
reduce-scatters the experts' partial sums).

Tokens are flattened in Megatron's (s, b) order: token ``t = i·b + j`` is position i of sequence j;
"later tokens" (capacity dropping) means later in that order. After each forward, ``self.routing``
holds the :class:`~minimegatron.layers.router.Routing` (``tokens_per_expert``, ``kept_per_expert``,
``dropped``, ``capacity``) and ``self.aux_loss`` / ``self.z_loss`` the two router losses, which
``LanguageModel.forward`` adds to the loss (``moe_aux_loss_coeff``, ``moe_z_loss_coeff``).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.config import ModelConfig
from minimegatron.layers.init_seed import init_rng
from minimegatron.layers.mlp import ParallelMLP
from minimegatron.layers.router import Routing, TopKRouter
from minimegatron.mpu.mappings import (gather_from_sequence_parallel_region,
                                       scatter_to_sequence_parallel_region)
from minimegatron.mpu.state import ParallelState
from minimegatron.sizes import divide

__all__ = ["TokenDispatcher", "LocalDispatcher", "MoEMLP", "build_dispatcher", "router_losses",
           "expert_parameter_count"]


class TokenDispatcher(Protocol):
    """Moves each token's k routed copies to the rank that holds its expert, and back."""

    num_local_experts: int  # experts held on this rank: E / ep

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int]]:
        """x (n, h), experts (n, k) global ids, keep (n, k) -> rows (m, h) grouped by local expert
        (expert-major; inside one expert by (source rank, token, slot)) and the rows per local expert."""
        ...

    def combine(self, y: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """y (m, h) in dispatch's row order, probs (n, k) -> (n, h): Σ_j keep·probs·y_row(t, j)."""
        ...


class LocalDispatcher:
    """ep = 1: every expert is here; dispatch is a permutation of the kept slots, combine its sum."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = self.num_local_experts = num_experts
        self._slots: torch.Tensor | None = None

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int]]:
        n, k = experts.shape
        flat = experts.reshape(-1)  # (n·k,) slot t·k + j
        kept = keep.reshape(-1).nonzero().squeeze(1)  # (m,) kept slots, in (token, slot) order
        order = torch.sort(flat[kept], stable=True).indices  # expert-major, (token, slot) inside
        self._slots, self._n = kept[order], n  # (m,) the slot of each row
        counts = torch.bincount(flat[kept], minlength=self.num_experts).tolist()
        return x.index_select(0, self._slots // k), counts  # (m, h); backward: index_add

    def combine(self, y: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if self._slots is None:
            raise RuntimeError("LocalDispatcher.combine before dispatch: call dispatch(x, experts, keep) "
                               "first, it remembers where each row goes")
        k = probs.size(1)
        w = probs.reshape(-1).index_select(0, self._slots).to(y.dtype)  # (m,) each row's weight
        out = y.new_zeros(self._n, y.size(1))  # (n, h)
        return out.index_add(0, self._slots // k, y * w.unsqueeze(1))  # dropped slots: no row, 0


def build_dispatcher(num_experts: int, state: ParallelState) -> TokenDispatcher:
    """All-to-all over ``state.ep_group`` when ep > 1, else the local permutation."""
    if getattr(state, "ep", 1) > 1:
        from minimegatron.mpu.expert_parallel import AllToAllDispatcher
        return AllToAllDispatcher(num_experts, state)
    return LocalDispatcher(num_experts)


class MoEMLP(nn.Module):
    """(s[/tp], b, h) -> (s[/tp], b, h): top-k routed experts, this rank holding E/ep of them."""

    def __init__(self, config: ModelConfig, state: ParallelState | None = None) -> None:
        super().__init__()
        state = state or ParallelState()
        if config.num_experts < 1:
            raise ValueError(f"MoEMLP needs num_experts >= 1, got {config.num_experts}: set "
                             "ModelConfig(num_experts=E) or build the dense ParallelMLP")
        E, ep, ep_rank = config.num_experts, getattr(state, "ep", 1), getattr(state, "ep_rank", 0)
        local = divide(E, ep, "num_experts", by=f"expert-parallel size {ep}",
                       fix="each EP rank holds E/ep whole experts; choose ep dividing num_experts")
        self.state, self.num_experts, self.sequence_parallel = state, E, state.sequence_parallel
        self.router = TopKRouter(config.hidden_size, E, config.moe_top_k,
                                 capacity_factor=config.moe_capacity_factor, init_std=config.init_std)
        self.dispatcher = build_dispatcher(E, state)
        self.local_expert_ids = list(range(ep_rank * local, (ep_rank + 1) * local))
        base = int(torch.randint(2**62, ()))  # one draw of the layer's generator, same on every layout
        # experts see whole (gathered) tokens: plain TP inside them, never SP's gather/scatter
        expert_state = dataclasses.replace(state, sequence_parallel=False) if state.sequence_parallel else state
        self.experts = nn.ModuleList()
        for e in self.local_expert_ids:
            with init_rng(base, e):  # weights of global expert e, whichever rank holds it
                self.experts.append(ParallelMLP(config, expert_state))
        for p in self.experts.parameters():
            p.expert_parallel = True
        self.routing: Routing | None = None
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # (s/tp, b, h) -> (s, b, h); backward: keep this rank's chunk
            x = gather_from_sequence_parallel_region(x, self.state, tensor_parallel_output_grad=False)
        s, b, h = x.shape
        tokens = x.reshape(s * b, h)  # (n, h), token i·b + j
        routing = self.router(tokens)
        rows, counts = self.dispatcher.dispatch(tokens, routing.experts, routing.keep)  # (m, h)
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, rows.split(counts))])
        out = self.dispatcher.combine(y, routing.probs).view(s, b, h)  # (s, b, h)
        self.routing, self.aux_loss, self.z_loss = routing, routing.aux_loss, routing.z_loss
        if self.sequence_parallel:
            out = scatter_to_sequence_parallel_region(out, self.state)  # (s/tp, b, h)
        return out

    def extra_repr(self) -> str:
        return (f"experts {self.local_expert_ids[0]}…{self.local_expert_ids[-1]} of {self.num_experts} "
                f"here, sequence_parallel={self.sequence_parallel}")


def router_losses(layers: Iterable[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ aux, Σ z) of the last forward over the transformer ``layers`` whose MLP is an MoEMLP."""
    moe = [layer.mlp for layer in layers if isinstance(layer.mlp, MoEMLP) and layer.mlp.aux_loss is not None]
    zero = torch.zeros(())  # a 0-dim CPU tensor adds to a tensor on any device
    return (sum((m.aux_loss for m in moe), zero), sum((m.z_loss for m in moe), zero))


def expert_parameter_count(module: nn.Module, state: ParallelState) -> int:
    """Elements of the ``expert_parallel`` parameters of the whole model: this rank holds E/ep experts
    (summed over the EP group) and of each its TP shard (the TP-sharded ones summed over TP too)."""
    def over(n: int, group, size: int) -> int:
        total = torch.tensor([n], dtype=torch.int64)
        if size > 1:
            dist.all_reduce(total, group=group)
        return int(total.item())

    experts = [p for p in module.parameters() if getattr(p, "expert_parallel", False)]
    sharded = sum(p.numel() for p in experts if getattr(p, "tensor_model_parallel", False))
    replicated = sum(p.numel() for p in experts if not getattr(p, "tensor_model_parallel", False))
    return over(over(sharded, state.tp_group, state.tp) + replicated,
                getattr(state, "ep_group", None), getattr(state, "ep", 1))
