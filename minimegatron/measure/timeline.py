"""Record what each pipeline stage does and when, draw it, and measure the bubble.

DeepSpeed's ``PipelineEngine.train_batch`` runs a *schedule*: for every stage a list of instructions
(``LoadMicroBatch``, ``ForwardPass``, ``SendActivation``, ``RecvGrad``, ``BackwardPass``, ...), each
executed by a method of the engine listed in its ``_INSTRUCTION_MAP`` (``_exec_forward_pass``,
``_exec_backward_pass``, ``_exec_send_activations``, ...). :class:`PipelineTimeline` puts a stopwatch
around each of those methods — on this engine instance only, and only while attached — so the
engine itself is untouched::

    with PipelineTimeline(engine) as tl:
        engine.train_batch(data_iter)
    events = tl.events                      # this rank's; gather them over ranks (launch returns them)
    plot_timeline(sum(per_rank_events, []))  # Gantt chart, one row per stage
    measured_bubble_fraction(all_events) vs pipeline_bubble_fraction(p, m)

**The bubble** (Narayanan et al. 2021, §2.2). With ``p`` stages, ``m`` micro-batches and a forward +
backward time ``t_f + t_b`` per micro-batch per stage, 1F1B (like GPipe) needs ``p - 1`` extra slots
to fill and drain the pipeline, so one step lasts ``(m + p - 1)(t_f + t_b)`` while each stage computes
for ``m (t_f + t_b)``. The idle share of each stage is

    bubble = (p - 1) / (m + p - 1)

Measured: all ranks start the step together (a barrier before each ``train_batch`` while attached);
the step's span runs from the first instruction (any stage) to the end of the last backward
pass (the optimizer step after the flush is not part of the schedule's bubble); a stage's busy time is
the sum of its forward and backward passes — and, under ZB-H1 (``pipe_engine``), of its W passes
(``BackwardWeightPass``, kind ``"weight"``; the span then ends with the last B or W); bubble = mean
over stages of ``1 - busy / span``. Send,
receive and loading time counts as idle: that is time the stage is not computing.

Clocks: ``time.perf_counter()`` is the system-wide monotonic clock on Linux and macOS, so events
recorded in different processes (simulated ranks) line up on one axis.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch.distributed as dist

from minimegatron.measure.fixed_time import FixedTimeLayer  # (defined there, re-exported here)
from minimegatron.measure.overlap import subtract  # interval arithmetic, one copy
from minimegatron.schedules import stage_bubble_fractions  # the one bubble formula

__all__ = ["PipeEvent", "PipelineTimeline", "FixedTimeLayer", "pipeline_bubble_fraction",
           "measured_bubble_fraction",
           "idle_intervals", "plot_timeline"]

# engine method -> event kind
_KINDS = {
    "_exec_forward_pass": "forward", "_exec_backward_pass": "backward",
    "_exec_send_activations": "send", "_exec_send_grads": "send",
    "_exec_recv_activations": "recv", "_exec_recv_grads": "recv",
    "_exec_load_micro_batch": "load", "_exec_optimizer_step": "optimizer",
    "_exec_reduce_grads": "reduce_grads", "_exec_reduce_tied_grads": "reduce_grads",
    "_exec_backward_weight_pass": "weight",  # ZB-H1's W (minimegatron.pipe_engine)
}
COMPUTE = ("forward", "backward", "weight")
COLORS = {"forward": "#4C72B0", "backward": "#55A868", "weight": "#8C8C3C", "send": "#C44E52",
          "recv": "#DD8452",
          "load": "#8172B3", "optimizer": "#937860", "reduce_grads": "#DA8BC3", "idle": "#EEEEEE"}


@dataclass
class PipeEvent:
    """One executed instruction: which rank/stage, what, when (perf_counter seconds), which step."""

    rank: int
    stage: int
    kind: str            # forward | backward | weight | send | recv | load | optimizer | reduce_grads
    start: float
    end: float
    step: int            # index of the train_batch call since the recorder was attached
    micro_batch: int     # k-th forward (backward, weight) of this step on this stage; -1 for others

    @property
    def duration(self) -> float:
        return self.end - self.start


class PipelineTimeline:
    """Time every instruction a DeepSpeed ``PipelineEngine`` executes on this rank."""

    def __init__(self, engine: Any) -> None:
        if not hasattr(engine, "_INSTRUCTION_MAP"):
            raise TypeError(f"{type(engine).__name__} is not a DeepSpeed PipelineEngine (no "
                            "_INSTRUCTION_MAP); build it with deepspeed.initialize(model=PipelineModule)")
        self.engine = engine
        self.events: list[PipeEvent] = []
        self._step = -1
        self._counts: dict[str, int] = {}
        self._attached = False

    def attach(self) -> "PipelineTimeline":
        """Shadow the engine's instruction map and ``train_batch`` with timed versions (this instance)."""
        eng = self.engine
        timed = {instr: self._timed(fn) for instr, fn in type(eng)._INSTRUCTION_MAP.items()}
        eng._INSTRUCTION_MAP = timed  # instance attribute hides the class's map
        train_batch = type(eng).train_batch

        def counted_train_batch(engine, *args, **kwargs):
            self._step += 1
            self._counts = {}
            # Every rank starts the step together. Without this, a rank that finished the previous
            # step early (the last stage does) sits in recv until stage 0 starts: skew between steps,
            # not the schedule's bubble (DeepSpeed 0.14 ends a step with no collective across stages).
            if dist.is_initialized():
                dist.barrier()
            return train_batch(engine, *args, **kwargs)

        eng.train_batch = MethodType(counted_train_batch, eng)
        self._attached = True
        return self

    def detach(self) -> None:
        if self._attached:
            for name in ("_INSTRUCTION_MAP", "train_batch"):
                self.engine.__dict__.pop(name, None)
            self._attached = False

    def __enter__(self) -> "PipelineTimeline":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _timed(self, fn):
        kind = _KINDS.get(fn.__name__, fn.__name__)

        def run(engine, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(engine, *args, **kwargs)
            finally:
                end = time.perf_counter()
                mb = -1
                if kind in COMPUTE:
                    mb = self._counts.get(kind, 0)
                    self._counts[kind] = mb + 1
                self.events.append(PipeEvent(engine.global_rank, engine.stage_id, kind, start, end,
                                             max(self._step, 0), mb))

        run.__name__ = fn.__name__
        return run


# ---- analysis -------------------------------------------------------------------------------------

def pipeline_bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle share of each stage in a 1F1B (or GPipe) step: ``(p - 1) / (m + p - 1)``."""
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"need stages >= 1 and micro_batches >= 1, got p={stages}, m={micro_batches}")
    return (stages - 1) / (micro_batches + stages - 1)


def interleaved_bubble_fraction(stages: int, micro_batches: int, chunks: int) -> float:
    """Interleaved 1F1B with ``v = chunks`` model chunks per stage (Narayanan et al. 2021, §2.2): the
    warm-up and cool-down shrink to ``(p - 1)`` chunk-sized units, ``1/v`` of a stage's work, so the
    idle share is ``(p - 1) / (v·m + p - 1)``."""
    if chunks < 1:
        raise ValueError(f"need chunks (virtual stages per rank) >= 1, got v={chunks}")
    pipeline_bubble_fraction(stages, micro_batches)  # the same checks
    return (stages - 1) / (chunks * micro_batches + stages - 1)


def zb_h1_bubble_fraction(stages: int, micro_batches: int, forward: float = 1.0,
                          backward_input: float = 1.0, backward_weight: float = 1.0) -> float:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", §3): the backward is split into B (the
    input gradient, on the critical path) and W (the weight gradient, deferred into the cool-down's
    idle slots). With ``T_F, T_B, T_W`` per micro-batch per stage the bubble is
    ``(p - 1)·(T_F + T_B - T_W)`` — 1F1B's is ``(p - 1)·(T_F + T_B + T_W)`` — so the idle share is
    ``(p - 1)(T_F + T_B - T_W) / (m (T_F + T_B + T_W) + (p - 1)(T_F + T_B - T_W))``: with equal times,
    ``(p - 1) / (3m + p - 1)``, a third of 1F1B's bubble in time. It holds for ``T_W <= min(T_F, T_B)``
    and ``m >= p`` (where :func:`minimegatron.schedules.simulate` agrees exactly); outside it raises."""
    pipeline_bubble_fraction(stages, micro_batches)
    if min(forward, backward_input, backward_weight) < 0:
        raise ValueError(f"need times >= 0, got T_F={forward}, T_B={backward_input}, T_W={backward_weight}")
    if backward_weight > min(forward, backward_input) or micro_batches < stages:  # where it holds
        raise ValueError(f"the ZB-H1 formula holds for T_W <= min(T_F, T_B) and m >= p (got T_W="
                         f"{backward_weight}, T_F={forward}, T_B={backward_input}, m={micro_batches}, "
                         f"p={stages}): outside, the W's cannot fill the bubble; simulate the order "
                         "(minimegatron.schedules.simulate) instead")
    bubble = (stages - 1) * (forward + backward_input - backward_weight)
    return bubble / (micro_batches * (forward + backward_input + backward_weight) + bubble)


def _step_events(events: list[PipeEvent], step: int | None) -> list[PipeEvent]:
    if not events:
        raise ValueError("no pipeline events recorded: was train_batch called inside the timeline?")
    step = max(e.step for e in events) if step is None else step
    chosen = [e for e in events if e.step == step]
    if not chosen:
        raise ValueError(f"no events for step {step}; recorded steps: {sorted({e.step for e in events})}")
    return chosen


def _span(events: list[PipeEvent]) -> tuple[float, float]:
    backward_ends = [e.end for e in events if e.kind in ("backward", "weight")]
    end = max(backward_ends) if backward_ends else max(e.end for e in events)
    return min(e.start for e in events), end


def measured_bubble_fraction(events: list[PipeEvent], step: int | None = None,
                             per_stage: bool = False) -> float | dict[int, float]:
    """``1 - busy/span`` averaged over stages, for one step (default: the last one recorded).

    ``events`` are the events of *all* ranks (concatenate what every rank recorded). With data
    parallelism several ranks share a stage; their busy times are averaged.
    """
    chosen = _step_events(events, step)
    t0, t1 = _span(chosen)
    span = t1 - t0
    busy: dict[int, dict[int, float]] = {}
    for e in chosen:
        if e.kind in COMPUTE:
            per_rank = busy.setdefault(e.stage, {})
            per_rank[e.rank] = per_rank.get(e.rank, 0.0) + e.duration
    fractions = stage_bubble_fractions({s: sum(r.values()) / len(r) for s, r in busy.items()}, span)
    return fractions if per_stage else sum(fractions.values()) / len(fractions)


def idle_intervals(events: list[PipeEvent], rank: int, step: int | None = None
                   ) -> list[tuple[float, float]]:
    """The gaps in one rank's compute (forward/backward/weight) within the step's span."""
    chosen = _step_events(events, step)
    t0, t1 = _span(chosen)
    busy = [(e.start, e.end) for e in chosen if e.rank == rank and e.kind in COMPUTE]
    return subtract([(t0, t1)], busy)


def plot_timeline(events: list[PipeEvent], step: int | None = None, ax=None, title: str | None = None,
                  show_comm: bool = True):
    """Gantt chart of one step: a row per stage (rank), forward F<k> / backward B<k> / weight W<k>
    boxes, idle grey."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    chosen = _step_events(events, step)
    t0, t1 = _span(chosen)
    ranks = sorted({(e.stage, e.rank) for e in chosen})
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.6 * len(ranks) + 1.2))
    # a box is labelled only where its label fits: ~4.5 pt per character at 7 pt, on the axes' width
    axes_pt = ax.get_position().width * ax.figure.get_figwidth() * 72
    fits = lambda seconds, label: seconds / max(t1 - t0, 1e-12) * axes_pt >= 4.5 * len(label) + 3  # noqa: E731
    for row, (stage, rank) in enumerate(ranks):
        y = len(ranks) - 1 - row
        for a, b in idle_intervals(chosen, rank):
            ax.barh(y, (b - a) * 1e3, left=(a - t0) * 1e3, color=COLORS["idle"], height=0.8)
        for e in chosen:
            if e.rank != rank or e.start >= t1 or (e.kind not in COMPUTE and not show_comm):
                continue
            h = 0.8 if e.kind in COMPUTE else 0.3
            width = min(e.end, t1) - e.start  # the step ends with the last B (or W): clip the rest
            ax.barh(y, width * 1e3, left=(e.start - t0) * 1e3, color=COLORS.get(e.kind, "k"),
                    height=h, edgecolor="white" if e.kind in COMPUTE else None, linewidth=0.5)
            label = f"{e.kind[0].upper()}{e.micro_batch}"
            if e.kind in COMPUTE and fits(width, label):
                ax.text((e.start - t0 + width / 2) * 1e3, y, label, ha="center", va="center", fontsize=7,
                        color="white")
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"stage {s} (rank {r})" for s, r in reversed(ranks)])
    ax.set_xlabel("time (ms)")
    present = {e.kind for e in chosen if e.start < t1}
    kinds = [k for k in ("forward", "backward", "weight", "send", "recv", "load", "optimizer", "reduce_grads")
             if k in present and (show_comm or k in COMPUTE)] + ["idle"]
    ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in kinds], loc="lower center",
              bbox_to_anchor=(0.5, 1.01), fontsize=8, ncol=len(kinds), frameon=False)
    ax.set_title(title or f"pipeline timeline: measured bubble {measured_bubble_fraction(chosen):.1%}",
                 pad=24)
    return ax
