"""Exercise 02: the parallel MLP and the fused QKV split.

02.1  parallel_mlp_forward(x, w1, b1, w2, b2, state) — Megatron's MLP on this rank's shards::

          Y = GeLU(X·A + b1)·B + b2,   A = [A_1 … A_p] by columns,   B = [B_1; …; B_p] by rows

      torch stores weights as (out, in), so rank r holds ``w1`` = rows r of W1 (ffn/tp, h), ``b1`` its
      (ffn/tp,) bias slice, ``w2`` = columns r of W2 (h, ffn/tp), and the full, replicated ``b2`` (h,).
      ``x`` (s, b, h) is the same on every rank. Return the full Y (s, b, h) on every rank, with correct
      gradients for x, w1, b1, w2 and b2. One f and one g: use ``copy_to_tensor_model_parallel_region``
      and ``reduce_from_tensor_model_parallel_region`` (imported below) and GPT-2's GeLU,
      ``F.gelu(·, approximate="tanh")``. Mind where b2 goes.

02.2  fused_qkv_rows(hidden_size, tp_rank, tp) — which rows of the fused ``query_key_value`` weight
      (3h, h) = [W_Q; W_K; W_V] does rank ``tp_rank`` hold, split column-parallel with stride 3?
      Return a 1-D LongTensor of row indices, in the order the rank stores them (3h/tp of them).

Grade with:  grade_parallel_mlp_forward(parallel_mlp_forward)    grade_fused_qkv_rows(fused_qkv_rows)
02.1 runs on 1 and 2 real ranks against ``minimegatron.layers.mlp.ParallelMLP``; 02.2 against
``minimegatron.mpu.layers.shard_weight`` and ``ParallelAttention``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F  # noqa: F401  (you will need it)

from exercises.grading import (MULTI_RANK_TIMEOUT, SINGLE_PROCESS_TIMEOUT, GradingError, assert_close,
                               call_candidate, grader, kind_of, passed, run_graded, run_isolated)
from minimegatron.config import gpt_config
from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region,  # noqa: F401
                                       reduce_from_tensor_model_parallel_region)
from minimegatron.mpu.state import ParallelState, initialize_model_parallel


def parallel_mlp_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                         b2: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Your code (02.1): f, X·w1ᵀ + b1, GeLU(tanh), ·w2ᵀ, g, + b2 -> (s, b, h) on every rank."""
    raise NotImplementedError("Exercise 02.1: implement the parallel MLP forward — f(x), the column "
                              "matmul with this rank's w1/b1, GeLU, the row matmul with w2, g, then b2")


def fused_qkv_rows(hidden_size: int, tp_rank: int, tp: int) -> torch.Tensor:
    """Your code (02.2): the row indices of [W_Q; W_K; W_V] (3h, h) that rank ``tp_rank`` holds."""
    raise NotImplementedError("Exercise 02.2: return the rows of the fused (3h, h) QKV weight this rank "
                              "holds under a stride-3 column split (its slice of Q, then of K, then of V)")


# --- grading -----------------------------------------------------------------------------------------

S, B, H = 6, 2, 16
CONFIG = gpt_config(hidden_size=H, num_attention_heads=4, num_layers=2)  # ffn = 4h = 64, bias, gelu tanh
NAMES = ["x", "w1", "b1", "w2", "b2"]


def package_parallel_mlp_forward(x, w1, b1, w2, b2, state):
    """The package's ParallelMLP, run on the given shards (what the grader compares against)."""
    from minimegatron.layers.mlp import ParallelMLP
    mlp = ParallelMLP(CONFIG, state)
    tensors = dict(zip([n for n, _ in mlp.named_parameters()], (w1, b1, w2, b2)))
    return torch.func.functional_call(mlp, tensors, (x,))  # the module's forward with these tensors


def _as_params(mlp) -> list[torch.Tensor]:
    return [mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias, mlp.dense_4h_to_h.weight,
            mlp.dense_4h_to_h.bias]


def _mlp_case(tp: int, candidate: Callable) -> dict[str, Any]:
    """On every rank: the same full weights (seeded), this rank's shards, candidate and reference."""
    from minimegatron.layers.mlp import ParallelMLP
    state = initialize_model_parallel(tp)
    torch.manual_seed(0)
    shards = [p.detach() for p in _as_params(ParallelMLP(CONFIG, state))]
    shards[0] = 15 * shards[0]  # pre-activations of order 1, where GeLU is curved
    gen = torch.Generator().manual_seed(1)
    shards[1] = 0.1 * torch.randn(4 * H, generator=gen).chunk(tp)[state.tp_rank]  # non-zero biases
    shards[3] = 0.1 * torch.randn(H, generator=gen)
    x = torch.randn(S, B, H, generator=gen)
    cotangent = torch.randn(tp, S, B, H, generator=gen)[state.tp_rank]  # each rank's own loss
    out = {}
    for who, fn in (("got", candidate), ("expected", package_parallel_mlp_forward)):
        leaves = [t.clone().requires_grad_() for t in [x] + shards]
        y = fn(*leaves, state)
        res = {"output": y.detach().clone() if isinstance(y, torch.Tensor) else y}
        if isinstance(y, torch.Tensor) and y.requires_grad and y.shape == cotangent.shape \
                and y.dtype == cotangent.dtype:
            (y * cotangent).sum().backward()
        res["grads"] = [None if t.grad is None else t.grad.clone() for t in leaves]
        out[who] = res
    return out


@grader
def grade_parallel_mlp_forward(candidate: Callable, timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """02.1 on 1 rank, then 2: output on every rank, then the gradient of every input."""
    hints = {"x": "x must enter the TP region through f (copy_to_...): its backward all-reduces ∂L/∂x",
             "w1": "∂L/∂w1 needs the GeLU'(·) of your column output and ∂L/∂Y flowing back through g",
             "b1": "b1 belongs to the column layer: add it before the GeLU",
             "w2": "∂L/∂w2 = GeLU(h)ᵀ·∂L/∂Y on this rank's slice",
             "b2": "b2 is replicated: add it once, after g"}
    for tp in (1, 2):
        results = run_graded(_mlp_case, tp, tp, candidate, timeout=timeout)
        for rank, res in enumerate(results):
            got, expected = res["got"], res["expected"]
            where = f"Exercise 02.1 at tp={tp}, rank {rank}"
            output = got["output"]
            if isinstance(output, torch.Tensor) and output.shape == expected["output"].shape \
                    and output.dtype == expected["output"].dtype:
                extra_bias = output - expected["output"]
                constant = torch.allclose(extra_bias, extra_bias[:1, :1].expand_as(extra_bias), atol=1e-5)
                if tp > 1 and constant and extra_bias.abs().max() > 1e-3:
                    raise GradingError(f"{where}: the output is off by a constant per feature — b2 was "
                                       f"added {tp} times; add it once, after the all-reduce (g)")
            assert_close(f"{where}, forward output Y = GeLU_tanh(X·A + b1)·B + b2", got["output"],
                         expected["output"], rtol=1e-5, atol=1e-5)
            for name, g_got, g_exp in zip(NAMES, got["grads"], expected["grads"]):
                if g_got is None:
                    raise GradingError(f"{where}: no gradient reached {name} — is it part of the "
                                       "computation, without .detach() or torch.no_grad()?")
                assert_close(f"{where}, gradient of {name} ({hints[name]})", g_got, g_exp,
                             rtol=1e-5, atol=1e-5)
    return passed("Exercise 02.1: the parallel MLP matches ParallelMLP on 1 and 2 ranks, "
                  "forward and backward")


@grader
def grade_fused_qkv_rows(candidate: Callable[[int, int, int], torch.Tensor],
                         timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """02.2 for several (h, tp): the rows each rank's stride-3 shard of [W_Q; W_K; W_V] holds.

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    from minimegatron.layers.attention import ParallelAttention  # noqa: F401  (imported once, here)
    return run_isolated(_grade_fused_qkv_rows, candidate, timeout=timeout, role="fused_qkv_rows")


def _row_indices(where: str, candidate: Callable, h: int, rank: int, tp: int) -> torch.Tensor:
    """The candidate's answer as a 1-D LongTensor, or a GradingError saying what it returned instead."""
    got = call_candidate(where, candidate, h, rank, tp, exercise="Exercise 02.2")
    if got is None or isinstance(got, (str, bytes, dict)):
        raise GradingError(f"{where}: expected a 1-D LongTensor of row indices, got {kind_of(got)}")
    try:
        rows = torch.as_tensor(got)
    except Exception:  # noqa: BLE001 - not a sequence of numbers
        raise GradingError(f"{where}: expected a 1-D LongTensor of row indices, got {kind_of(got)}") from None
    if rows.is_complex() or rows.dtype == torch.bool or \
            (rows.is_floating_point() and not bool((rows == rows.round()).all())):
        raise GradingError(f"{where}: expected integer row indices, got {kind_of(rows)}")
    return rows.long()


def _grade_fused_qkv_rows(candidate: Callable) -> str:
    from minimegatron.layers.attention import ParallelAttention
    from minimegatron.mpu.layers import shard_weight
    for h, tp in ((8, 1), (8, 2), (12, 3), (16, 4)):
        full = torch.arange(3 * h)
        for rank in range(tp):
            expected = shard_weight(full, 0, rank, tp, stride=3)
            where = f"Exercise 02.2 (hidden_size={h}, tp={tp}, rank {rank})"
            got = _row_indices(where, candidate, h, rank, tp)
            block = 3 * h // tp
            contiguous = rank * block + torch.arange(block)
            if tp > 1 and got.numel() == block and torch.equal(got, contiguous):
                raise GradingError(f"{where}: you took one contiguous block of 3h/tp rows; with stride 3 "
                                   "each rank takes its 1/tp of Q, of K and of V (three blocks)")
            assert_close(f"{where}, row indices", got, expected)
    # and the package's attention layer really holds those rows
    config = gpt_config(hidden_size=8, num_attention_heads=2, num_layers=1)
    torch.manual_seed(0)
    full_weight = ParallelAttention(config).query_key_value.weight.detach()
    for rank in range(2):
        torch.manual_seed(0)
        shard = ParallelAttention(config, ParallelState(tp=2, rank=rank)).query_key_value.weight.detach()
        where = f"Exercise 02.2 (hidden_size=8, tp=2, rank {rank})"
        assert_close(f"Exercise 02.2: ParallelAttention's shard on rank {rank}",
                     full_weight[_row_indices(where, candidate, 8, rank, 2)], shard)
    return passed("Exercise 02.2: the stride-3 rows match shard_weight and ParallelAttention's shards")
