"""An ideal machine for pipeline orders: fixed times per unit of work, free communication.

:func:`simulate` places every stage's order in time: a unit starts as soon as its stage is free and
its input is ready (the dependencies of :mod:`minimegatron.schedules.orders`, with virtual stages
``j = c·p + s``). What comes out is a list of :class:`Slot` — the same type
:func:`minimegatron.schedules.run_schedule` records on real ranks — so one bubble formula serves both:

    bubble = mean over stages of  1 - busy / span        (span: first start to last end, all stages)

For GPipe and 1F1B with uniform times this is ``(p - 1)/(m + p - 1)``; for interleaved 1F1B with
per-chunk times ``t_f/v, t_b/v`` it is ``(p - 1)/(v·m + p - 1)``; for ZB-H1 with ``T_F, T_B, T_W``
it is ``(p-1)(T_F+T_B-T_W) / (m(T_F+T_B+T_W) + (p-1)(T_F+T_B-T_W))`` (``minimegatron.measure``'s
formulas; the tests check each against this simulator).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from minimegatron.schedules.orders import Work, check_order, work_item

__all__ = ["Slot", "simulate", "stage_bubble_fractions", "bubble_fraction", "simulated_bubble_fraction"]


@dataclass
class Slot:
    """One unit of work placed in time: by :func:`simulate`, or measured by ``run_schedule``."""

    stage: int
    kind: str          # "F" | "B" | "W"
    micro_batch: int
    start: float
    end: float
    chunk: int = 0     # model chunk on this stage (virtual stage chunk·p + stage)

    @property
    def duration(self) -> float:
        return self.end - self.start


def _dependency(kind: str, k: int, j: int, last: int) -> tuple[str, int, int] | None:
    """What unit ``(kind, k)`` on virtual stage ``j`` waits for: (kind, micro-batch, virtual stage)."""
    if kind == "F":
        return ("F", k, j - 1) if j > 0 else None
    if kind == "B":
        return ("B", k, j + 1) if j < last else ("F", k, j)
    return ("B", k, j)  # W: after this stage's own B


def simulate(order_fn: Callable[[int, int, int], Sequence[Work]], num_stages: int, num_micro_batches: int,
             forward_time: float = 1.0, backward_time: float = 2.0, weight_time: float = 1.0
             ) -> list[Slot]:
    """Place every stage's order in time. Raises a ValueError if an order is incomplete or the orders
    deadlock (every stage waits for work no stage can do next).

    ``order_fn(s, p, m)`` gives stage s's order (for interleaved 1F1B:
    ``functools.partial(interleaved_order, chunks=v)``; the number of chunks is read off the orders).
    Times are per unit: ``forward_time`` per F, ``backward_time`` per B (the whole backward in orders
    without W, the input gradient in orders with W), ``weight_time`` per W. For chunks, pass a chunk's
    time (a stage's time divided by v)."""
    p, m = num_stages, num_micro_batches
    orders = [[work_item(w) for w in order_fn(s, p, m)] for s in range(p)]
    v = 1 + max((c for order in orders for _, _, c in order), default=0)
    for s, order in enumerate(orders):
        try:
            check_order(order, m, v, in_sequence=False)  # the deadlock check covers it
        except ValueError as err:
            raise ValueError(f"stage {s}: {err}") from None
    time = {"F": forward_time, "B": backward_time, "W": weight_time}
    done: dict[tuple[str, int, int], float] = {}  # (kind, micro-batch, virtual stage) -> end time
    free, nxt, slots = [0.0] * p, [0] * p, []
    while any(nxt[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while nxt[s] < len(orders[s]):
                kind, k, c = orders[s][nxt[s]]
                j = c * p + s
                dep = _dependency(kind, k, j, p * v - 1)
                if dep is not None and dep not in done:
                    break  # waits for another stage (or for its own earlier unit)
                start = max(free[s], done[dep] if dep else 0.0)
                done[(kind, k, j)] = free[s] = start + time[kind]
                slots.append(Slot(s, kind, k, start, free[s], c))
                nxt[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: orders[s][nxt[s]] for s in range(p) if nxt[s] < len(orders[s])}
            raise ValueError(f"the orders deadlock: every stage waits for work no stage can do next "
                             f"(next unit per stage: {stuck}); check that B k comes after F k and that "
                             "stages run the micro-batches in the same order")
    return slots


def stage_bubble_fractions(busy: Mapping[int, float], span: float) -> dict[int, float]:
    """The bubble of each stage, ``1 - busy / span``: the share of the step's span it sat idle.

    The one formula behind every bubble here: :func:`bubble_fraction` (slots, simulated or recorded
    by ``run_schedule``) and :func:`minimegatron.measure.measured_bubble_fraction` (recorded DeepSpeed
    events); their mean over stages is what ``(p - 1) / (m + p - 1)`` predicts for 1F1B."""
    return {s: 1.0 - b / span for s, b in sorted(busy.items())}


def bubble_fraction(slots: Sequence[Slot], per_stage: bool = False) -> float | dict[int, float]:
    """Mean over stages of ``1 - busy / span`` (span: the first start to the last end)."""
    if not slots:
        raise ValueError("no slots: simulate an order or run one with run_schedule first")
    span = max(x.end for x in slots) - min(x.start for x in slots)
    busy: dict[int, float] = {}
    for x in slots:
        busy[x.stage] = busy.get(x.stage, 0.0) + x.duration
    fractions = stage_bubble_fractions(busy, span)
    return fractions if per_stage else sum(fractions.values()) / len(fractions)


def simulated_bubble_fraction(slots: Sequence[Slot]) -> float:
    """:func:`bubble_fraction` of simulated slots (the name the notebooks use)."""
    return bubble_fraction(slots)  # type: ignore[return-value]
