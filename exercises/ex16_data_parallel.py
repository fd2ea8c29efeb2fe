"""Exercise 16: data parallelism from the inside — the bucket hook, a ZeRO-2 step, ZeRO-3's gather.

Every rank holds a replica (16.1), or 1/N_d of the state (16.2, 16.3), and runs backward on its own
micro-batch; the mean gradient ḡ = (1/N_d) Σ_r g_r is what one model on the whole batch would get.

16.1  BucketedDDP.on_grad_ready(param) and .finish_grad_sync() — overlapped, bucketed DDP (Li et al.
      2020, torch DDP's Reducer). Given: the parameters in reverse order cut into ``self.buckets``, one
      flat buffer per bucket ``self.buffers[i]`` (bucket numel,), ``self.bucket_of[p]``,
      ``self.offset_of[p]``, ``self.ready[i]`` and a post-accumulate-grad hook per parameter that calls
      ``on_grad_ready(p)`` the moment p.grad is final. ``on_grad_ready``: copy p.grad into its slot of
      the bucket's buffer, count it; when the bucket is full, launch
      ``dist.all_reduce(buffer, group=self.group, async_op=True)`` and keep the Work in
      ``self.handles`` — backward goes on computing earlier layers while the bucket travels.
      ``finish_grad_sync``: wait for every handle, divide by N_d = ``self.dp``, copy back into p.grad.

16.2  Zero2AdamW.on_grad_ready(param) and .step() — ZeRO-2 (Rajbhandari et al. 2020) per bucket, as
      Megatron's distributed optimizer cuts it: bucket i is flattened, zero-padded to ``self.padded[i]``
      (a multiple of N_d) and rank r owns its r-th slice, which sits at ``self.shard_range[i] = (lo, hi)``
      of this rank's vectors ``self.master``, ``self.grad_shard``, ``self.exp_avg``, ``self.exp_avg_sq``
      (Σ padded_i / N_d,). ``on_grad_ready``: count; when the bucket is full reduce-scatter
      ``self.flat_grads(i)`` into ``self.grad_shard[lo:hi]`` (minimegatron.collectives.reduce_scatter_tensor,
      group=self.group) and free the bucket's full gradients (p.grad = None): only 1/N_d of them lives.
      ``step``: t = self.step_count (already counted); g = grad_shard / N_d; AdamW on the shard::

          master ← master·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
          master ← master − lr/(1 − β1^t) · m / (sqrt(v/(1 − β2^t)) + eps)

      then all-gather every bucket's slice (all_gather_into_tensor into a (padded_i,) vector) and
      ``self.set_params(i, full)``. backward: reduce-scatter per bucket; step: all-gather per bucket.

16.3  Zero3Model.gather(unit) and .release(unit) — ZeRO-3 / FSDP. Each unit (a Linear layer) keeps only
      ``unit.shard``: this rank's (padded/N_d,) slice of its flat, zero-padded parameters, which the
      optimizer updates. The scaffold calls ``gather(unit)`` before the unit's forward and before its
      backward, ``release(unit)`` after each. ``gather``: all-gather the shards (``unit.group``) into a
      (unit.padded,) vector and point each ``unit.params[j].data`` at its view (``unit.shapes[j]``);
      ``release``: free the full parameters (``p.data = torch.empty(0)``) and keep the shard.
      forward: all-gather per unit; backward: all-gather again, then reduce-scatter the gradients.

Grade with:  grade_bucketed_ddp(BucketedDDP)   grade_zero2_adamw(Zero2AdamW)   grade_zero3(Zero3Model)
Each runs your class on 2 and 4 gloo ranks beside one model on the whole batch (its gradient; AdamW,
3 steps), records every collective and hook call and names the usual mistakes (_ex16_mistakes.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from exercises import _ex16_given as G
from exercises import _ex16_mistakes as M
from exercises._ex16_ranks import DDP_STEPS, ddp_case, zero2_case, zero3_case
from exercises.grading import MULTI_RANK_TIMEOUT, GradingError, assert_close, grader, passed, run_graded
from minimegatron.collectives import all_gather_into_tensor, reduce_scatter_tensor  # noqa: F401 (yours too)


class BucketedDDP:
    """A replica whose gradients are averaged bucket by bucket while backward runs."""

    def __init__(self, module: nn.Module, buckets: list[list[nn.Parameter]], group: Any) -> None:
        self.module, self.buckets, self.group, self.dp = module, buckets, group, dist.get_world_size(group)
        self.bucket_of: dict[nn.Parameter, int] = {}
        self.offset_of: dict[nn.Parameter, int] = {}
        self.buffers: list[torch.Tensor] = []
        for i, bucket in enumerate(buckets):
            offset = 0
            for p in bucket:
                self.bucket_of[p], self.offset_of[p], offset = i, offset, offset + p.numel()
            self.buffers.append(torch.zeros(offset))  # (bucket numel,) bucket i's flat gradients
        self.ready = [0] * len(buckets)               # gradients of bucket i in its buffer this step
        self.handles: list[Any] = []                  # the Work of every launched all-reduce
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(lambda param: self.on_grad_ready(param))

    def zero_grad(self) -> None:
        for p in self.bucket_of:
            p.grad = None
        self.ready, self.handles = [0] * len(self.buckets), []

    def on_grad_ready(self, param: nn.Parameter) -> None:
        """Your code (16.1): param.grad is final — put it in its bucket; launch the bucket when full."""
        raise NotImplementedError("Exercise 16.1: copy param.grad into self.buffers[i] at self.offset_of["
                                  "param], count it in self.ready[i]; when the bucket is full launch dist."
                                  "all_reduce(buffer, group=self.group, async_op=True), keep the Work in "
                                  "self.handles")

    def finish_grad_sync(self) -> None:
        """Your code (16.1): before the step — every bucket reduced, averaged, back in p.grad."""
        raise NotImplementedError("Exercise 16.1: wait() on every handle, divide each buffer by self.dp, "
                                  "copy each parameter's slice back into p.grad")


class Zero2AdamW:
    """AdamW with the optimizer state and the gradients partitioned over the data-parallel ranks."""

    def __init__(self, buckets: list[list[nn.Parameter]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, group: Any) -> None:
        self.buckets, self.group, self.lr, self.betas, self.eps = buckets, group, lr, betas, eps
        self.weight_decay, self.step_count = weight_decay, 0
        self.dp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.bucket_of = {p: i for i, bucket in enumerate(buckets) for p in bucket}
        self.padded = [G.padded(sum(p.numel() for p in b), self.dp) for b in buckets]  # bucket i, flat
        self.shard_range, lo, slices = [], 0, []
        for i, size in enumerate(self.padded):
            s = size // self.dp
            self.shard_range.append((lo, lo + s))
            slices.append(G.flat(buckets[i], size)[self.rank * s:(self.rank + 1) * s])
            lo += s
        self.master = torch.cat(slices)                 # (Σ padded_i/dp,) this rank's fp32 weights
        self.grad_shard = torch.zeros_like(self.master)  # (Σ padded_i/dp,) Σ_r of this rank's slices
        self.exp_avg = torch.zeros_like(self.master)     # (Σ padded_i/dp,) Adam's m, this rank's only
        self.exp_avg_sq = torch.zeros_like(self.master)  # (Σ padded_i/dp,) Adam's v
        self.ready = [0] * len(buckets)
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(lambda param: self.on_grad_ready(param))

    def flat_grads(self, i: int) -> torch.Tensor:
        """Bucket i's gradients, flattened and zero-padded: (padded_i,)."""
        return G.flat([p.grad for p in self.buckets[i]], self.padded[i])

    @torch.no_grad()
    def set_params(self, i: int, full: torch.Tensor) -> None:
        """Copy the (padded_i,) vector ``full`` into bucket i's parameters (the padding dropped)."""
        offset = 0
        for p in self.buckets[i]:
            p.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def zero_grad(self) -> None:
        for p in self.bucket_of:
            p.grad = None
        self.ready = [0] * len(self.buckets)
        self.grad_shard.zero_()

    def on_grad_ready(self, param: nn.Parameter) -> None:
        """Your code (16.2): count; a full bucket → reduce-scatter into the shard, free its p.grad."""
        raise NotImplementedError("Exercise 16.2: count param in self.ready[i]; when the bucket is full, "
                                  "reduce_scatter_tensor(self.grad_shard[lo:hi], self.flat_grads(i), group="
                                  "self.group) and set p.grad = None for every p of the bucket")

    @torch.no_grad()
    def step(self) -> None:
        """Your code (16.2): AdamW on this rank's shard, then all-gather every bucket's weights."""
        self.step_count += 1
        raise NotImplementedError("Exercise 16.2: g = self.grad_shard / self.dp, AdamW on self.master, then "
                                  "per bucket all_gather_into_tensor((padded_i,), master[lo:hi]) and set_params")


@dataclass(eq=False)
class Unit:
    """One layer's parameters under ZeRO-3: the shard stays, the full parameters come and go."""
    module: nn.Module
    params: list[nn.Parameter]
    shapes: list[torch.Size]
    padded: int                     # the flat parameters' numel, zero-padded to a multiple of dp
    shard: nn.Parameter             # (padded/dp,) this rank's slice: the only copy kept between uses
    group: Any
    ready: int = 0                  # gradients of the unit accumulated in this backward


class Zero3Model:
    """A model whose layers exist only as shards, gathered around each use."""

    def __init__(self, model: nn.Sequential, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, group: Any) -> None:
        self.model, self.group, self.dp = model, group, dist.get_world_size(group)
        r, self.units = dist.get_rank(group), []
        for module in (m for m in model if list(m.parameters())):  # a unit per layer with parameters
            params = list(module.parameters())
            size = G.padded(sum(p.numel() for p in params), self.dp)
            shard = nn.Parameter(G.flat(params, size).chunk(self.dp)[r].clone())  # (size/dp,)
            unit = Unit(module, params, [p.shape for p in params], size, shard, group)
            for p in params:
                p.data = torch.empty(0)  # freed: the shard is all this rank keeps
                p.register_post_accumulate_grad_hook(lambda p, unit=unit: self._grad_ready(unit))
            module.register_forward_pre_hook(lambda m, args, unit=unit: self.gather(unit))
            module.register_forward_hook(lambda m, args, out, unit=unit: self._after_forward(unit, out))
            self.units.append(unit)
        self.optimizer = torch.optim.AdamW([u.shard for u in self.units], lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _after_forward(self, unit: Unit, out: torch.Tensor) -> None:
        self.release(unit)
        if out.requires_grad:  # gather again when the gradient reaches the unit's output
            out.register_hook(lambda grad: self.gather(unit))

    def _grad_ready(self, unit: Unit) -> None:
        """Post-backward: all the unit's gradients are in — reduce-scatter them into the shard's."""
        unit.ready += 1
        if unit.ready < len(unit.params):
            return
        grad = torch.empty_like(unit.shard)  # (padded/dp,)
        reduce_scatter_tensor(grad, G.flat([p.grad for p in unit.params], unit.padded), group=self.group)
        unit.shard.grad = grad / self.dp
        for p in unit.params:
            p.grad = None
        self.release(unit)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for unit in self.units:
            unit.ready = 0

    def gather(self, unit: Unit) -> None:
        """Your code (16.3): the unit's full parameters from every rank's shard."""
        raise NotImplementedError("Exercise 16.3: all_gather_into_tensor a (unit.padded,) vector from "
                                  "unit.shard over unit.group; set each unit.params[j].data to its view "
                                  "(shape unit.shapes[j])")

    def release(self, unit: Unit) -> None:
        """Your code (16.3): free the unit's full parameters; keep the shard."""
        raise NotImplementedError("Exercise 16.3: p.data = torch.empty(0) for every p in unit.params; "
                                  "leave unit.shard alone")


# --- grading -----------------------------------------------------------------------------------------

@grader
def grade_bucketed_ddp(candidate_cls: type, world_sizes: Sequence[int] = (2, 4),
                       timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """16.1 on 2 and 4 ranks, 2 steps: the collectives (per bucket, when full, async, waited, during
    backward, this group) and the gradients (the whole batch's, on one model)."""
    model = M.tiny_model()
    sizes = [sum(p.numel() for p in b) for b in M.reverse_buckets(model)]
    names, numels = [n for n, _ in model.named_parameters()], {p.numel() for p in model.parameters()}
    for dp in world_sizes:
        results = run_graded(ddp_case, dp, candidate_cls, timeout=timeout)
        for step in range(DDP_STEPS):
            where = f"Exercise 16.1 (dp={dp}, step {step + 1})"
            problem = M.ddp_problem(results[0]["calls"], step, dp, sizes, numels)
            if problem:
                raise GradingError(f"{where}: {problem}")
            for r, res in enumerate(results):
                M.check_grads(f"{where}, rank {r}", names, res["grads"][step], res["expected"][step], dp)
    return passed("Exercise 16.1: one async all-reduce per full bucket during backward, waited and averaged "
                  "— the whole batch's gradients on 2 and 4 ranks")


@grader
def grade_zero2_adamw(candidate_cls: type, world_sizes: Sequence[int] = (2, 4),
                      timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """16.2 on 2 and 4 ranks, 3 steps: weights and this rank's exp_avg vs torch.optim.AdamW on the
    whole batch, the collectives (reduce-scatter in backward, all-gather in step), gradients freed."""
    import torch._dynamo  # noqa: F401  (AdamW's first step imports it: once here, not in every rank)
    names, shapes = zip(*[(n, p.shape) for n, p in M.tiny_model().named_parameters()])
    numels = [s.numel() for s in shapes]
    for dp in world_sizes:
        results = run_graded(zero2_case, dp, candidate_cls, timeout=timeout)
        for step in range(M.STEPS):
            where = f"Exercise 16.2 (dp={dp}, step {step + 1})"
            problem = M.zero2_problem(results[0]["calls"], step, results[0]["alive"][step], dp)
            if problem:
                raise GradingError(f"{where}: {problem}")
            params = [res["params"][step] for res in results]
            if any(not torch.equal(params[0], q) for q in params[1:]):
                raise GradingError(f"{where}: the ranks hold different weights after the step — all-gather "
                                   "every bucket's updated master slice and set_params on every rank")
            for r, res in enumerate(results):
                got, expected = res["exp_avg"][step], res["expected_exp_avg"][step]
                if isinstance(got, torch.Tensor) and got.shape == expected.shape and \
                        torch.allclose(got, dp * expected, rtol=1e-4, atol=1e-7):
                    raise GradingError(f"{where}, rank {r}: exp_avg is {dp}× Adam's — the reduce-scatter "
                                       f"sums the replicas' gradients: divide by N_d = {dp} for the mean")
            for name, shape, got, expected in zip(names, shapes, params[0].split(numels),
                                                  results[0]["expected"][step].split(numels)):
                assert_close(f"{where}, {name} after the step (vs torch.optim.AdamW on the whole batch)",
                             got.view(shape), expected.view(shape), rtol=1e-5, atol=1e-6)
            for r, res in enumerate(results):
                assert_close(f"{where}, rank {r}, exp_avg: Adam's m for this rank's slice of every bucket",
                             res["exp_avg"][step], res["expected_exp_avg"][step], rtol=1e-5, atol=1e-7)
    return passed("Exercise 16.2: ZeRO-2 — gradients reduce-scattered per bucket during backward, 1/N_d of "
                  "them and of Adam's state per rank — equals AdamW on the whole batch on 2 and 4 ranks")


@grader
def grade_zero3(candidate_cls: type, world_sizes: Sequence[int] = (2, 4),
                timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """16.3 on 2 and 4 ranks, 3 steps: the weights each forward used and every shard after each step vs
    torch.optim.AdamW on the whole batch; the full parameters alive at each gather."""
    import torch._dynamo  # noqa: F401  (as above)
    for dp in world_sizes:
        results = run_graded(zero3_case, dp, candidate_cls, timeout=timeout)
        problem = M.zero3_problem(results[0]["record"], results[0]["used_expected"], dp)
        if problem:
            raise GradingError(f"Exercise 16.3 (dp={dp}), {problem}")
        for step, r in ((step, r) for step in range(M.STEPS) for r in range(dp)):
            for k, (got, expected) in enumerate(zip(results[r]["shards"][step], results[r]["expected"][step])):
                assert_close(f"Exercise 16.3 (dp={dp}, after step {step + 1}), rank {r}'s shard of unit {k} (vs "
                             "torch.optim.AdamW on the whole batch)", got, expected, rtol=1e-5, atol=1e-6)
    return passed("Exercise 16.3: ZeRO-3 — each unit gathered for its forward and backward and released "
                  "after — equals AdamW on the whole batch on 2 and 4 ranks")
