"""Exercise 03: vocab-parallel embedding and cross-entropy.

The vocabulary V is split over the TP ranks: rank i holds rows [vocab_start_index, vocab_end_index)
of the embedding table, and the same columns of the logits.

03.1  vocab_parallel_embedding_forward(input_ids, weight_shard, vocab_start_index, vocab_end_index,
      state) — look up the ids this rank owns (shifted to local rows), write zeros for the others,
      and sum over the TP group with g (``minimegatron.mpu.reduce_from_tensor_model_parallel_region``).
      (b, s) ids → (b, s, h), the same on every rank; weight_shard's gradient must be right too.
03.2  vocab_parallel_cross_entropy_forward(logits_shard, target, state) — per-token loss (…) from
      this rank's logit columns (…, V/tp) and the full targets (…), equal to
      F.cross_entropy(full_logits, target, reduction="none") — WITHOUT gathering the logits:
        1. m   = max over the whole vocab      (local max, then dist.all_reduce with ReduceOp.MAX)
        2. z_t = target logit − m              (only the owner of t contributes; all_reduce SUM)
        3. S   = Σ exp(z − m) over the vocab   (local sum, all_reduce SUM)
        loss = log S − z_t.
      Forward only: no autograd needed. No padding and no ignore_index here (the package handles both).

Grade with:  grade_vocab_parallel_embedding(vocab_parallel_embedding_forward)
             grade_vocab_parallel_cross_entropy(vocab_parallel_cross_entropy_forward)
The references are minimegatron/mpu/embedding.py (VocabParallelEmbedding) and mpu/cross_entropy.py.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from exercises.grading import (MULTI_RANK_TIMEOUT, GradingError, assert_close, grader, passed,
                               run_graded)
from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from minimegatron.mpu.mappings import reduce_from_tensor_model_parallel_region
from minimegatron.mpu.state import ParallelState, initialize_model_parallel


def vocab_parallel_embedding_forward(input_ids: torch.Tensor, weight_shard: torch.Tensor,
                                     vocab_start_index: int, vocab_end_index: int,
                                     state: ParallelState) -> torch.Tensor:
    """Your code (03.1): masked lookup in this rank's rows, then g (all-reduce). (b, s) → (b, s, h)."""
    # Hint: outside = (ids < start) | (ids >= end); local = (ids - start).masked_fill(outside, 0);
    # F.embedding(local, weight_shard), zero the rows of `outside`, then reduce_from_...(out, state).
    raise NotImplementedError("Exercise 03.1: implement the vocab-parallel embedding lookup — masked "
                              "local lookup, zeros for ids other ranks own, then all-reduce")


def vocab_parallel_cross_entropy_forward(logits_shard: torch.Tensor, target: torch.Tensor,
                                         state: ParallelState) -> torch.Tensor:
    """Your code (03.2): per-token loss (…) from logits (…, V/tp) with three all-reduces, no gather."""
    # Hint: this rank's columns are [r·V/tp, (r+1)·V/tp), r = state.tp_rank; pass group=state.tp_group
    # to every dist.all_reduce; work in float32 on clones (never modify logits_shard in place).
    raise NotImplementedError("Exercise 03.2: implement the vocab-parallel cross-entropy forward — "
                              "global max, target logit and sum of exp, each with one all-reduce")


# --- grading -----------------------------------------------------------------------------------------

TP, V, H, B, S = 2, 20, 6, 3, 5
GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object", "gather",
           "_all_gather_base", "all_to_all", "all_to_all_single")


def reference_embedding_forward(input_ids, weight_shard, vocab_start_index, vocab_end_index, state):
    outside = (input_ids < vocab_start_index) | (input_ids >= vocab_end_index)  # (b, s)
    local = (input_ids - vocab_start_index).masked_fill(outside, 0)
    out = F.embedding(local, weight_shard).masked_fill(outside.unsqueeze(-1), 0.0)  # (b, s, h)
    return reduce_from_tensor_model_parallel_region(out, state)


def _embedding_case(candidate: Callable) -> dict[str, Any]:
    state = initialize_model_parallel(TP)
    g = torch.Generator().manual_seed(3)
    table = torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (B, S), generator=g)
    ids[0, :4] = torch.tensor([0, V // TP - 1, V // TP, V - 1])  # the edges of both slices
    cotangent = torch.randn(B, S, H, generator=g)
    start, end = state.tp_rank * V // TP, (state.tp_rank + 1) * V // TP
    result = {}
    for who, fn in (("got", candidate), ("expected", reference_embedding_forward)):
        w = table[start:end].clone().requires_grad_()  # (V/tp, h)
        y = fn(ids.clone(), w, start, end, state)
        if not isinstance(y, torch.Tensor):
            result[who] = {"output": y}
            continue
        connected = y.requires_grad
        if connected and y.shape == cotangent.shape and y.dtype == cotangent.dtype:
            (y * cotangent).sum().backward()
        result[who] = {"output": y.detach().clone(), "connected": connected, "grad": w.grad}
    return result


@grader
def grade_vocab_parallel_embedding(candidate: Callable, timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """03.1 on 2 ranks: the output (b, s, h) and the gradient of each rank's weight shard."""
    results = run_graded(_embedding_case, TP, candidate, timeout=timeout)
    for rank, res in enumerate(results):
        got, expected = res["got"], res["expected"]
        where = f"Exercise 03.1, rank {rank}"
        assert_close(f"{where}, output (every token's row comes from exactly one rank: mask the others "
                     f"to zero, then all-reduce)", got["output"], expected["output"])
        if not got["connected"] or got["grad"] is None:
            raise GradingError(f"{where}: no gradient reached weight_shard — keep the lookup in the autograd "
                               "graph (no .detach() / torch.no_grad())")
        assert_close(f"{where}, gradient of weight_shard (each rank's rows get the gradient of the tokens it "
                     f"owns)", got["grad"], expected["grad"])
    return passed("Exercise 03.1: the vocab-parallel embedding matches the reference on 2 ranks")


def _cross_entropy_cases() -> list[tuple[str, float]]:
    return [("random logits", 0.0), ("huge logits (exp overflows unless the max is subtracted)", 1e4)]


def _cross_entropy_case(candidate: Callable) -> list[dict[str, Any]]:
    state = initialize_model_parallel(TP)
    g = torch.Generator().manual_seed(4)
    out = []
    for _, offset in _cross_entropy_cases():
        full = 3 * torch.randn(S, B, V, generator=g) + offset  # (s, b, V)
        target = torch.randint(0, V, (S, B), generator=g)
        target[0] = torch.tensor([0, V // TP - 1, V // TP])[:B]  # the edges of both slices
        shard = full.chunk(TP, -1)[state.tp_rank].contiguous()  # (s, b, V/tp)
        expected = vocab_parallel_cross_entropy(shard, target, state)
        given_logits, given_target = shard.clone(), target.clone()
        saved = {name: getattr(dist, name) for name in GATHERS if hasattr(dist, name)}
        for name in saved:
            def refuse(*args, _name=name, **kwargs):
                raise GradingError(f"Exercise 03.2: your code called dist.{_name}; the point is never to "
                                   "build the full (…, V) logits — use three all_reduce calls instead")
            setattr(dist, name, refuse)
        try:
            got = candidate(given_logits, given_target, state)
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)
        modified = not (torch.equal(given_logits, shard) and torch.equal(given_target, target))
        out.append({"got": got.detach().clone() if isinstance(got, torch.Tensor) else got,
                    "expected": expected, "modified": modified})
    return out


@grader
def grade_vocab_parallel_cross_entropy(candidate: Callable, timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """03.2 on 2 ranks: the per-token loss equals F.cross_entropy, also for huge logits; no gathers."""
    results = run_graded(_cross_entropy_case, TP, candidate, timeout=timeout)
    for rank, cases in enumerate(results):
        for (name, _), res in zip(_cross_entropy_cases(), cases):
            where = f"Exercise 03.2, rank {rank}, case '{name}'"
            if res["modified"]:
                raise GradingError(f"{where}: your code modified logits_shard or target in place; work on "
                                   "a copy (logits = logits_shard.float() - m makes a new tensor)")
            got = res["got"]
            if isinstance(got, torch.Tensor) and got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise GradingError(f"{where}: the loss has inf/nan — subtract the max over the WHOLE "
                                   "vocabulary (dist.all_reduce with op=dist.ReduceOp.MAX) before exp")
            assert_close(f"{where}, per-token loss", got, res["expected"], rtol=1e-5, atol=1e-5)
    return passed("Exercise 03.2: the vocab-parallel cross-entropy matches F.cross_entropy on 2 ranks")
