"""Exercise 01: tensor-parallel linear layers.

01.1  CopyToTensorParallelRegion — Megatron's f as a torch.autograd.Function:
      forward identity, backward all-reduce of the gradient over the TP group.
01.2  ReduceFromTensorParallelRegion — Megatron's g: forward all-reduce, backward identity.
01.3  column_parallel_linear(x, weight_shard, bias_shard, state) — the column-parallel forward with
      gather_output: rank i holds W_i (out/tp, in) and b_i (out/tp,); return the full Y = X·Wᵀ + b,
      shape (..., out), on every rank, with correct gradients for x, W_i and b_i.
01.4  row_parallel_linear(x_shard, weight_shard, bias, state) — the row-parallel forward with
      input_is_parallel: rank i holds X_i (..., in/tp) and W_i (out, in/tp), the bias (out,) is
      replicated; return Y = Σ_i X_i·W_iᵀ + b on every rank.

A Function is called as ``MyFunction.apply(x, state)``: ``forward(ctx, x, state)`` and
``backward(ctx, grad)`` returning one gradient per forward input (``None`` for ``state``). The TP
group is ``state.tp_group``. Never modify a tensor you were given in place: clone it first.
For 01.3/01.4 you may use your f and g or the package's (``minimegatron.mpu.copy_to_...``), and the
package's ``gather_from_tensor_model_parallel_region`` for the all-gather.

Grade with:  grade_copy_to(CopyToTensorParallelRegion)     grade_reduce_from(ReduceFromTensorParallelRegion)
             grade_column_parallel_linear(column_parallel_linear)   grade_row_parallel_linear(row_parallel_linear)
Each runs your code on 4 real ranks — two TP groups of 2, each with its own data, so that a collective
over the wrong group shows — and compares outputs AND gradients with the single-device computation
(``_ex01_checks.py``), naming the usual mistakes. Submitting the package's own f/g (or the references
below) is refused: it proves nothing about your code.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist  # noqa: F401  (you will need it)
import torch.nn.functional as F

from exercises import _ex01_checks as C
from exercises.battery import each_candidate, refuse_reference, verdicts
from exercises.grading import GradingError, grader, passed, run_graded
from minimegatron.mpu import mappings
from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region,
                                       gather_from_tensor_model_parallel_region,
                                       reduce_from_tensor_model_parallel_region)
from minimegatron.mpu.state import ParallelState


class CopyToTensorParallelRegion(torch.autograd.Function):
    """Your code (01.1): f — forward identity, backward all-reduce."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
        # Hint: remember the state for backward (ctx.state = state); forward changes nothing.
        raise NotImplementedError("Exercise 01.1: implement f's forward (identity) and backward "
                                  "(all-reduce the gradient over state.tp_group)")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise NotImplementedError("Exercise 01.1: implement f's backward — all-reduce of the gradient")


class ReduceFromTensorParallelRegion(torch.autograd.Function):
    """Your code (01.2): g — forward all-reduce, backward identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
        raise NotImplementedError("Exercise 01.2: implement g's forward (all-reduce a clone of x over "
                                  "state.tp_group) and backward (identity)")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise NotImplementedError("Exercise 01.2: implement g's backward — the identity")


def column_parallel_linear(x: torch.Tensor, weight_shard: torch.Tensor, bias_shard: torch.Tensor,
                           state: ParallelState) -> torch.Tensor:
    """Your code (01.3): f, the local X·W_iᵀ + b_i of shape (..., out/tp), then all-gather to (..., out)."""
    raise NotImplementedError("Exercise 01.3: implement the column-parallel forward — f(x), F.linear with "
                              "this rank's shard, then all-gather the output slices")


def row_parallel_linear(x_shard: torch.Tensor, weight_shard: torch.Tensor, bias: torch.Tensor,
                        state: ParallelState) -> torch.Tensor:
    """Your code (01.4): the partial X_i·W_iᵀ, g (all-reduce), then + bias — once."""
    raise NotImplementedError("Exercise 01.4: implement the row-parallel forward — partial product, g, "
                              "then the bias")


# --- grading -----------------------------------------------------------------------------------------

TIMEOUT = 15.0  # s: four ranks, a few tiny matmuls each — a hang is reported well before a minute


def reference_column_parallel_linear(x, weight_shard, bias_shard, state):
    y = F.linear(copy_to_tensor_model_parallel_region(x, state), weight_shard, bias_shard)  # (…, out/tp)
    return gather_from_tensor_model_parallel_region(y, state)  # (…, out)


def reference_row_parallel_linear(x_shard, weight_shard, bias, state):
    return reduce_from_tensor_model_parallel_region(F.linear(x_shard, weight_shard), state) + bias


REFERENCES = {"01.1": (mappings._CopyToModelParallelRegion, copy_to_tensor_model_parallel_region),
              "01.2": (mappings._ReduceFromModelParallelRegion, reduce_from_tensor_model_parallel_region),
              "01.3": (reference_column_parallel_linear,), "01.4": (reference_row_parallel_linear,)}


def _as_callable(candidate: Any) -> Callable:
    if isinstance(candidate, type) and issubclass(candidate, torch.autograd.Function):
        return candidate.apply
    return candidate


def battery_verdicts(cases: Sequence[tuple[str, Any]], timeout: float = TIMEOUT) -> list[str]:
    """Grade many (part, candidate) pairs — part "01.1" … "01.4" — in ONE launch (the tests' batteries):
    for each, "✓ ..." or the message its grading raises. Only for candidates that behave alike on every
    rank (one that raises or hangs on some ranks only would stall the others)."""
    out: list[str | None] = []
    for part, c in cases:  # refused without running
        try:
            refuse_reference(f"Exercise {part}", c, *REFERENCES[part])
            out.append(None)
        except GradingError as err:
            out.append(str(err))
    run = [(part, _as_callable(c)) for (part, c), o in zip(cases, out) if o is None]
    per_rank = run_graded(each_candidate, C.WORLD, C.rank_case, run, catch=True, timeout=timeout) if run else [[]]
    judged = iter(verdicts(_judged, per_rank))
    return [o if o is not None else next(judged) for o in out]


def _judged(results: list[dict]) -> str:
    part = results[0]["part"]
    C.judge(part, results)
    return f"✓ Exercise {part}: forward and backward match the single-device computation on {C.WORLD} ranks " \
           f"(two TP groups of {C.TP})"


def _grade(part: str, candidate: Any, timeout: float) -> str:
    refuse_reference(f"Exercise {part}", candidate, *REFERENCES[part])
    per_rank = run_graded(each_candidate, C.WORLD, C.rank_case, [(part, _as_callable(candidate))],
                          timeout=timeout)
    return passed(_judged([results[0][1] for results in per_rank])[2:])


@grader
def grade_copy_to(candidate: Any, timeout: float = TIMEOUT) -> str:
    """01.1: f.apply(x, state); each rank's loss differs, so x.grad must be the sum over its TP group."""
    return _grade("01.1", candidate, timeout)


@grader
def grade_reduce_from(candidate: Any, timeout: float = TIMEOUT) -> str:
    """01.2: g.apply(x_r, state); the output must be Σ_r x_r over the TP group, x_r.grad the replicated ∂L/∂y."""
    return _grade("01.2", candidate, timeout)


@grader
def grade_column_parallel_linear(candidate: Callable, timeout: float = TIMEOUT) -> str:
    """01.3: the full output Y (…, out) on every rank, and gradients of x, W_i, b_i."""
    return _grade("01.3", candidate, timeout)


@grader
def grade_row_parallel_linear(candidate: Callable, timeout: float = TIMEOUT) -> str:
    """01.4: Y = Σ_i X_i·W_iᵀ + b on every rank, and gradients of X_i, W_i and the bias."""
    return _grade("01.4", candidate, timeout)
