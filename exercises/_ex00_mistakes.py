"""Exercise 00's battery: plausible wrong solutions, each with the message its grader must give.

(part, name, candidate, message regex). A ring is :func:`ring` with its usual mistakes as switches.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def ring(x, group=None, *, steps=None, gather=True, pad=True, shape=True, add_in_gather=False, index_shift=0,
         average=False):
    """A ring all-reduce (batch_isend_irecv steps), with the usual mistakes as switches."""
    rank, n = dist.get_rank(), dist.get_world_size()
    steps = n - 1 if steps is None else steps
    flat = x.reshape(-1)
    c = math.ceil(flat.numel() / n) if pad else flat.numel() // n
    chunks = flat.new_zeros(n * c)
    chunks[:min(flat.numel(), n * c)] = flat[:n * c]
    chunks = chunks.view(n, c)  # (N, c)
    received = torch.empty_like(chunks[0])

    def step(send_index, on_arrival):
        ops = [dist.P2POp(dist.isend, chunks[send_index % n].clone(), (rank + 1) % n),
               dist.P2POp(dist.irecv, received, (rank - 1) % n)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        on_arrival(received)

    for s in range(steps):
        j = (rank - s - 1 + index_shift) % n
        step(rank - s + index_shift, lambda r, j=j: chunks[j].add_(r))
    for s in range(n - 1 if gather else 0):
        j = (rank - s) % n
        step(rank + 1 - s, lambda r, j=j: chunks[j].add_(r) if add_in_gather else chunks[j].copy_(r))
    out = chunks.reshape(-1)
    if average:
        out = out / n
    if not pad:
        return out.view(x.shape) if out.numel() == x.numel() else out
    out = out[:flat.numel()]
    return out.view(x.shape) if shape else out


def ring_with(**switches):
    def ring_all_reduce(x, group=None):
        return ring(x, group, **switches)
    return ring_all_reduce


def halves(x, group=None, *, gather=True, pad=True, cut=True, shape=True, average=False):
    """reduce_scatter_tensor then all_gather_into_tensor, with the usual mistakes as switches."""
    n = dist.get_world_size()
    flat = x.reshape(-1)
    c = math.ceil(flat.numel() / n)
    padded = torch.cat([flat, flat.new_zeros(n * c - flat.numel())]) if pad else flat
    mine = padded.new_empty(padded.numel() // n if not pad else c)
    dist.reduce_scatter_tensor(mine, padded)
    if average:
        mine = mine / n if mine.is_floating_point() else mine // n
    if not gather:
        return mine
    full = padded.new_empty(n * mine.numel())
    dist.all_gather_into_tensor(full, mine)
    if not cut:
        return full
    return full[:flat.numel()].view(x.shape) if shape else full[:flat.numel()]


def halves_with(**switches):
    def all_reduce_via_reduce_scatter_all_gather(x, group=None):
        return halves(x, group, **switches)
    return all_reduce_via_reduce_scatter_all_gather


def cheat(x, group=None):
    y = x.clone()
    dist.all_reduce(y)
    return y


BATTERY = [
    ("00.1", "no all-gather phase", ring_with(gather=False), r"that is the reduce-scatter phase alone — the "
                                                             r"all-gather phase is missing"),
    ("00.1", "N steps instead of N-1", ring_with(steps=4), r"added more than once — each phase has N-1 steps"),
    ("00.1", "a step short", ring_with(steps=2), r"not the sum of all 4 ranks: a step short"),
    ("00.1", "adds in the all-gather", ring_with(add_in_gather=True), r"added more than once .*OVERWRITES"),
    ("00.1", "chunk index off by one", ring_with(index_shift=1), r"chunk \d holds .*|no sum of the ranks' chunks"),
    ("00.1", "no padding", ring_with(pad=False), r"numel \d+ not a multiple of 2.*only inputs whose numel is not "
                                                 r"a multiple of 2 come out wrong: pad"),
    ("00.1", "flattened result", ring_with(shape=False), r"wrong shape \(15,\): reshape the result like x"),
    ("00.1", "the average", ring_with(average=True), r"the AVERAGE over the 2 ranks"),
    ("00.1", "dist.all_reduce", cheat, r"your code called dist.all_reduce, which this exercise asks you to build"),
    ("00.2", "no all-gather", halves_with(gather=False), r"you returned one chunk"),
    ("00.2", "padding not cut off", halves_with(cut=False), r"the padded length: cut the padding off"),
    ("00.2", "no padding", halves_with(pad=False), r"the full one must be exactly N = 2 times the chunk — pad the "
                                                   r"flat tensor .*input shape \(7,\)"),
    ("00.2", "flattened result", halves_with(shape=False), r"wrong shape \(15,\): reshape"),
    ("00.2", "the average", halves_with(average=True), r"the AVERAGE over the 2 ranks"),
    ("00.2", "dist.all_reduce", cheat, r"your code called dist.all_reduce"),
]
