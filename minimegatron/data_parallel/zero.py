"""ZeRO stages 1 and 2 (Rajbhandari et al. 2020, §5): AdamW whose state lives on the N_d data-parallel
ranks in 1/N_d slices — a readable re-implementation of DeepSpeed's ``DeepSpeedZeroOptimizer``.

**The partition** (DeepSpeed's rule, :func:`minimegatron.measure.memory.partition_numel`): a run of
parameters is flattened into one vector, zero-padded to a multiple of ``alignment · N_d`` elements and
cut into ``N_d`` equal contiguous slices; data-parallel rank ``r`` owns slice ``r``::

    flat = [p_0 | p_1 | … | p_k | 0 … 0]      (padded,)   padded = N_d·⌈numel/(alignment·N_d)⌉·alignment
           [ rank 0 | rank 1 | … | rank N_d-1 ]               each (padded/N_d,)

Rank ``r`` keeps, for its slice only, the fp32 master weights and Adam's ``m`` and ``v`` (the paper's
``K = 12`` bytes per parameter, here all fp32: the master copy is redundant with fp32 weights, but it is
the copy mixed precision needs and the one DeepSpeed makes too, ``single_partition_of_fp32_groups``).

**One step**, every replica having run backward on its own micro-batch (so ``p.grad`` = ∇L_r)::

    g_r   = reduce_scatter(flat(∇L_0 … ∇L_{N-1}))[r] / N_d     this rank's slice of the mean gradient
    AdamW on (master_r, m_r, v_r) with g_r                     torch.optim.AdamW's formulas exactly
    flat  = all_gather(master_0 … master_{N-1});  p ← flat     every replica holds the new weights

stage 1 (``P_os``)   every rank keeps its full ``p.grad`` through backward; ``step()`` flattens and
                     reduce-scatters each flat vector (one per param group, DeepSpeed's layout).
stage 2 (``P_os+g``) the gradients are reduce-scattered *during* backward, bucket by bucket: a
                     post-accumulate-grad hook on every parameter counts the bucket's arrivals; when its
                     last gradient is in, the bucket is flattened and reduce-scattered, this rank adds
                     its slice to a (padded/N_d,) gradient shard and the full ``p.grad`` are freed.

Stage 2's buckets: each group's parameters in reverse order (backward meets them roughly so), cut into
runs of at most ``reduce_bucket_size`` elements (a larger parameter is a bucket of its own); *each bucket
is its own flat vector*, padded and sharded like a group, so a bucket is one reduce-scatter. (DeepSpeed
keeps one flat partition per group and sends each bucket's pieces to their owners with ``reduce``; with
the default ``reduce_bucket_size`` a bucket is a whole group and the two layouts coincide.)

Communication per step per rank, Ψ = Σ padded elements: reduce-scatter Ψ + all-gather Ψ = 2Ψ, the
all-reduce of plain data parallelism cut in its two halves (``minimegatron.measure.zero``).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.collectives import all_gather_into_tensor, reduce_scatter_tensor
from minimegatron.data_parallel.buckets import assign_buckets
from minimegatron.measure.memory import partition_numel

__all__ = ["FlatShard", "ZeroAdamW", "adamw_update_", "split_param_groups"]


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, betas: tuple[float, float], eps: float,
                  decay: Sequence[tuple[int, int, float]]) -> None:
    """torch.optim.AdamW on one flat slice, in place; ``decay``: (start, stop, weight_decay) runs::

        θ ← θ·(1 − lr·λ)     m ← β1·m + (1−β1)·g     v ← β2·v + (1−β2)·g²
        θ ← θ − lr/(1−β1^t) · m / (√v / √(1−β2^t) + ε)
    """
    b1, b2 = betas
    for start, stop, wd in decay:
        if wd != 0 and stop > start:
            param[start:stop].mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (exp_avg_sq.sqrt() / (1 - b2 ** step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - b1 ** step))


class FlatShard:
    """Parameters flattened into one padded vector, of which this rank owns ``[start, stop)``.

    Holds this rank's fp32 ``master``, ``exp_avg``, ``exp_avg_sq`` (each (padded/N_d,)) and, once
    gradients are reduced, ``grad`` (padded/N_d,). ``decay`` lists (start, stop, λ) in slice coordinates.
    """

    def __init__(self, params: Sequence[nn.Parameter], weight_decays: Sequence[float], dp: int, rank: int,
                 alignment: int = 2, name: str = "") -> None:
        self.params, self.name, self.dp, self.rank = list(params), name, dp, rank
        self.numel = sum(p.numel() for p in self.params)
        size = partition_numel(self.numel, dp, alignment)
        self.padded, self.start, self.stop = size * dp, rank * size, (rank + 1) * size
        self.decay, offset = [], 0
        for p, wd in zip(self.params, weight_decays):  # each parameter's run, clipped to this slice
            lo, hi = max(offset, self.start), min(offset + p.numel(), self.stop)
            if hi > lo:
                self.decay.append((lo - self.start, hi - self.start, float(wd)))
            offset += p.numel()
        self.master = self.flatten([p.detach() for p in self.params])[self.start:self.stop].clone()
        self.exp_avg = torch.zeros_like(self.master)     # (padded/dp,)
        self.exp_avg_sq = torch.zeros_like(self.master)  # (padded/dp,)
        self.grad: torch.Tensor | None = None            # (padded/dp,) after the reduce-scatter

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """(padded,) fp32: the tensors one after the other, then zeros."""
        flat = torch.zeros(self.padded, dtype=torch.float32, device=tensors[0].device)
        torch.cat([t.reshape(-1).float() for t in tensors], out=flat[:self.numel])
        return flat

    def reduce_scatter_mean(self, flat: torch.Tensor, group) -> torch.Tensor:
        """(padded,) local gradients -> (padded/dp,) this rank's slice of their mean over the replicas."""
        if self.dp == 1:
            return flat.clone()
        out = torch.empty(self.stop - self.start, dtype=flat.dtype, device=flat.device)
        reduce_scatter_tensor(out, flat, group=group)  # Σ over replicas, slice r
        return out.div_(self.dp)

    def all_gather(self, shard: torch.Tensor, group) -> torch.Tensor:
        """(padded/dp,) every rank's slice -> (padded,) the whole flat vector."""
        if self.dp == 1:
            return shard.clone()
        flat = torch.empty(self.padded, dtype=shard.dtype, device=shard.device)
        all_gather_into_tensor(flat, shard, group=group)
        return flat

    def unflatten_into(self, flat: torch.Tensor) -> None:
        """Copy the (padded,) vector into the parameters (the padding is dropped)."""
        offset = 0
        for p in self.params:
            p.data.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def split_param_groups(params: Iterable[Any], weight_decay: float) -> list[dict[str, Any]]:
    """Parameters or torch-style groups ``[{"params": [...], "weight_decay": λ}, ...]`` -> groups."""
    params = list(params)
    if not params:
        raise ValueError("ZeRO optimizer got an empty parameter list: pass model.parameters() or groups")
    if not isinstance(params[0], dict):
        params = [{"params": params}]
    groups = []
    for g in params:
        ps = [p for p in g["params"] if p.requires_grad]
        if ps:
            groups.append({"params": ps, "weight_decay": g.get("weight_decay", weight_decay)})
    return groups


class ZeroAdamW:
    """AdamW sharded over the data-parallel ranks: ZeRO ``stage`` 1 or 2 (module docstring).

    ``params``: ``model.parameters()`` or torch-style groups (e.g. ``training.engine.param_groups``:
    decay on matrices only). ``process_group``: the data-parallel group (``state.dp_group``; None: the
    world). ``alignment``: DeepSpeed's ``nccl_start_alignment_factor``. ``reduce_bucket_size``: stage 2's
    bucket size in elements (DeepSpeed's name and default).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, stage: int = 1, process_group=None,
                 alignment: int = 2, reduce_bucket_size: int = 500_000_000) -> None:
        if stage not in (1, 2):
            raise ValueError(f"ZeroAdamW: stage must be 1 or 2, got {stage!r}; stage 3 shards the parameters "
                             "too: minimegatron.data_parallel.zero3.Zero3AdamW(model, ...)")
        if reduce_bucket_size < 1 or alignment < 1:
            raise ValueError(f"ZeroAdamW: reduce_bucket_size ({reduce_bucket_size}) and alignment "
                             f"({alignment}) must be >= 1 element")
        self.lr, self.betas, self.eps, self.stage, self.group = lr, betas, eps, stage, process_group
        self.dp, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        self.step_count = 0
        self.shards: list[FlatShard] = []
        for g in split_param_groups(params, weight_decay):
            runs = [g["params"]] if stage == 1 else _buckets(g["params"][::-1], reduce_bucket_size)
            for run in runs:
                self.shards.append(FlatShard(run, [g["weight_decay"]] * len(run), self.dp, rank, alignment,
                                             name=f"group{len(self.shards)}"))
        # torch.optim's layout, so that measure.memory.optimizer_state_bytes counts it like any optimizer
        self.state = {s: {"fp32_master": s.master, "exp_avg": s.exp_avg, "exp_avg_sq": s.exp_avg_sq}
                      for s in self.shards}
        self._arrived: dict[FlatShard, int] = {s: 0 for s in self.shards}
        if stage == 2:
            for shard in self.shards:
                for p in shard.params:
                    p.register_post_accumulate_grad_hook(lambda p, shard=shard: self._grad_ready(shard))

    # ---- stage 2: reduce-scatter during backward ----------------------------------------------------
    @torch.no_grad()
    def _grad_ready(self, shard: FlatShard) -> None:
        """A parameter's gradient is accumulated; when the bucket is complete, reduce-scatter it."""
        self._arrived[shard] += 1
        if self._arrived[shard] < len(shard.params):
            return
        self._arrived[shard] = 0
        flat = shard.flatten([p.grad for p in shard.params])   # (padded,) this replica's gradients
        g = shard.reduce_scatter_mean(flat, self.group)          # (padded/dp,) slice r of their mean
        shard.grad = g if shard.grad is None else shard.grad.add_(g)  # accumulates over micro-batches
        for p in shard.params:
            p.grad = None  # the full gradient is gone: this rank keeps 1/dp of it

    def zero_grad(self, set_to_none: bool = True) -> None:
        for shard in self.shards:
            shard.grad = None
            for p in shard.params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Reduce-scatter (stage 1), AdamW on this rank's slices, all-gather the new weights."""
        self.step_count += 1
        for shard in self.shards:
            if self.stage == 1:
                missing = [i for i, p in enumerate(shard.params) if p.grad is None]
                if missing:
                    raise RuntimeError(f"ZeroAdamW.step: {len(missing)} parameters have no gradient: run "
                                       "loss.backward() on every rank before step()")
                shard.grad = shard.reduce_scatter_mean(shard.flatten([p.grad for p in shard.params]),
                                                       self.group)
            elif shard.grad is None or self._arrived[shard]:
                raise RuntimeError(f"ZeroAdamW.step (stage 2): bucket {shard.name} was not reduced — only "
                                   f"{self._arrived[shard]} of its {len(shard.params)} parameters got a "
                                   "gradient in backward; every trainable parameter must enter the loss")
            adamw_update_(shard.master, shard.grad, shard.exp_avg, shard.exp_avg_sq, self.step_count,
                          self.lr, self.betas, self.eps, shard.decay)
            shard.unflatten_into(shard.all_gather(shard.master, self.group))  # (padded,) -> parameters

    def flat_numels(self) -> list[int]:
        """Elements of each flat vector (group or bucket) before padding: the layout the formulas take."""
        return [s.numel for s in self.shards]

    def grad_shards(self) -> list[torch.Tensor]:
        return [s.grad for s in self.shards if s.grad is not None]



def _buckets(params: Sequence[nn.Parameter], size: int) -> list[list[nn.Parameter]]:
    """Consecutive runs of at most ``size`` elements (a larger parameter alone): DDP's rule, in elements."""
    return [[params[i] for i in run] for run in assign_buckets([p.numel() for p in params], size)]
