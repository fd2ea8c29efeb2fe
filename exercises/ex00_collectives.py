"""Exercise 00: ranks and collectives.

00.1  ring_all_reduce — build all-reduce out of point-to-point messages around a ring.

Every rank holds a tensor x_r; return Σ_r x_r (a new tensor shaped like x) on every rank. Use only
dist.send / dist.recv / dist.isend / dist.irecv / dist.batch_isend_irecv: the grader makes the
ready-made collectives (all_reduce, reduce_scatter, all_gather, broadcast, ...) raise.
Cut the flattened tensor into N chunks (pad with zeros when numel is not a multiple of N), then
  reduce-scatter, N-1 steps: send chunk (r - s) % N to rank r+1, add the chunk (r - s - 1) % N that
                             arrives from rank r-1 to yours;
  all-gather,     N-1 steps: send chunk (r + 1 - s) % N, overwrite chunk (r - s) % N with what arrives.

00.2  all_reduce_via_reduce_scatter_all_gather — the same sum from the two halves of an all-reduce,
      with dist.reduce_scatter_tensor and dist.all_gather_into_tensor (all_reduce is forbidden).

Grade them with:  grade_ring_all_reduce(ring_all_reduce)
                  grade_all_reduce_via_reduce_scatter_all_gather(all_reduce_via_reduce_scatter_all_gather)
The references are in minimegatron/collectives.py.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from exercises.grading import GradingError, assert_close, grader, passed, run_graded


def ring_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Your code: Σ over ranks of x, as a ring reduce-scatter then a ring all-gather (N-1 steps each)."""
    # Hint: rank, n = dist.get_rank(), dist.get_world_size(). Pad x.reshape(-1) to n·c elements,
    # c = ceil(numel / n), and view it as (n, c). One step = post an isend to (rank + 1) % n and an irecv
    # from (rank - 1) % n together (dist.batch_isend_irecv), then wait() on both: a blocking send on
    # every rank at once would wait forever for a recv nobody has posted yet.
    raise NotImplementedError("Exercise 00.1: implement ring_all_reduce — a reduce-scatter phase and an "
                              "all-gather phase around the ring, N-1 isend/irecv steps each")


def all_reduce_via_reduce_scatter_all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """Your code: Σ over ranks of x, as dist.reduce_scatter_tensor then dist.all_gather_into_tensor."""
    # Hint: both need a flat tensor whose numel is a multiple of the world size: pad, then cut the
    # padding off the gathered result and reshape it like x.
    raise NotImplementedError("Exercise 00.2: implement all_reduce_via_reduce_scatter_all_gather — "
                              "reduce_scatter_tensor into your chunk, then all_gather_into_tensor")


# --- grading -----------------------------------------------------------------------------------------

CASES: list[tuple[tuple[int, ...], torch.dtype]] = [
    ((8,), torch.float32),          # numel a multiple of 2 and 4
    ((7,), torch.float32),          # not a multiple: needs padding
    ((1,), torch.float32),          # fewer elements than ranks
    ((3, 5), torch.float32),        # 2-D, 15 elements
    ((2, 3, 4), torch.float64),
    ((1001,), torch.float32),
    ((6,), torch.int64),            # integers: the sum must be exact
]
POINT_TO_POINT = "dist.send / dist.recv / dist.isend / dist.irecv / dist.batch_isend_irecv"
ALL_REDUCE_LIKE = ("all_reduce", "all_reduce_coalesced", "reduce")
EVERY_COLLECTIVE = ALL_REDUCE_LIKE + (
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather",
    "all_gather_into_tensor", "all_gather_single", "all_gather_object", "all_to_all", "all_to_all_single",
    "broadcast", "gather", "scatter")


def _case_input(rank: int, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * index + rank)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)


def _forbid(names: Sequence[str], exercise: str, allowed: str) -> dict[str, Callable]:
    """Make torch.distributed.<name> raise on this rank (the grader's ranks are forked: nothing leaks)."""
    saved = {}
    for name in names:
        if hasattr(dist, name):
            saved[name] = getattr(dist, name)

            def refuse(*args, _name=name, **kwargs):
                raise GradingError(f"{exercise}: your code called dist.{_name}, which this exercise asks you "
                                   f"to build yourself; use only {allowed}")
            setattr(dist, name, refuse)
    return saved


def _run_cases(candidate, forbidden: Sequence[str], exercise: str,
               allowed: str) -> list[tuple[object, torch.Tensor]]:
    """On every rank: the expected sums (dist.all_reduce), then the candidate with collectives barred."""
    rank = dist.get_rank()
    inputs = [_case_input(rank, i, shape, dtype) for i, (shape, dtype) in enumerate(CASES)]
    expected = [x.clone() for x in inputs]
    for e in expected:
        dist.all_reduce(e)
    saved = _forbid(forbidden, exercise, allowed)
    try:
        got = [candidate(x.clone()) for x in inputs]
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    return [(g.detach().clone() if isinstance(g, torch.Tensor) else g, e) for g, e in zip(got, expected)]


def _grade(candidate, exercise: str, forbidden: Sequence[str], allowed: str, world_sizes: Sequence[int],
           timeout: float) -> str:
    for world_size in world_sizes:
        results = run_graded(_run_cases, world_size, candidate, forbidden, exercise, allowed, timeout=timeout)
        for rank, pairs in enumerate(results):
            for (shape, dtype), (got, expected) in zip(CASES, pairs):
                numel = expected.numel()
                note = "" if numel % world_size == 0 else f", numel {numel} not a multiple of {world_size}"
                assert_close(f"{exercise}: world_size={world_size}, rank {rank}, input shape {shape} {dtype}"
                             f"{note}", got, expected, rtol=1e-5, atol=1e-5)
    return passed(f"{exercise}: matches dist.all_reduce on world sizes {tuple(world_sizes)}, "
                  f"{len(CASES)} tensors each (odd sizes included)")


@grader
def grade_ring_all_reduce(candidate: Callable[..., torch.Tensor], world_sizes: Sequence[int] = (2, 4),
                          timeout: float = 30.0) -> str:
    """Run ``candidate(x)`` on real ranks for every case and world size; compare with dist.all_reduce.

    Returns "✓ ..." (and prints it); raises GradingError saying what is wrong: not implemented, a
    forbidden collective, an exception (with traceback), a hang (timeout), wrong shape or wrong values."""
    return _grade(candidate, "Exercise 00.1", EVERY_COLLECTIVE, POINT_TO_POINT, world_sizes, timeout)


@grader
def grade_all_reduce_via_reduce_scatter_all_gather(candidate: Callable[..., torch.Tensor],
                                                   world_sizes: Sequence[int] = (2, 4),
                                                   timeout: float = 30.0) -> str:
    """Like grade_ring_all_reduce; here only dist.all_reduce (and reduce) are barred."""
    return _grade(candidate, "Exercise 00.2", ALL_REDUCE_LIKE,
                  "dist.reduce_scatter_tensor and dist.all_gather_into_tensor", world_sizes, timeout)
