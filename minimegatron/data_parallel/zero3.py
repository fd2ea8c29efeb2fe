"""ZeRO stage 3 (``P_os+g+p``, Rajbhandari et al. 2020, §5.3): every rank stores only 1/N_d of each
parameter; a unit's (a layer's) full weights exist only while that unit computes.

The model is cut into **units** (:func:`zero3_units`: the embedding, each transformer layer, the final
norm, the untied LM head). Each unit's parameters are one flat vector, padded and sharded like a ZeRO-1
group (``zero.FlatShard``: slice ``r`` of ``padded = N_d·⌈numel/(alignment·N_d)⌉·alignment``). Rank r
keeps its (padded/N_d,) ``shard`` of the weights, the fp32 ``master``, ``m``, ``v`` and the gradient
shard of that slice — nothing else between units::

    forward pre-hook     full ← all_gather(shard_0 … shard_{N-1})     the unit's weights, (padded,)
    forward hook         free full                                     (weights gone until backward)
    ∂L/∂output arrives   full ← all_gather(shards) again               backward needs W: ∂L/∂x = ∂L/∂y·W
    grads accumulated    g_r ← reduce_scatter(flat(∇W))[r] / N_d;  free full and every p.grad
    step                 AdamW on master_r;  shard_r ← master_r        (no all-gather: next forward's)

Per step and rank that is 2 all-gathers + 1 reduce-scatter of every unit: 3Ψ, against 2Ψ for stages
0–2 (``minimegatron.measure.zero``) — 1.5× the volume for 1/N_d of the parameters' memory.

**How the weights come and go.** Each parameter is, once and for all, a view into its unit's (padded,)
buffer ``full``. Freeing is ``full.untyped_storage().resize_(0)``, gathering resizes it back and
all-gathers into it (the trick of torch's FSDP). That, not ``p.data = empty``, is what really frees the
memory: autograd keeps *views* of the weights for backward (``F.linear`` saves ``W.t()``), and a view
holds its storage alive — but it shares it, so a storage freed in place is freed under every view, and
refilled in place before backward, every saved view reads the gathered weights again. The version
counters do not move (the parameters are never written through autograd's eyes).

**Why a backward pre-hook, not saved-tensor hooks.** The backward pre-hook is a hook on the unit's
output tensor, registered in its forward hook: it fires once, when ∂L/∂output is complete, right before
the unit's own backward — one all-gather per unit, exactly the paper's schedule. (That is what
``register_full_backward_pre_hook`` does underneath; the module API also wraps every input and output in
an identity autograd function and warns for the embedding, whose token ids need no gradient.)
Saved-tensor hooks fire once per saved tensor (activations too), must recognise which saved tensors are
views of which weight (``W.t()`` is not ``W``), and would gather per use: more code, and a volume that
depends on how each op saves its inputs.

**The tie** (GPT): the head multiplies by the word embeddings' table at call time, so the LM head is a
second *trigger* of the embedding unit — gathered before the embedding's forward and again before the
head's, kept from the head's backward until the unit's last gradient (the table's, summing both uses)
is in. That unit moves one extra forward all-gather (``forward_gathers=2`` in the formula).

Not supported: activation recomputation (it re-runs forward inside backward) and parameters no loss
uses (their unit never completes; ``step`` says which).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.data_parallel.zero import FlatShard, adamw_update_

__all__ = ["Unit", "zero3_units", "Zero3AdamW"]


@dataclass
class Unit:
    """Parameters gathered and freed together; ``modules`` trigger the gather (the first owns them)."""

    name: str
    modules: tuple[nn.Module, ...]
    params: list[nn.Parameter] = field(default_factory=list)
    forward_gathers: int = 1  # all-gathers per forward (2 for GPT's tied embedding)


def zero3_units(model: nn.Module) -> list[Unit]:
    """A LanguageModel's units: embedding (+ the tied head), each layer, final norm, untied head."""
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False))
    units = [Unit("embedding", (model.embedding, model.lm_head) if tied else (model.embedding,),
                  list(model.embedding.parameters()), 2 if tied else 1)]
    units += [Unit(f"layers.{i}", (layer,), list(layer.parameters())) for i, layer in enumerate(model.layers)]
    for name in ("final_norm", "lm_head"):
        module = getattr(model, name, None)
        if module is not None and any(True for _ in module.parameters()):
            units.append(Unit(name, (module,), list(module.parameters())))
    return units


class _ShardedUnit(FlatShard):
    """A unit's FlatShard plus its parameter ``shard`` and the ``full`` buffer the parameters view."""

    def __init__(self, unit: Unit, decays: Sequence[float], dp: int, rank: int, alignment: int) -> None:
        super().__init__(unit.params, decays, dp, rank, alignment, name=unit.name)
        self.unit, self.pending = unit, 0
        full = self.flatten([p.detach() for p in unit.params])    # (padded,) the whole unit, once
        self.shard = full[self.start:self.stop].clone()            # (padded/dp,) the weights this rank keeps
        offset = 0
        for p in unit.params:                                      # each parameter: a view into ``full``
            p.data = full[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.full = full
        self.free()

    @property
    def gathered(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def gather(self, group) -> None:
        if self.gathered:
            return
        self.full.untyped_storage().resize_(self.padded * self.full.element_size())
        if self.dp == 1:
            self.full.copy_(self.shard)
        else:
            from minimegatron.collectives import all_gather_into_tensor
            all_gather_into_tensor(self.full, self.shard, group=group)  # (padded,) into the views' storage

    def free(self) -> None:
        self.full.untyped_storage().resize_(0)  # under every view of it, autograd's included


class Zero3AdamW:
    """AdamW over a model whose parameters are sharded over the data-parallel ranks (module docstring).

    Build it right after the model (it re-homes every parameter into its unit's buffer and frees it);
    then ``loss = model(...); loss.backward(); opt.step(); opt.zero_grad()`` as usual. ``units``: the
    gather granularity, :func:`zero3_units` by default. ``weight_decay`` applies to matrices only
    (``p.dim() >= 2``, as ``training.engine.param_groups``) unless ``decay_all=True``.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, units: list[Unit] | None = None,
                 process_group=None, alignment: int = 2, decay_all: bool = False) -> None:
        if getattr(model, "recompute", "none") != "none":
            raise ValueError(f"Zero3AdamW: the model recomputes activations ({model.recompute!r}), which "
                             "re-runs forward inside backward and would free the weights backward needs; "
                             "build the model with recompute='none'")
        units = zero3_units(model) if units is None else units
        seen = [id(p) for u in units for p in u.params]
        if len(seen) != len(set(seen)) or set(seen) != {id(p) for p in model.parameters() if p.requires_grad}:
            raise ValueError("Zero3AdamW: every trainable parameter must be in exactly one unit; pass "
                             "units= that cover model.parameters() once (zero3_units(model) does for a "
                             "LanguageModel)")
        self.lr, self.betas, self.eps, self.group = lr, betas, eps, process_group
        self.dp, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        self.step_count = 0
        self.units = [_ShardedUnit(u, [weight_decay if decay_all or p.dim() >= 2 else 0.0 for p in u.params],
                                   self.dp, rank, alignment) for u in units]
        self.state = {u: {"fp32_master": u.master, "exp_avg": u.exp_avg, "exp_avg_sq": u.exp_avg_sq}
                      for u in self.units}
        for u in self.units:
            for module in u.unit.modules:
                module.register_forward_pre_hook(lambda m, args, u=u: u.gather(self.group))
                module.register_forward_hook(lambda m, args, out, u=u: self._after_forward(u, out))
            for p in u.params:
                p.register_post_accumulate_grad_hook(lambda p, u=u: self._grad_ready(u))

    @torch.no_grad()
    def _grad_ready(self, u: _ShardedUnit) -> None:
        """One more of the unit's gradients is in; with the last, reduce-scatter and free everything."""
        u.pending += 1
        if u.pending < len(u.params):
            return
        u.pending = 0
        g = u.reduce_scatter_mean(u.flatten([p.grad for p in u.params]), self.group)  # (padded/dp,)
        u.grad = g if u.grad is None else u.grad.add_(g)
        for p in u.params:
            p.grad = None
        u.free()

    def _after_forward(self, u: _ShardedUnit, out) -> None:
        """Free the unit's weights; gather them again when ∂L/∂out arrives (its backward pre-hook)."""
        u.free()
        if torch.is_tensor(out) and out.requires_grad:
            out.register_hook(lambda grad, u=u: u.gather(self.group))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for u in self.units:
            u.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's master slice of every unit, then the write-back into its shard."""
        self.step_count += 1
        for u in self.units:
            if u.grad is None or u.pending:
                raise RuntimeError(f"Zero3AdamW.step: unit {u.name} got {u.pending} of its {len(u.params)} "
                                   "gradients; run loss.backward() on every rank, and use every parameter")
            if not torch.equal(u.shard, u.master):
                raise RuntimeError(f"Zero3AdamW: unit {u.name}'s parameter shard is stale — the last step "
                                   "updated the fp32 master but did not write it back into the shard, so "
                                   "this forward ran on old weights; copy master into shard after AdamW")
            adamw_update_(u.master, u.grad, u.exp_avg, u.exp_avg_sq, self.step_count, self.lr, self.betas,
                          self.eps, u.decay)
            self.write_back(u)

    def write_back(self, u: _ShardedUnit) -> None:
        """shard ← master: what the next forward all-gathers (the step a stale-shard bug forgets)."""
        u.shard.copy_(u.master)

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Every parameter whole inside the block (to read or save them); sharded again after it."""
        for u in self.units:
            u.gather(self.group)
        try:
            yield
        finally:
            for u in self.units:
                u.free()

    def flat_numels(self) -> list[int]:
        return [u.numel for u in self.units]

    def param_shards(self) -> list[torch.Tensor]:
        return [u.shard for u in self.units]

    def grad_shards(self) -> list[torch.Tensor]:
        return [u.grad for u in self.units if u.grad is not None]

    def full_parameter_bytes(self) -> int:
        """Bytes of full (gathered) weights alive now, read off the parameters' own storages."""
        from minimegatron.measure.memory import storage_bytes

        return storage_bytes(p for u in self.units for p in u.params)
