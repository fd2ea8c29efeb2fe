"""Exercise 17: the MoE dispatch — permute the routed tokens by expert, size the all-to-all.

A mixture-of-experts MLP routes each of a rank's n tokens to k of E experts (the router's top-k):
``experts`` (n, k) int64 holds the global expert ids, ``keep`` (n, k) bool is False where a slot was
dropped (its expert was over capacity). The dispatcher (``minimegatron/mpu/expert_parallel.py``, the
``TokenDispatcher`` protocol) moves each kept (token, slot) to the rank that holds its expert and back:

    dispatch   rows (m, h) = x[token of each kept slot], grouped by expert      m = Σ keep
               forward: all-to-all (rows to the expert's rank)   backward: the reverse all-to-all
    combine    out[t] = Σ_j keep[t, j] · probs[t, j] · y[row of (t, j)]          (n, h)
               forward: the reverse all-to-all                   backward: the all-to-all again

Expert parallelism (Megatron, GShard, DeepSpeed-MoE): an EP group of ``ep`` ranks shares the E experts in
contiguous blocks — EP rank s holds experts [s·E/ep, (s+1)·E/ep). Since the rows are expert-major, the
rows for rank s are one contiguous run: ``dist.all_to_all_single(out, rows, output_split_sizes,
input_split_sizes, group)`` sends them, given how many rows go to each rank and come from each rank.

17.1  permute_by_expert(experts, keep, num_experts) -> (order, counts, inverse)   (one process)
      A slot (t, j) has the flat id s = t·k + j.
        order    (m,) int64: the flat ids of the kept slots, expert-major — expert 0's first, then
                 expert 1's, … — and inside one expert by token, then slot (a *stable* sort by expert).
                 The dispatched rows are x[order // k].
        counts   (E,) int64: kept slots per expert (an expert with none counts 0).
        inverse  (n, k) int64: the row of order that slot (t, j) went to; -1 where keep is False.
                 Combine reads slot (t, j)'s expert output from y[inverse[t, j]].
      n = 3, k = 2, experts = [[1, 0], [0, 2], [1, 2]], keep all True, E = 3:
        order = [1, 2, 0, 4, 3, 5]   counts = [2, 2, 2]   inverse = [[2, 0], [1, 4], [3, 5]]

17.2  split_sizes(counts_per_expert, ep, ep_rank, group) -> (input_split_sizes, output_split_sizes)
      On every rank of the EP group ``group`` (ep ranks; this one is ``ep_rank``): counts_per_expert
      (E,) int64 is this rank's counts from 17.1. Return two lists of ep ints:
        input_split_sizes[s]   rows this rank sends to EP rank s: Σ of its counts over s's experts
        output_split_sizes[s]  rows it receives from EP rank s: Σ of rank s's counts over THIS rank's
                               experts — which only rank s knows: exchange the counts first
                               (all_to_all_single of the (E,) counts: block s of E/ep goes to rank s).

Grade with:  grade_permute_by_expert(permute_by_expert)     grade_split_sizes(split_sizes)
17.1 runs in a separate process against a per-token loop (order, counts, inverse, and a whole MoE run
through your permutation vs token by token); 17.2 on 2 and 4 gloo ranks (ep = 2, 4 and two EP groups of
2) against splits summed by loops from every rank's counts — checked before the all-to-all, which then
runs with your splits and must deliver each rank the rows of its experts. Both name the usual mistakes
(``exercises/_ex17_mistakes.py``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist  # noqa: F401 (yours: all_to_all_single, all_gather)

from exercises import _ex17_mistakes as M
from exercises._ex17_ranks import split_case
from exercises.grading import (MULTI_RANK_TIMEOUT, SINGLE_PROCESS_TIMEOUT, GradingError, call_candidate,
                               grader, kind_of, passed, run_graded, run_isolated)


def permute_by_expert(experts: torch.Tensor, keep: torch.Tensor, num_experts: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Your code (17.1): the expert-major row order of the kept slots, the counts, the inverse."""
    # Hint: flat = experts.reshape(-1); torch.argsort(key, stable=True) over the kept slots' experts;
    # torch.bincount(..., minlength=num_experts); inverse: a (n·k,) vector of -1 with inverse[order] = arange(m).
    raise NotImplementedError("Exercise 17.1: order = the kept slots' flat ids t·k + j stably sorted by expert; "
                              "counts = kept slots per expert (minlength=num_experts); inverse (n, k) = each "
                              "slot's row in order, -1 if dropped")


def split_sizes(counts_per_expert: torch.Tensor, ep: int, ep_rank: int, group: Any
                ) -> tuple[list[int], list[int]]:
    """Your code (17.2): all_to_all_single's input and output split sizes on this EP rank."""
    # Hint: counts_per_expert.view(ep, E // ep).sum(1) — row s: the experts EP rank s holds.
    raise NotImplementedError("Exercise 17.2: input_split_sizes = this rank's counts summed over each EP "
                              "rank's block of E/ep experts; exchange the counts (all_to_all_single over "
                              "group) and sum what rank s sent for output_split_sizes[s]")


# --- grading -----------------------------------------------------------------------------------------

@grader
def grade_permute_by_expert(candidate: Callable, timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """17.1: three routings (top-1, 2, 3; an unused expert; dropped slots) against the per-token loop.
    Runs in a separate process: an exception or an endless loop (``timeout`` s) is a GradingError."""
    return run_isolated(_grade_permute_by_expert, candidate, timeout=timeout, role="permute_by_expert")


def _grade_permute_by_expert(candidate: Callable) -> str:
    g = torch.Generator().manual_seed(17)
    for n, k, E, used, drop in M.PERMUTE_CASES:
        experts, keep = M.routing(n, k, E, used, drop, g)
        where = f"Exercise 17.1 permute_by_expert(n={n}, k={k}, num_experts={E}, {int(keep.sum())} kept)"
        got = call_candidate(where, candidate, experts.clone(), keep.clone(), E, exercise="Exercise 17.1")
        order, counts, inverse = M.loop_permutation(experts, keep, E)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise GradingError(f"{where}: expected a tuple (order, counts, inverse) of three tensors, got "
                               f"{kind_of(got)}")
        M.check_tensor(where, "order", got[0], None, "(m,): one flat slot id per kept slot")
        M.check_tensor(where, "counts", got[1], None, f"({E},): one count per expert")
        M.check_tensor(where, "inverse", got[2], (n, k), f"({n}, {k}): a row per slot, like experts")
        for problem in (M.order_problem(got[0], experts, keep, order),
                        M.counts_problem(got[1], experts, keep, E, counts)):
            if problem:
                raise GradingError(f"{where}: {problem}")
        x, probs = torch.randn(n, 3, generator=g), torch.rand(n, k, generator=g)
        problem = M.inverse_problem(got[2], order, keep, inverse, x, experts, probs, counts)
        if problem:
            raise GradingError(f"{where}: {problem}")
    return passed("Exercise 17.1: permute_by_expert gives the per-token loop's expert-major order, counts and "
                  "inverse for top-1, 2 and 3 routings with dropped slots and an unused expert")


@grader
def grade_split_sizes(candidate: Callable, world_sizes: Sequence[int] = (2, 4),
                      timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """17.2 on 2 and 4 ranks (ep = 2; ep = 4 and two EP groups of 2): the splits vs loops over every
    rank's counts, then the rows all_to_all_single delivers with them vs a per-token loop."""
    for world in world_sizes:
        results = run_graded(split_case, world, candidate, timeout=timeout)
        for r, per_rank in enumerate(results):
            for res in per_rank:
                if res["verdict"]:
                    raise GradingError(f"Exercise 17.2 (ep={res['ep']}, EP rank {res['ep_rank']} of the group "
                                       f"of ranks {res['base']}..{res['base'] + res['ep'] - 1}): {res['verdict']}")
        for r, per_rank in enumerate(results):
            for res in per_rank:
                M.check_rows(f"Exercise 17.2 (ep={res['ep']}, rank {r})", res["received"],
                             M.expected_rows(res["ep"], res["base"], res["ep_rank"]))
    return passed("Exercise 17.2: split_sizes sizes the dispatch all-to-all right on 2 and 4 ranks (ep = 2, 4, "
                  "and two EP groups of 2): every rank receives the rows of its experts")
