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
Each runs your code on 2 real ranks and compares outputs AND gradients with the package's reference
(minimegatron/mpu/mappings.py and layers.py).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist  # noqa: F401  (you will need it)
import torch.nn.functional as F

from exercises.grading import (MULTI_RANK_TIMEOUT, GradingError, assert_close, grader, passed,
                               run_graded)
from minimegatron.mpu.layers import shard_weight
from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region,
                                       gather_from_tensor_model_parallel_region,
                                       reduce_from_tensor_model_parallel_region)
from minimegatron.mpu.state import ParallelState, initialize_model_parallel


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

TP = 2
S, B, H, OUT = 4, 3, 8, 6


def _as_callable(candidate: Any) -> Callable:
    if isinstance(candidate, type) and issubclass(candidate, torch.autograd.Function):
        return candidate.apply
    return candidate


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _run(fn: Callable, inputs: list[torch.Tensor], cotangent: torch.Tensor) -> dict[str, Any]:
    """Forward, the loss <y, cotangent>, backward; the output and every input's gradient."""
    leaves = [_leaf(t) for t in inputs]
    before = [t.detach().clone() for t in leaves]
    y = fn(*leaves)
    if not isinstance(y, torch.Tensor):
        return {"output": y}
    out = {"output": y.detach().clone()}
    if any(not torch.equal(a, b) for a, b in zip(before, leaves)):
        out["modified"] = True
        return out
    out["connected"] = y.requires_grad
    if y.shape == cotangent.shape and y.dtype == cotangent.dtype and y.requires_grad:
        (y * cotangent).sum().backward()
    out["grads"] = [None if t.grad is None else t.grad.clone() for t in leaves]
    return out


def _case(name: str, candidate: Callable, reference: Callable, make_inputs: Callable) -> dict:
    """On every rank: the same random data, the candidate and the reference, through forward and backward."""
    state = initialize_model_parallel(TP)
    g = torch.Generator().manual_seed(1)
    inputs, cotangent = make_inputs(state, g)
    return {"got": _run(lambda *a: candidate(*a, state), inputs, cotangent),
            "expected": _run(lambda *a: reference(*a, state), inputs, cotangent)}


def _grade(exercise: str, candidate: Any, reference: Callable, make_inputs: Callable,
           input_names: list[str], hints: dict[str, str], timeout: float) -> str:
    results = run_graded(_case, TP, exercise, _as_callable(candidate), reference, make_inputs, timeout=timeout)
    for rank, res in enumerate(results):
        got, expected = res["got"], res["expected"]
        where = f"{exercise}, rank {rank}"
        if got.get("modified"):
            raise GradingError(f"{where}: your code modified its input in place (e.g. dist.all_reduce(x)); "
                               "clone it first: x = x.clone()")
        assert_close(f"{where}, forward output ({hints['forward']})", got["output"], expected["output"])
        if not got["connected"]:
            raise GradingError(f"{where}: the output is not connected to the inputs' autograd graph "
                               "(no gradient flows back): did you use .detach(), .data or torch.no_grad()?")
        for name, g_got, g_exp in zip(input_names, got["grads"], expected["grads"]):
            if g_got is None:
                raise GradingError(f"{where}: no gradient reached {name} — is the backward returning it?")
            assert_close(f"{where}, backward: gradient of {name} ({hints['backward']})", g_got, g_exp)
    return passed(f"{exercise}: forward and backward match the reference on {TP} ranks")


def _replicated_x(state, g):
    x = torch.randn(S, B, H, generator=g)
    per_rank = torch.randn(TP, S, B, H, generator=g)[state.tp_rank]  # downstream differs per rank
    return [x], per_rank


def _per_rank_x(state, g):
    x = torch.randn(TP, S, B, H, generator=g)[state.tp_rank]  # each rank's partial result
    return [x], torch.randn(S, B, H, generator=g)               # downstream replicated


def _column_inputs(state, g):
    x, w, b = torch.randn(S, B, H, generator=g), torch.randn(OUT, H, generator=g), torch.randn(OUT, generator=g)
    r = state.tp_rank
    return [x, shard_weight(w, 0, r, TP), shard_weight(b, 0, r, TP)], torch.randn(S, B, OUT, generator=g)


def _row_inputs(state, g):
    x, w, b = torch.randn(S, B, H, generator=g), torch.randn(OUT, H, generator=g), torch.randn(OUT, generator=g)
    r = state.tp_rank
    return [shard_weight(x, -1, r, TP), shard_weight(w, 1, r, TP), b], torch.randn(S, B, OUT, generator=g)


def reference_column_parallel_linear(x, weight_shard, bias_shard, state):
    y = F.linear(copy_to_tensor_model_parallel_region(x, state), weight_shard, bias_shard)  # (…, out/tp)
    return gather_from_tensor_model_parallel_region(y, state)  # (…, out)


def reference_row_parallel_linear(x_shard, weight_shard, bias, state):
    return reduce_from_tensor_model_parallel_region(F.linear(x_shard, weight_shard), state) + bias


@grader
def grade_copy_to(candidate: Any, timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """01.1: f.apply(x, state) on 2 ranks; each rank's loss differs, so x.grad must be their sum."""
    return _grade("Exercise 01.1", candidate, copy_to_tensor_model_parallel_region, _replicated_x, ["x"],
                  {"forward": "f's forward is the identity",
                   "backward": "f's backward all-reduces: x fed every rank, so ∂L/∂x sums all ranks"},
                  timeout)


@grader
def grade_reduce_from(candidate: Any, timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """01.2: g.apply(x_r, state) on 2 ranks; the output must be Σ_r x_r, x_r.grad the replicated ∂L/∂y."""
    return _grade("Exercise 01.2", candidate, reduce_from_tensor_model_parallel_region, _per_rank_x, ["x"],
                  {"forward": "g's forward all-reduces (sums) the per-rank partial results",
                   "backward": "g's backward is the identity: ∂L/∂y is already the same on every rank"},
                  timeout)


@grader
def grade_column_parallel_linear(candidate: Callable, timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """01.3: the full output Y (…, out) on every rank, and gradients of x, W_i, b_i."""
    return _grade("Exercise 01.3", candidate, reference_column_parallel_linear, _column_inputs,
                  ["x", "weight_shard", "bias_shard"],
                  {"forward": "Y = [X·W_0ᵀ+b_0, X·W_1ᵀ+b_1] gathered along the last dim",
                   "backward": "x must enter through f so that its gradient is all-reduced"}, timeout)


@grader
def grade_row_parallel_linear(candidate: Callable, timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """01.4: Y = Σ_i X_i·W_iᵀ + b on every rank, and gradients of X_i, W_i and the bias."""
    return _grade("Exercise 01.4", candidate, reference_row_parallel_linear, _row_inputs,
                  ["x_shard", "weight_shard", "bias"],
                  {"forward": "all-reduce the partial products, then add the bias once",
                   "backward": "g's backward is the identity"}, timeout)
