"""Exercise 06: pipeline schedules.

06.1  one_f_one_b_order(stage, num_stages, num_micro_batches) — the order in which stage ``s`` of a
      ``p``-stage pipeline runs its work in one 1F1B training step: a list of ``("F", k)`` (forward of
      micro-batch k) and ``("B", k)`` (backward of micro-batch k), 2m entries. First the warm-up
      forwards the pipeline needs before this stage's first backward can arrive, then one forward
      and one backward in turn, then the remaining backwards. Graded against the order of DeepSpeed's
      own ``TrainSchedule`` (the schedule its PipelineEngine executes) for p up to 8, m up to 8.

06.2  run_schedule(stage, order, micro_batches, loss_fn, state, activation_shape) — execute one
      stage's ``order`` with point-to-point messages, like the notebook's GPipe loop but for any order:

        ("F", k): input = micro_batches[k][0] on the first stage, else receive a tensor of
                  ``activation_shape`` from the previous stage (it needs requires_grad); out = stage(input);
                  the last stage computes loss_fn(out, micro_batches[k][1]) / m, the others send out
                  to the next stage; keep (input, out) until B k.
        ("B", k): backward from the loss (last stage), or from the gradient received from the next
                  stage; send input.grad to the previous stage (not on the first stage).

      Return the mean loss over the micro-batches (a float) on the last stage, None elsewhere.
      The previous/next stage's global rank: ``state.pp_ranks[state.pp_rank ∓ 1]``. Before you run
      it with the 1F1B order, trace stages 0 and 1 of p = 2, m = 2 by hand with blocking
      ``dist.send`` / ``dist.recv``: who waits for whom? (Notebook 06 asks you to explain it; the
      grader says so if your code hangs there.)
      Graded on 2 and 4 real ranks, with the GPipe and the 1F1B order: loss and every gradient equal
      the unsplit model's on the whole batch, and each stage ran the order it was given.

Grade with:  grade_one_f_one_b_order(one_f_one_b_order)    grade_run_schedule(run_schedule)
The references: minimegatron.schedules (one_f_one_b_order, run_schedule); DeepSpeed's TrainSchedule.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist  # noqa: F401  (you will need it)
from torch import nn

from exercises import _ex06_checks as C
from exercises.battery import each_candidate, refuse_reference, verdicts
from exercises.grading import (GradingError, call_candidate, grader, kind_of, passed, run_graded,
                               run_isolated)
from minimegatron.mpu.state import ParallelState


def one_f_one_b_order(stage: int, num_stages: int, num_micro_batches: int) -> list[tuple[str, int]]:
    """Your code (06.1): stage ``stage``'s 1F1B order, e.g. [("F", 0), ("F", 1), ("B", 0), ...]."""
    raise NotImplementedError("Exercise 06.1: return the 1F1B order of this stage — warm-up forwards, "
                              "then one forward / one backward in turn, then the remaining backwards")


def run_schedule(stage: nn.Module, order: Sequence[tuple[str, int]],
                 micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], state: ParallelState,
                 activation_shape: Sequence[int]) -> float | None:
    """Your code (06.2): run ``order`` on this stage with point-to-point messages; the mean loss on the
    last stage."""
    raise NotImplementedError("Exercise 06.2: execute the order (the contract is in the module docstring)")


# --- grading -----------------------------------------------------------------------------------------

def _as_order(where: str, got) -> list[tuple[str, int]]:
    problem = f"{where}: expected a list of (kind, micro_batch) pairs like [('F', 0), ('B', 0)], got "
    if got is None or isinstance(got, (str, bytes, dict)):
        raise GradingError(problem + kind_of(got))
    try:
        order = []
        for item in got:
            if isinstance(item, (str, bytes)) or len(item) != 2:
                raise GradingError(f"{problem}an entry {kind_of(item)}")
            kind, k = item
            if not isinstance(kind, str):
                raise GradingError(f"{problem}an entry whose kind is {kind_of(kind)}; use 'F' and 'B'")
            order.append((kind, int(k)))
        return order
    except GradingError:
        raise
    except Exception:  # noqa: BLE001 - not iterable, entries that are not pairs of (str, int)
        raise GradingError(problem + kind_of(got)) from None


ORDER_SIZES = [(p, m) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 8)]
ORDER_TIMEOUT = 10.0  # s: 75 small lists
SCHEDULE_TIMEOUT = 15.0  # s per launch: 2 or 4 ranks, 4 micro-batches of an 8×8 layer — a hang shows fast


@grader
def grade_one_f_one_b_order(candidate: Callable[[int, int, int], Sequence[tuple[str, int]]],
                            timeout: float = ORDER_TIMEOUT) -> str:
    """06.1 for p in 1..4 and 8, m in 1..4 and 8, every stage: against DeepSpeed's TrainSchedule.

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    import deepspeed.runtime.pipe.schedule  # noqa: F401  (seconds to import: once here, not per grading)
    from minimegatron import schedules

    refuse_reference("Exercise 06.1", candidate, schedules.one_f_one_b_order, schedules.deepspeed_order)
    return run_isolated(_grade_one_f_one_b_order, candidate, timeout=timeout, role="one_f_one_b_order")


def _warm(order: list[tuple[str, int]]) -> int:
    """How many forwards run before the first backward."""
    return next((i for i, (c, _) in enumerate(order) if c == "B"), len(order))


def _grade_one_f_one_b_order(candidate: Callable) -> str:
    from minimegatron.schedules import deepspeed_order, gpipe_order

    got, wrong = {}, []  # every (stage, p, m) first: a mistake is named by its pattern over all of them
    for p, m in ORDER_SIZES:
        for s in range(p):
            where = f"Exercise 06.1 (stage {s} of p={p}, m={m} micro-batches)"
            got[s, p, m] = _as_order(where, call_candidate(where, candidate, s, p, m, exercise="Exercise 06.1"))
            if got[s, p, m] != deepspeed_order(s, p, m):
                wrong.append((s, p, m))
    if not wrong:
        return passed("Exercise 06.1: your 1F1B orders equal DeepSpeed's TrainSchedule for p ≤ 8, m ≤ 8")
    s, p, m = wrong[0]
    order, expected = got[s, p, m], deepspeed_order(s, p, m)
    where = f"Exercise 06.1 (stage {s} of p={p}, m={m} micro-batches)"
    kinds = {kind for kind, _ in order}
    if not kinds <= {"F", "B"}:
        raise GradingError(f"{where}: unknown kinds {sorted(kinds - {'F', 'B'})}; use 'F' and 'B'")
    for kind in ("F", "B"):
        mbs = sorted(k for c, k in order if c == kind)
        if mbs != list(range(m)):
            extra = (f" — more warm-up forwards than micro-batches: the warm-up is min(p - stage, m)"
                     if kind == "F" and len(mbs) > m else "")
            raise GradingError(f"{where}: every micro-batch 0..{m - 1} needs exactly one {kind}; your {kind}s "
                               f"are for micro-batches {mbs}{extra}")
    for k in range(m):
        if order.index(("B", k)) < order.index(("F", k)):
            raise GradingError(f"{where}: ('B', {k}) comes before ('F', {k}) — a backward needs its forward's "
                               "activations")
    if all(got[key] == gpipe_order(*key) for key in got):
        raise GradingError(f"{where}: that is GPipe (every forward first), which holds {m} micro-batches' "
                           f"activations; 1F1B starts backward as soon as the pipeline is full: {expected}")
    bs = [k for c, k in order if c == "B"]
    if bs != sorted(bs):
        raise GradingError(f"{where}: the backwards run in the order {bs}: a stage backpropagates its OLDEST "
                           "pending forward first (micro-batch order, FIFO) — the gradients arrive from the next "
                           "stage in that order")
    shift = {_warm(got[key]) - _warm(deepspeed_order(*key)) for key in wrong}
    warm_got, warm_exp = _warm(order), _warm(expected)
    if warm_got != warm_exp:
        pattern = ""
        if all(_warm(got[key]) == min(key[1], key[2]) for key in got):
            pattern = " Your warm-up is the same on every stage: the later a stage, the sooner its first " \
                      "gradient comes back."
        elif all(_warm(got[key]) == min(key[0] + 1, key[2]) for key in got):
            pattern = " Your warm-up grows with the stage: it is counted from the wrong end — the FIRST stage " \
                      "waits longest for its first gradient."
        elif shift == {1}:
            pattern = " One warm-up forward too many, wherever your order differs: min(p - stage, m) forwards " \
                      "in all, counting the one that starts the steady state (not p - stage + 1)."
        elif shift == {-1}:
            pattern = " One warm-up forward too few, wherever your order differs: min(p - stage, m), not " \
                      "p - stage - 1."
        raise GradingError(
            f"{where}: {warm_got} forwards before the first backward, expected {warm_exp} = min(p - stage, m): "
            f"the first gradient reaches stage {s} only after micro-batch 0 has gone through the {p - 1 - s} "
            f"later stages and back, and this stage keeps busy with forwards meanwhile.{pattern}")
    i = next(i for i, (a, b) in enumerate(zip(order, expected)) if a != b)
    raise GradingError(f"{where}: position {i} is {order[i]}, DeepSpeed's schedule has {expected[i]}; after the "
                       f"warm-up a stage alternates one backward (the oldest) and one forward; expected order "
                       f"{expected}")


SCHEDULES = [(p, schedule) for p in (2, 4) for schedule in ("gpipe_order", "one_f_one_b_order")]


def _name(schedule: str) -> str:
    return "GPipe" if schedule == "gpipe_order" else "1F1B"


def _deadlock_hint(err: GradingError, schedule: str, p: int) -> GradingError:
    if str(err).startswith("timeout"):
        return GradingError(f"Exercise 06.2 ({_name(schedule)}, p={p}): {err}\nWith the 1F1B order a blocking "
                            "dist.send deadlocks: send with dist.isend and wait() at the end.")
    return err


@grader
def grade_run_schedule(candidate: Callable, timeout: float = SCHEDULE_TIMEOUT) -> str:
    """06.2 on 2 and 4 ranks with GPipe and 1F1B orders: loss, gradients, and the order actually run —
    which micro-batch each forward read and each backward backpropagated (``timeout``: per launch)."""
    from minimegatron import schedules

    refuse_reference("Exercise 06.2", candidate, schedules.run_schedule)
    for p, schedule in SCHEDULES:
        try:
            per_rank = run_graded(each_candidate, p, C.schedule_case, [candidate], p, schedule, timeout=timeout)
        except GradingError as err:
            raise _deadlock_hint(err, schedule, p) from None
        C.judge(_name(schedule), p, [results[0][1] for results in per_rank])
    return passed("Exercise 06.2: GPipe and 1F1B on 2 and 4 ranks give the unsplit model's loss and "
                  "gradients, in the order given")


def battery_verdicts(candidates: Sequence[Callable], timeout: float = SCHEDULE_TIMEOUT) -> list[str]:
    """06.2 for many candidates, one launch per (p, order) for all of them (the tests' batteries): for
    each, "✓ ..." or the message of its first failure. Only candidates that neither hang nor raise on
    some ranks alone."""
    verdict: list[str | None] = [None] * len(candidates)
    for p, schedule in SCHEDULES:
        live = [i for i, v in enumerate(verdict) if v is None]
        if not live:
            break
        per_rank = run_graded(each_candidate, p, C.schedule_case, [candidates[i] for i in live], p, schedule,
                              catch=True, timeout=timeout)
        for i, v in zip(live, verdicts(lambda results: C.judge(_name(schedule), p, results) or "", per_rank)):
            verdict[i] = v or None
    return [v or "✓ Exercise 06.2" for v in verdict]
