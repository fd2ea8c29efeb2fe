"""All-reduce from its parts: a ring of point-to-point messages, and reduce-scatter + all-gather.

Every parallel layer in this package ends in a collective (``dist.all_reduce`` after a row-parallel
matmul, ``reduce_scatter`` / ``all_gather`` around a sequence-parallel region, the data-parallel
gradient all-reduce). This module opens the black box. It is the reference solution that
``exercises/ex00_collectives.py`` grades against, and notebook 00 runs it on 4 simulated ranks.

**All-reduce = reduce-scatter + all-gather.** Cut every rank's tensor ``x_r`` into ``N`` equal chunks
``x_r = [x_r^0 … x_r^{N-1}]``. The all-reduce result is ``y = Σ_r x_r``, so its chunk ``i`` is
``y^i = Σ_r x_r^i``. A *reduce-scatter* leaves exactly ``y^i`` on rank ``i``; an *all-gather* then
concatenates ``[y^0 … y^{N-1}] = y`` on every rank. That is why Megatron's sequence parallelism can swap
the tensor-parallel all-reduce for a reduce-scatter and an all-gather at the same communication volume,
and why ZeRO splits the data-parallel all-reduce into the same two halves.

**The ring.** Ranks sit on a ring, each sends only to ``r+1`` and receives only from ``r-1``:

* reduce-scatter, ``N-1`` steps: at step ``s`` rank ``r`` sends chunk ``(r-s) mod N`` and adds the chunk
  ``(r-s-1) mod N`` it receives to its own. A chunk picks up one more rank's contribution per hop, so
  after ``N-1`` hops rank ``r`` holds the full sum of chunk ``(r+1) mod N``.
* all-gather, ``N-1`` steps: at step ``s`` rank ``r`` sends chunk ``(r+1-s) mod N`` (complete) and
  overwrites chunk ``(r-s) mod N`` with the one it receives.

**Bandwidth.** Each rank sends (and receives) ``2(N-1)`` chunks of ``B/N`` bytes for a ``B``-byte
tensor: ``2(N-1)/N · B`` in all, (N-1)/N · B per half. The volume per rank approaches ``2B`` and does
not grow with ``N``, and every link of the ring is busy at every step — the ring is bandwidth-optimal.
The time is about ``2(N-1)·α + 2(N-1)/N · B/β`` (α latency per message, β link bandwidth); a naive
"send everything to rank 0, add, broadcast back" moves ``(N-1)·B`` through rank 0's link.

A tensor whose ``numel`` is not a multiple of ``N`` is padded with zeros (neutral for a sum) to
``N·⌈numel/N⌉`` elements, and the padding is cut off the result.

Functions here return a new tensor and leave ``x`` alone (``dist.all_reduce`` works in place).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from minimegatron.compat import all_gather_single, reduce_scatter_single

__all__ = ["ring_all_reduce", "all_reduce_via_reduce_scatter_all_gather", "reduce_scatter_tensor",
           "all_gather_into_tensor", "ring_bytes_per_rank", "plot_rank_data"]


# torch renamed the flat-tensor collectives in 2.13 (reduce_scatter_tensor -> reduce_scatter_single,
# all_gather_into_tensor -> all_gather_single); minimegatron.compat wraps both names for torch 2.6+.
reduce_scatter_tensor = reduce_scatter_single
all_gather_into_tensor = all_gather_single


def _rank_and_size(x: torch.Tensor, group, caller: str) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{caller} expects a torch.Tensor, got {type(x).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{caller} needs an initialized process group: call it on every rank inside "
                           f"minimegatron.launch(fn, world_size) (or under torchrun / deepspeed).")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{caller}: this rank ({dist.get_rank()}) is not a member of the group it was "
                         f"given; call it only on the group's ranks.")
    return rank, dist.get_world_size(group)


def _padded_chunks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """A zero-padded copy of ``x`` viewed as ``(N, ⌈numel/N⌉)``: row i is chunk i."""
    chunk = math.ceil(x.numel() / world_size)
    buffer = x.new_zeros(world_size * chunk)         # (N·c,) zeros: neutral for the sum
    buffer[: x.numel()] = x.reshape(-1)              # (numel,) flattened, padding stays 0
    return buffer.view(world_size, chunk)            # (N, c) one row per chunk


def _exchange(send: torch.Tensor, recv: torch.Tensor, to: int, frm: int, group) -> None:
    """Send ``send`` to global rank ``to`` while receiving ``recv`` from ``frm``, then wait for both.

    Posting both before waiting is what keeps the ring from deadlocking: were every rank to do a
    blocking ``send`` first, each would wait for a ``recv`` that its neighbour has not posted yet."""
    ops = [dist.P2POp(dist.isend, send, to, group), dist.P2POp(dist.irecv, recv, frm, group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


def ring_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group`` with a ring: reduce-scatter then all-gather, ``N-1`` steps each.

    Sends ``2(N-1)/N · x.nbytes`` per rank (see the module docstring). Returns a new tensor with the
    shape, dtype and device of ``x``; equal to ``dist.all_reduce`` up to the order of the additions."""
    rank, world_size = _rank_and_size(x, group, "ring_all_reduce")
    if world_size == 1 or x.numel() == 0:
        return x.clone()
    to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    to, frm = to_global((rank + 1) % world_size), to_global((rank - 1) % world_size)
    chunks = _padded_chunks(x, world_size)           # (N, c) this rank's copy, chunk i = row i
    received = torch.empty_like(chunks[0])           # (c,)

    # Phase 1, reduce-scatter: after N-1 steps chunk (rank+1) % N holds the sum over all ranks.
    for step in range(world_size - 1):
        send_idx, recv_idx = (rank - step) % world_size, (rank - step - 1) % world_size
        _exchange(chunks[send_idx], received, to, frm, group)
        chunks[recv_idx] += received

    # Phase 2, all-gather: pass the finished chunks around until every rank has all of them.
    for step in range(world_size - 1):
        send_idx, recv_idx = (rank + 1 - step) % world_size, (rank - step) % world_size
        _exchange(chunks[send_idx], received, to, frm, group)
        chunks[recv_idx].copy_(received)

    return chunks.reshape(-1)[: x.numel()].view(x.shape)  # (numel,) padding cut -> shape of x


def all_reduce_via_reduce_scatter_all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """``Σ_r x_r`` as the two halves of an all-reduce: reduce_scatter_tensor, then all_gather_into_tensor.

    After the reduce-scatter rank i holds chunk i of the sum, ``(N-1)/N · B`` bytes sent; the all-gather
    hands every rank every chunk, another ``(N-1)/N · B``. Returns a new tensor shaped like ``x``."""
    rank, world_size = _rank_and_size(x, group, "all_reduce_via_reduce_scatter_all_gather")
    if x.numel() == 0:
        return x.clone()
    chunks = _padded_chunks(x, world_size)           # (N, c)
    shard = chunks.new_empty(chunks.shape[1])        # (c,) will hold chunk `rank` of the sum
    reduce_scatter_tensor(shard, chunks.reshape(-1), group)
    gathered = chunks.new_empty(chunks.numel())      # (N·c,) every rank's finished chunk, in rank order
    all_gather_into_tensor(gathered, shard, group)
    return gathered[: x.numel()].view(x.shape)       # (numel,) padding cut -> shape of x


def ring_bytes_per_rank(nbytes: int, world_size: int, collective: str = "all_reduce") -> float:
    """Bytes one rank sends in a ring collective on a ``nbytes`` tensor (all-reduce: ``2(N-1)/N · B``)."""
    factor = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1}
    if collective not in factor:
        raise ValueError(f"unknown collective {collective!r}; use one of {sorted(factor)}")
    return factor[collective] * (world_size - 1) / world_size * nbytes


def plot_rank_data(panels: dict[str, Sequence[torch.Tensor]], title: str | None = None, fmt: str = "{:g}"):
    """Draw each rank's tensor as a row of numbered cells, one panel per stage (e.g. before / after).

    ``panels`` maps a panel title to the list of per-rank tensors (flattened for display). Colours
    share one scale across panels, so a value keeps its colour as it moves between ranks. Returns the
    matplotlib figure (matplotlib is imported here, not at module import)."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = {name: [t.detach().reshape(-1).double().cpu().numpy() for t in ts] for name, ts in panels.items()}
    values = np.concatenate([v for vs in rows.values() for v in vs if v.size])
    vmin, vmax = (values.min(), values.max()) if values.size else (0.0, 1.0)
    widths = [max(max((v.size for v in vs), default=1), 1) for vs in rows.values()]
    n_ranks = max(len(vs) for vs in rows.values())
    cell = min(0.55, 11.0 / sum(widths))  # inches per cell: figures stay under ~14 inches wide
    fig, axes = plt.subplots(1, len(rows), figsize=(1.2 + cell * sum(widths) + 0.7 * len(rows),
                                                     0.9 + 0.45 * n_ranks),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (name, vs), width in zip(axes[0], rows.items(), widths):
        grid = np.full((n_ranks, width), np.nan)
        for r, v in enumerate(vs):
            grid[r, : v.size] = v
        ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for (r, j), val in np.ndenumerate(grid):
            if not np.isnan(val):
                light = (val - vmin) / ((vmax - vmin) or 1) > 0.6
                ax.text(j, r, fmt.format(val), ha="center", va="center", fontsize=8,
                        color="black" if light else "white")
        ax.set_title(name, fontsize=10)
        ax.set_yticks(range(n_ranks), [f"rank {r}" for r in range(n_ranks)])
        ax.set_xticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
