"""How much of data parallelism's communication hides behind backward: a recorded timeline.

:func:`record_overlap` runs ``loss.backward()`` and ``ddp.finish_grad_sync()`` on one rank of a
``minimegatron.data_parallel.ddp`` wrapper and timestamps (``time.perf_counter``, seconds from the
start of backward):

* backward's start and end, and each gradient's arrival (the post-accumulate-grad hook);
* each bucket's "ready" (last gradient arrived), "launch" (all-reduce issued) and "done" (completed:
  for ``OverlappedDDP`` stamped by ``work.get_future().then(...)`` on the communication thread, the
  moment gloo finishes; for the blocking wrappers when ``all_reduce`` returns);
* when ``finish_grad_sync`` returns (the optimizer may step).

From these intervals (:class:`OverlapTimeline`)::

    C = ∪_b [launch_b, done_b]                 communication (a union: queued buckets count once)
    K = [backward start, end] \\ C   if the all-reduces block backward (naive, bucketed)
        [backward start, end]       if they run beside it (overlapped)
    hidden share = |C ∩ K| / |C|               exposed communication = |C| − |C ∩ K|

A blocking wrapper hides nothing (share 0) by construction; the overlapped one hides all but the
tail: the buckets launched when little or no backward is left (the first layers, the embedding).
The share depends on the machine (cores free for gloo's thread, link speed): it is *reported*,
never asserted; tests check the arithmetic on synthetic intervals and the ordering of a real run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["OverlapTimeline", "record_overlap", "plot_overlap", "union", "intersection_length",
           "subtract", "total_length"]

Interval = tuple[float, float]


# ---- interval arithmetic -------------------------------------------------------------------------
def union(intervals: list[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same points (empty intervals dropped)."""
    out: list[list[float]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def total_length(intervals: list[Interval]) -> float:
    return sum(b - a for a, b in union(intervals))


def intersection_length(x: list[Interval], y: list[Interval]) -> float:
    """|∪x ∩ ∪y|."""
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in union(x) for c, d in union(y))


def subtract(x: list[Interval], y: list[Interval]) -> list[Interval]:
    """∪x with ∪y cut out."""
    out = []
    for a, b in union(x):
        start = a
        for c, d in union(y):
            if d <= start or c >= b:
                continue
            if c > start:
                out.append((start, c))
            start = max(start, d)
        if start < b:
            out.append((start, b))
    return out


# ---- the timeline --------------------------------------------------------------------------------
@dataclass
class OverlapTimeline:
    """One rank's backward + gradient sync, in seconds from the start of backward."""

    backward: Interval                                      # (start, end) of loss.backward()
    finish: float                                           # finish_grad_sync returned
    launch: dict[int, float]                                # bucket (or tensor) -> all-reduce issued
    done: dict[int, float]                                  # bucket -> all-reduce completed
    blocking: bool = True                                   # the all-reduces stall backward
    ready: dict[int, float] = field(default_factory=dict)   # bucket -> last gradient arrived
    grads: list[tuple[int, str, float]] = field(default_factory=list)  # (bucket, param, arrival)
    launch_order: list[int] = field(default_factory=list)
    rank: int = 0
    label: str = ""

    def comm_intervals(self) -> list[Interval]:
        return [(self.launch[b], self.done[b]) for b in sorted(self.launch) if b in self.done]

    def compute_intervals(self) -> list[Interval]:
        k = [self.backward]
        return subtract(k, self.comm_intervals()) if self.blocking else k

    @property
    def comm_s(self) -> float:
        """|C|: seconds during which at least one all-reduce was in flight."""
        return total_length(self.comm_intervals())

    @property
    def hidden_s(self) -> float:
        """|C ∩ K|: communication time spent while backward was computing."""
        return intersection_length(self.comm_intervals(), self.compute_intervals())

    @property
    def exposed_s(self) -> float:
        return self.comm_s - self.hidden_s

    @property
    def hidden_share(self) -> float:
        return self.hidden_s / self.comm_s if self.comm_s > 0 else 0.0

    @property
    def wait_s(self) -> float:
        """finish_grad_sync's own time: what the optimizer waits after backward."""
        return self.finish - self.backward[1]

    def summary(self) -> dict[str, float]:
        return dict(backward_s=self.backward[1] - self.backward[0], comm_s=self.comm_s,
                    hidden_s=self.hidden_s, exposed_s=self.exposed_s, hidden_share=self.hidden_share,
                    wait_s=self.wait_s, step_s=self.finish - self.backward[0],
                    messages=len(self.launch))


def record_overlap(ddp, loss: torch.Tensor, label: str = "") -> OverlapTimeline:
    """Run ``loss.backward()`` then ``ddp.finish_grad_sync()``, timestamping every event."""
    import torch.distributed as dist

    from minimegatron.data_parallel.ddp import NaiveDDP, OverlappedDDP

    if not isinstance(ddp, NaiveDDP):
        raise TypeError(f"record_overlap needs a minimegatron.data_parallel.ddp wrapper (NaiveDDP, "
                        f"BucketedDDP, OverlappedDDP), got {type(ddp).__name__}")
    events: list[tuple[str, int, str, float]] = []  # appended from gloo's thread too (list.append is atomic)
    previous = ddp.observer
    ddp.observer = lambda event, index, name: events.append((event, index, name, time.perf_counter()))
    try:
        t0 = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        ddp.finish_grad_sync()
        t2 = time.perf_counter()
    finally:
        ddp.observer = previous
    stamps: dict[str, dict[int, float]] = {"ready": {}, "launch": {}, "done": {}}
    grads, order = [], []
    for event, index, name, t in events:
        if event == "grad":
            grads.append((index, name, t - t0))
        else:
            stamps[event][index] = t - t0
            if event == "launch":
                order.append(index)
    return OverlapTimeline(backward=(0.0, t1 - t0), finish=t2 - t0, launch=stamps["launch"],
                           done=stamps["done"], ready=stamps["ready"], grads=grads, launch_order=order,
                           blocking=not isinstance(ddp, OverlappedDDP), rank=dist.get_rank(),
                           label=label or type(ddp).__name__)


def plot_overlap(timelines: list[OverlapTimeline], ax=None):
    """A compute lane and a communication lane per timeline (rank); returns the Figure."""
    import matplotlib.pyplot as plt

    fig = ax.figure if ax is not None else plt.figure(figsize=(10, 0.6 + 1.1 * len(timelines)))
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    colors = plt.get_cmap("tab10").colors
    ticks, names = [], []
    for row, tl in enumerate(timelines):
        y = 2.2 * row
        ms = [(a * 1e3, (b - a) * 1e3) for a, b in tl.compute_intervals()]
        ax.broken_barh(ms, (y + 1.05, 0.8), color="0.55")
        for b in sorted(tl.launch):
            if b in tl.done:
                start, width = tl.launch[b] * 1e3, (tl.done[b] - tl.launch[b]) * 1e3
                ax.broken_barh([(start, width)], (y + 0.1, 0.8), color=colors[b % len(colors)],
                               alpha=0.85)
                ax.text(start + width / 2, y + 0.5, str(b), ha="center", va="center", fontsize=6)
        for b, t in tl.ready.items():
            ax.plot([t * 1e3], [y + 1.0], marker="v", color=colors[b % len(colors)], markersize=4)
        ax.axvline(tl.finish * 1e3, ymin=0, ymax=1, color="black", linewidth=0.6, linestyle=":")
        ticks += [y + 0.5, y + 1.45]
        names += [f"rank {tl.rank} comm", f"rank {tl.rank} backward"]
        ax.text(tl.finish * 1e3, y + 1.9, f" hidden {tl.hidden_share:.0%}", fontsize=7, va="top")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("ms since backward started (▼ bucket ready, : finish_grad_sync returned)")
    ax.set_title(f"{timelines[0].label}: backward compute and bucket all-reduces" if timelines else "")
    fig.tight_layout()
    return fig
