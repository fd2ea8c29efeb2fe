"""Exercises 00.1/00.2: the references pass their graders; stubs and typical mistakes fail precisely."""
import math

import pytest
import torch
import torch.distributed as dist

from exercises import ex00_collectives as ex00
from exercises.grading import GradingError
from minimegatron import collectives


def test_references_pass():
    assert ex00.grade_ring_all_reduce(collectives.ring_all_reduce).startswith("✓")
    assert ex00.grade_all_reduce_via_reduce_scatter_all_gather(
        collectives.all_reduce_via_reduce_scatter_all_gather, world_sizes=(3,)).startswith("✓")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 00.1"):
        ex00.grade_ring_all_reduce(ex00.ring_all_reduce)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 00.2"):
        ex00.grade_all_reduce_via_reduce_scatter_all_gather(ex00.all_reduce_via_reduce_scatter_all_gather)


def _reduce_scatter_only(x, group=None):
    """A typical mistake: the ring's reduce-scatter phase, but the all-gather phase forgotten."""
    rank, n = dist.get_rank(), dist.get_world_size()
    c = math.ceil(x.numel() / n)
    chunks = x.new_zeros(n * c)
    chunks[: x.numel()] = x.reshape(-1)
    chunks = chunks.view(n, c)  # (N, c)
    received = torch.empty_like(chunks[0])
    for step in range(n - 1):
        ops = [dist.P2POp(dist.isend, chunks[(rank - step) % n], (rank + 1) % n),
               dist.P2POp(dist.irecv, received, (rank - 1) % n)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        chunks[(rank - step - 1) % n] += received
    return chunks.reshape(-1)[: x.numel()].view(x.shape)


def test_missing_all_gather_phase_gives_wrong_values():
    with pytest.raises(GradingError,
                       match=r"world_size=2, rank 0, input shape \(8,\).*wrong values — max abs error"):
        ex00.grade_ring_all_reduce(_reduce_scatter_only)


def test_odd_sizes_are_named():
    def no_padding(x, group=None):  # right for numel % N == 0 only
        if x.numel() % dist.get_world_size():
            return x.clone()
        return collectives.ring_all_reduce(x)

    with pytest.raises(GradingError, match=r"shape \(7,\).*numel 7 not a multiple of 2: wrong values"):
        ex00.grade_ring_all_reduce(no_padding)


def test_calling_dist_all_reduce_is_refused():
    def cheat(x, group=None):
        y = x.clone()
        dist.all_reduce(y)
        return y

    with pytest.raises(GradingError,
                       match=r"rank \d: Exercise 00.1: your code called dist.all_reduce.*use only dist.send"):
        ex00.grade_ring_all_reduce(cheat)
    # 00.2 bars all_reduce too, but allows the two halves
    with pytest.raises(GradingError, match="called dist.all_reduce"):
        ex00.grade_all_reduce_via_reduce_scatter_all_gather(cheat)


def test_wrong_shape_is_reported():
    def flat(x, group=None):
        return collectives.ring_all_reduce(x).reshape(-1)

    with pytest.raises(GradingError, match=r"shape \(3, 5\).*wrong shape \(15,\), expected \(3, 5\)"):
        ex00.grade_ring_all_reduce(flat)


def test_exception_carries_rank_and_traceback():
    def broken(x, group=None):
        if dist.get_rank() == 1:
            raise ValueError("chunk index out of range")
        return collectives.ring_all_reduce(x)

    with pytest.raises(GradingError,
                       match="(?s)your code raised on rank 1.*ValueError: chunk index out of range"):
        ex00.grade_ring_all_reduce(broken, world_sizes=(2,))


def test_hang_becomes_a_timeout():
    def deadlock(x, group=None):  # every rank waits for a message nobody sends
        received = torch.empty_like(x)
        dist.recv(received, src=(dist.get_rank() - 1) % dist.get_world_size())
        return received

    with pytest.raises(GradingError, match=r"timeout — your code hung on ranks \[0, 1\]"):
        ex00.grade_ring_all_reduce(deadlock, world_sizes=(2,), timeout=2)
