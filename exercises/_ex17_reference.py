"""Exercise 17's reference solutions: what the graders accept (the tests and the fault battery use them).
Read them after trying."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def reference_permute_by_expert(experts: torch.Tensor, keep: torch.Tensor, num_experts: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = experts.shape
    kept = torch.nonzero(keep.reshape(-1)).squeeze(1)                  # (m,) flat ids t·k + j, in order
    by_expert = torch.argsort(experts.reshape(-1)[kept], stable=True)  # stable: token, slot order kept
    order = kept[by_expert]                                            # (m,) expert-major
    counts = torch.bincount(experts.reshape(-1)[order], minlength=num_experts)  # (E,)
    inverse = torch.full((n * k,), -1, dtype=torch.long)
    inverse[order] = torch.arange(order.numel())                       # slot → its row; dropped: -1
    return order, counts, inverse.view(n, k)


def reference_split_sizes(counts_per_expert: torch.Tensor, ep: int, ep_rank: int, group: Any
                          ) -> tuple[list[int], list[int]]:
    per_rank = counts_per_expert.view(ep, -1)                          # (ep, E/ep) row s: rank s's experts
    received = torch.empty_like(counts_per_expert)                     # (ep·E/ep,) block s: from rank s
    dist.all_to_all_single(received, counts_per_expert, group=group)   # my counts for s's experts → s
    return per_rank.sum(1).tolist(), received.view(ep, -1).sum(1).tolist()
