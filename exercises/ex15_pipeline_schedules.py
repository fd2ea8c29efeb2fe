"""Exercise 15: pipeline schedules beyond 1F1B — Megatron's interleaved 1F1B and ZB-H1's split backward.

A schedule is only the order in which each stage runs its units of work; the data dependencies are
fixed (``minimegatron/schedules/orders.py``). Layouts — one stage's order, a list of::

    15.1  ("F" | "B", micro_batch, chunk)   chunk c of stage s of p is virtual stage c·p + s (v chunks)
    15.2  ("F" | "B" | "W", micro_batch)    B: the gradient of the stage's input, W: of its weights

15.1  interleaved_order(stage, num_stages, num_micro_batches, chunks) -> Megatron's interleaved 1F1B on
      stage s of p, with v = chunks model chunks per stage and m a multiple of p: m·v forwards and m·v
      backwards, each of one chunk. The i-th forward is micro-batch (i // pv)·p + i % p on chunk
      (i % pv) // p — p micro-batches through chunk 0, the same p through chunk 1, …, through chunk
      v−1, then the next group of p. The i-th backward is the i-th forward's micro-batch on chunk
      v−1−c: the backward goes through the chunks last-to-first. Then as 1F1B over the m·v units::

          w warm-up forwards | m·v − w times: the next forward, the next backward | the last w backwards
          w = min(2(p − s − 1) + (v − 1)·p,  m·v)

      p = 2, v = 2, m = 4, stage 0: F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1
      B2.0 B3.0 (Fk.c: forward of micro-batch k on chunk c). Why that w: ``interleaved_order``'s docstring.

15.2  zb_h1_order(stage, num_stages, num_micro_batches) -> ZB-H1 (Qi et al. 2023) on stage s of p: 1F1B's
      order, w = min(p − 1 − s, m) warm-up forwards, with B for the backward — and the W's put in, stage s
      running its W's s micro-batches late::

          steady      j = 0 .. m−w−1:   F(w + j)  B(j)  then W(j − s) once j ≥ s
          cool-down   each of the last w backwards followed by the next W; then the W's left over

      p = 2, m = 4:  stage 0  F0 F1 B0 W0 F2 B1 W1 F3 B2 W2 B3 W3
                     stage 1  F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3

Grade with:  grade_interleaved_order(interleaved_order)     grade_zb_h1_order(zb_h1_order)
Each runs in one separate process (no ranks) and compares every stage's order, unit by unit (kind,
micro-batch, chunk), with the package's (``minimegatron.schedules``): 15.1 for p = 1..4, v = 1..3,
m = p, 2p, 3p; 15.2 for p = 1..4, m = 3p, 2p, p+1, p, 2, 1. A wrong order is named when it is one of the
usual mistakes (``exercises/_ex15_mistakes.py``): LIFO backwards, the chunks' order, the warm-up count
and its cap, W's not deferred or deferred by the wrong amount, ... — and when every stage running your
orders would deadlock (``schedules.simulate``), the message says so.
"""
from __future__ import annotations

from typing import Callable

from exercises import _ex15_mistakes as M
from exercises.grading import (SINGLE_PROCESS_TIMEOUT, GradingError, call_candidate, grader, passed,
                               run_isolated)


def interleaved_order(stage: int, num_stages: int, num_micro_batches: int, chunks: int) -> list[tuple]:
    """Your code (15.1): stage ``stage``'s interleaved 1F1B order, [("F", 0, 0), ("F", 1, 0), ...]."""
    # Hint: write forward(i) -> ("F", k, c) and backward(i) -> ("B", k, v - 1 - c) for i = 0 .. m·v - 1,
    # then lay them out as 1F1B does, with w from the formula.
    raise NotImplementedError("Exercise 15.1: the interleaved order — forwards in groups of p micro-batches "
                              "per chunk, backwards on chunk v-1-c, w = min(2(p-s-1) + (v-1)p, m·v) warm-up "
                              "forwards, then F B in turn, then the remaining backwards")


def zb_h1_order(stage: int, num_stages: int, num_micro_batches: int) -> list[tuple[str, int]]:
    """Your code (15.2): stage ``stage``'s ZB-H1 order, [("F", 0), ("B", 0), ("W", 0), ...]."""
    # Hint: start from 1F1B's order and count the W's you have put in: after B(j), W(j - s) once j >= s.
    raise NotImplementedError("Exercise 15.2: the ZB-H1 order — 1F1B with B for the backward, stage s "
                              "running W(j - s) after B(j) once j >= s; in the cool-down a W after each B, "
                              "then the W's left over")


# --- grading -----------------------------------------------------------------------------------------

def package_interleaved_order(stage, num_stages, num_micro_batches, chunks):
    """The package's order (``minimegatron.schedules.interleaved_order``)."""
    from minimegatron.schedules import interleaved_order as order
    return order(stage, num_stages, num_micro_batches, chunks)


def package_zb_h1_order(stage, num_stages, num_micro_batches):
    """The package's order (``minimegatron.schedules.zb_h1_order``)."""
    from minimegatron.schedules import zb_h1_order as order
    return order(stage, num_stages, num_micro_batches)


def _grade_orders(candidate: Callable, exercise: str, name: str, cases, expected_fn: Callable,
                  kinds: str, problem: Callable) -> None:
    """Every stage's order for each (p, m, extra args) of ``cases``, stage by stage against the package."""
    names = ("stage", "num_stages", "num_micro_batches", "chunks")
    for p, m, extra in cases:
        orders, wheres = {}, {}
        for s in range(p):
            args = ", ".join(f"{k}={x}" for k, x in zip(names, (s, p, m, *extra)))
            wheres[s] = where = f"{exercise} {name}({args})"
            got = call_candidate(where, candidate, s, p, m, *extra, exercise=exercise)
            orders[s] = M.as_order(where, got, kinds)
        for s in range(p):
            message = problem(orders, s, p, m, *extra)
            if message:
                raise GradingError(f"{wheres[s]}: {message}{M.deadlock(orders, p, m)}"
                                   f"{M.orders_shown(orders[s], expected_fn(s, p, m, *extra))}")


@grader
def grade_interleaved_order(candidate: Callable, timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """15.1: every stage for p = 1..4, v = 1..3, m = p, 2p, 3p against the package's interleaved order.
    Runs in a separate process: an exception or an endless loop (``timeout`` s) is a GradingError."""
    import minimegatron.schedules  # noqa: F401  (imported once here, not in the grading process)
    return run_isolated(_grade_interleaved_order, candidate, timeout=timeout, role="interleaved_order")


def _grade_interleaved_order(candidate: Callable) -> str:
    cases = [(p, m, (v,)) for p in (1, 2, 3, 4) for v in (1, 2, 3) for m in (p, 2 * p, 3 * p)]
    _grade_orders(candidate, "Exercise 15.1", "interleaved_order", cases, package_interleaved_order, "FB",
                  lambda orders, s, p, m, v: M.interleaved_problem(orders[s], s, p, m, v))
    return passed("Exercise 15.1: interleaved_order is Megatron's interleaved 1F1B on every stage for p ≤ 4, "
                  "v ≤ 3 chunks, m = p, 2p, 3p")


@grader
def grade_zb_h1_order(candidate: Callable, timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """15.2: every stage for p = 1..4 and m = 1, 2, p, p+1, 2p, 3p against the package's ZB-H1 order.
    Runs in a separate process: an exception or an endless loop (``timeout`` s) is a GradingError."""
    import minimegatron.schedules  # noqa: F401  (imported once here, not in the grading process)
    return run_isolated(_grade_zb_h1_order, candidate, timeout=timeout, role="zb_h1_order")


def _grade_zb_h1_order(candidate: Callable) -> str:
    # m from the largest down: the first wrong case then tells the W's placement apart best
    cases = [(p, m, ()) for p in (1, 2, 3, 4) for m in sorted({1, 2, p, p + 1, 2 * p, 3 * p}, reverse=True)]
    _grade_orders(candidate, "Exercise 15.2", "zb_h1_order", cases, package_zb_h1_order, "FBW",
                  lambda orders, s, p, m: M.zb_problem(orders[s], orders, s, p, m))
    return passed("Exercise 15.2: zb_h1_order is ZB-H1's order on every stage for p ≤ 4, m ≤ 3p")
