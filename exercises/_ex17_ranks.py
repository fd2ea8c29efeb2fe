"""Exercise 17.2's grader, on each rank: the student's ``split_sizes`` on this rank's counts, checked here
against the splits computed by loops from every rank's counts (the grader knows them all: each rank's
routing is drawn from its own seed) *before* any all-to-all runs with them — a wrong split would hang
the collective or deliver rows to the wrong rank. When every rank's splits are right (agreed with one
all-reduce of the grader's own), ``dist.all_to_all_single`` runs with the student's splits on rows
tagged (source rank, expert, token, slot); the parent compares what arrived with a per-token loop.

EP groups as Megatron carves them from the data-parallel ranks: consecutive ranks, ep_rank = rank % ep.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from exercises import _ex17_mistakes as M


def ep_sizes(world: int) -> list[int]:
    """The EP sizes graded on ``world`` ranks: the whole world, and on 4 ranks also two groups of 2."""
    return [world] + ([2] if world == 4 else [])


def split_case(candidate: Callable) -> list[dict]:
    """Every EP size of this world in turn: the candidate's splits, the verdict, the delivered rows."""
    world, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for ep in ep_sizes(world):
        groups = [dist.new_group(list(range(g * ep, (g + 1) * ep))) for g in range(world // ep)]  # collective
        group, ep_rank, base = groups[rank // ep], rank % ep, rank - rank % ep
        counts = [M.rank_counts(ep, base + s) for s in range(ep)]  # (E,) of every rank of my EP group
        got = candidate(counts[ep_rank].clone(), ep, ep_rank, group)
        splits = M.as_splits(got, ep)
        first = [M.rank_counts(ep, s) for s in range(ep)] if base else None  # global ranks 0 … ep-1
        verdict = splits if isinstance(splits, str) else M.split_problem(*splits, counts, ep_rank, first)
        wrong = torch.tensor([float(verdict is not None)])
        dist.all_reduce(wrong)  # the grader's: every rank learns whether any rank's splits are wrong
        result = dict(ep=ep, ep_rank=ep_rank, base=base, verdict=verdict, received=None)
        results.append(result)
        if wrong.item():
            break  # no all-to-all with a wrong split: it would hang or mis-deliver
        sends, receives = splits
        experts, keep = M.rank_routing(ep, rank)
        order = M.loop_permutation(experts, keep, M.NUM_EXPERTS)[0]
        tags = torch.tensor([[ep_rank, int(experts.view(-1)[s]), int(s) // M.TOP_K, int(s) % M.TOP_K]
                             for s in order], dtype=torch.float32).reshape(-1, 4)  # (m, 4) expert-major
        received = torch.empty(sum(receives), 4)                                   # (Σ output splits, 4)
        dist.all_to_all_single(received, tags, output_split_sizes=receives, input_split_sizes=sends,
                               group=group)
        result["received"] = received
    return results
