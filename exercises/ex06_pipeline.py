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
      The previous/next stage's global rank: ``state.pp_ranks[state.pp_rank ∓ 1]``. Careful: with a
      blocking ``dist.send``, 1F1B deadlocks (stage 0 sends F1's activation while stage 1 sends B0's
      gradient; each waits for the other to receive). Send with ``dist.isend``, keep the handles (and
      the tensors) and ``wait()`` on them at the end; receive with ``dist.recv``.
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

from exercises.grading import (MULTI_RANK_TIMEOUT, SINGLE_PROCESS_TIMEOUT, GradingError, assert_close,
                               call_candidate, grader, kind_of, passed, run_graded, run_isolated)
from minimegatron.mpu.state import ParallelState, initialize_model_parallel


def one_f_one_b_order(stage: int, num_stages: int, num_micro_batches: int) -> list[tuple[str, int]]:
    """Your code (06.1): stage ``stage``'s 1F1B order, e.g. [("F", 0), ("F", 1), ("B", 0), ...]."""
    raise NotImplementedError("Exercise 06.1: return the 1F1B order of this stage — warm-up forwards, "
                              "then one forward / one backward in turn, then the remaining backwards")


def run_schedule(stage: nn.Module, order: Sequence[tuple[str, int]],
                 micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], state: ParallelState,
                 activation_shape: Sequence[int]) -> float | None:
    """Your code (06.2): run ``order`` on this stage with isend/recv; the mean loss on the last stage."""
    raise NotImplementedError("Exercise 06.2: execute the order — F: recv (or read) the input, run the "
                              "stage, send the output (or compute the loss / m); B: backward, send "
                              "input.grad")


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


@grader
def grade_one_f_one_b_order(candidate: Callable[[int, int, int], Sequence[tuple[str, int]]],
                            timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """06.1 for p in 1..4 and 8, m in 1..4 and 8, every stage: against DeepSpeed's TrainSchedule.

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    import deepspeed.runtime.pipe.schedule  # noqa: F401  (seconds to import: once here, not per grading)
    return run_isolated(_grade_one_f_one_b_order, candidate, timeout=timeout, role="one_f_one_b_order")


def _grade_one_f_one_b_order(candidate: Callable) -> str:
    from minimegatron.schedules import deepspeed_order, gpipe_order

    for p in (1, 2, 3, 4, 8):
        for m in (1, 2, 3, 4, 8):
            for s in range(p):
                where = f"Exercise 06.1 (stage {s} of p={p}, m={m} micro-batches)"
                got = call_candidate(where, candidate, s, p, m, exercise="Exercise 06.1")
                got, expected = _as_order(where, got), deepspeed_order(s, p, m)
                if got == expected:
                    continue
                kinds = {kind for kind, _ in got}
                if not kinds <= {"F", "B"}:
                    raise GradingError(f"{where}: unknown kinds {sorted(kinds - {'F', 'B'})}; "
                                       "use 'F' and 'B'")
                for kind in ("F", "B"):
                    mbs = sorted(k for c, k in got if c == kind)
                    if mbs != list(range(m)):
                        raise GradingError(f"{where}: every micro-batch 0..{m - 1} needs exactly one {kind}; "
                                           f"your {kind}s are for micro-batches {mbs}")
                for k in range(m):
                    if got.index(("B", k)) < got.index(("F", k)):
                        raise GradingError(f"{where}: ('B', {k}) comes before ('F', {k}) — a backward "
                                           "needs its forward's activations")
                if got == gpipe_order(s, p, m) and m > 1:
                    raise GradingError(f"{where}: that is GPipe (every forward first), which holds {m} "
                                       f"micro-batches' activations; 1F1B starts backward as soon as the "
                                       f"pipeline is full: {expected}")
                warm_got = next(i for i, (c, _) in enumerate(got) if c == "B")
                warm_exp = next(i for i, (c, _) in enumerate(expected) if c == "B")
                if warm_got != warm_exp:
                    raise GradingError(
                        f"{where}: {warm_got} forwards before the first backward, expected {warm_exp} = "
                        f"min(p - stage, m): the first gradient reaches stage {s} only after micro-batch 0 "
                        f"has gone through the {p - 1 - s} later stages and back, and this stage keeps "
                        f"busy with forwards meanwhile")
                i = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
                raise GradingError(f"{where}: position {i} is {got[i]}, DeepSpeed's schedule has "
                                   f"{expected[i]}; expected order {expected}")
    return passed("Exercise 06.1: your 1F1B orders equal DeepSpeed's TrainSchedule for p ≤ 8, m ≤ 8")


H, MB, M = 8, 2, 4  # width of the toy stages, micro-batch size, micro-batches per step


class _Tick(torch.autograd.Function):
    """Identity that logs 'F' when the stage's forward ends and 'B' when its backward starts."""

    @staticmethod
    def forward(ctx, x, log):
        ctx.log = log
        log.append("F")
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append("B")
        return grad, None


class _ToyStage(nn.Module):
    """Stage s of the toy pipeline: Linear(H, H) + tanh, drawn from seed 100 + s."""

    def __init__(self, s: int) -> None:
        super().__init__()
        torch.manual_seed(100 + s)
        self.linear = nn.Linear(H, H)
        self.log: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Tick.apply(torch.tanh(self.linear(x)), self.log)


def _toy_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(MB, H, generator=g), torch.randn(MB, H, generator=g)) for _ in range(M)]


def _loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return ((out - labels) ** 2).mean()


def _schedule_case(p: int, schedule: str, candidate: Callable) -> dict:
    """On each rank: the candidate runs one step; the unsplit model computes the same step densely."""
    from minimegatron import schedules

    state = initialize_model_parallel(1, p)
    s = state.pp_rank
    data = _toy_data()
    dense = nn.ModuleList(_ToyStage(i) for i in range(p))
    losses = []
    for x, y in data:
        for layer in dense:
            x = layer(x)
        losses.append(_loss_fn(x, y))
    torch.stack(losses).mean().backward()
    order = getattr(schedules, schedule)(s, p, M)
    stage = _ToyStage(s)
    loss = candidate(stage, order, data, _loss_fn, state, (MB, H))
    if isinstance(loss, torch.Tensor):
        loss = loss.detach().reshape(()) if loss.numel() == 1 else loss.detach()
    grads = {n: (None if q.grad is None else q.grad.clone()) for n, q in stage.named_parameters()}
    return {"loss": loss, "expected_loss": torch.stack(losses).mean().detach(), "grads": grads,
            "expected_grads": {n: q.grad.clone() for n, q in dense[s].named_parameters()},
            "log": stage.log, "order": [c for c, _ in order]}


@grader
def grade_run_schedule(candidate: Callable, timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """06.2 on 2 and 4 ranks with GPipe and 1F1B orders: loss, gradients, and the order actually run."""
    for p in (2, 4):
        for schedule in ("gpipe_order", "one_f_one_b_order"):
            name = "GPipe" if schedule == "gpipe_order" else "1F1B"
            try:
                results = run_graded(_schedule_case, p, p, schedule, candidate, timeout=timeout)
            except GradingError as err:
                if str(err).startswith("timeout"):
                    raise GradingError(f"Exercise 06.2 ({name}, p={p}): {err}\nWith the 1F1B order a "
                                       "blocking dist.send deadlocks: send with dist.isend and wait() at "
                                       "the end.") from None
                raise
            for s, res in enumerate(results):
                where = f"Exercise 06.2 ({name}, p={p}, stage {s})"
                if res["log"] != res["order"]:
                    raise GradingError(f"{where}: the stage ran {''.join(res['log'])} (F = a forward ended, "
                                       f"B = a backward started) but the order was {''.join(res['order'])}: "
                                       "run the work in the order given")
                if s == p - 1:
                    loss = res["loss"]
                    if loss is None:
                        raise GradingError(f"{where}: the last stage must return the mean loss, got None")
                    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
                        loss = float(loss)
                    if not isinstance(loss, (int, float)) or isinstance(loss, bool):
                        raise GradingError(f"{where}: the last stage must return the mean loss as a float, "
                                           f"got {kind_of(loss)}")
                    assert_close(f"{where}, loss (mean over the {M} micro-batches)",
                                 torch.tensor(float(loss), dtype=torch.float32), res["expected_loss"],
                                 rtol=1e-5, atol=1e-6)
                for n, expected in res["expected_grads"].items():
                    got = res["grads"][n]
                    if got is None:
                        raise GradingError(f"{where}: no gradient reached {n} — did backward run on this "
                                           "stage (from the received gradient, or from the loss on the last "
                                           "stage)?")
                    if torch.allclose(got, M * expected, rtol=1e-4, atol=1e-7):
                        raise GradingError(f"{where}: gradient of {n} is {M}× too large — divide each "
                                           f"micro-batch's loss by m = {M} (the step's loss is the mean)")
                    assert_close(f"{where}, gradient of {n} (accumulated over the micro-batches)", got,
                                 expected, rtol=1e-5, atol=1e-6)
    return passed("Exercise 06.2: GPipe and 1F1B on 2 and 4 ranks give the unsplit model's loss and "
                  "gradients, in the order given")
