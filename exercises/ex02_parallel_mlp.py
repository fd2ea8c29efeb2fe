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
02.1 runs on 4 real ranks (two TP groups of 2, each with its own weights) against the MLP computed on one
device, naming the usual mistakes (``_ex02_checks.py``); 02.2 against ``minimegatron.mpu.layers.shard_weight``
and ``ParallelAttention``. Submitting the package's own code is refused.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: F401  (you will need it)

from exercises import _ex02_checks as C
from exercises.battery import each_candidate, refuse_reference, verdicts
from exercises.grading import (SINGLE_PROCESS_TIMEOUT, GradingError, assert_close, call_candidate, grader,
                               kind_of, passed, run_graded, run_isolated)
from minimegatron.config import gpt_config
from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region,  # noqa: F401
                                       reduce_from_tensor_model_parallel_region)
from minimegatron.mpu.state import ParallelState


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

TIMEOUT = 15.0  # s: four ranks, a 16 → 64 → 16 MLP — a hang is reported well before a minute
S, B, H = C.S, C.B, C.H
CONFIG = gpt_config(hidden_size=H, num_attention_heads=4, num_layers=2)  # ffn = 4h = 64, bias, gelu tanh


def package_parallel_mlp_forward(x, w1, b1, w2, b2, state):
    """The package's ParallelMLP, run on the given shards."""
    from minimegatron.layers.mlp import ParallelMLP
    mlp = ParallelMLP(CONFIG, state)
    tensors = dict(zip([n for n, _ in mlp.named_parameters()], (w1, b1, w2, b2)))
    return torch.func.functional_call(mlp, tensors, (x,))  # the module's forward with these tensors


def battery_verdicts(candidates: Sequence[Callable], timeout: float = TIMEOUT) -> list[str]:
    """02.1 for many candidates in ONE launch (the tests' batteries): "✓ ..." or the message, for each."""
    out: list[str | None] = []
    for c in candidates:
        try:
            refuse_reference("Exercise 02.1", c, package_parallel_mlp_forward)
            out.append(None)
        except GradingError as err:
            out.append(str(err))
    run = [c for c, o in zip(candidates, out) if o is None]
    per_rank = run_graded(each_candidate, C.WORLD, C.rank_case, run, catch=True, timeout=timeout) if run else [[]]
    judged = iter(verdicts(lambda results: C.judge(results) or _PASSED, per_rank))
    return [o if o is not None else next(judged) for o in out]


_PASSED = (f"✓ Exercise 02.1: the parallel MLP matches the MLP on one device, forward and backward, on {C.WORLD} "
           f"ranks (two TP groups of {C.TP})")


@grader
def grade_parallel_mlp_forward(candidate: Callable, timeout: float = TIMEOUT) -> str:
    """02.1 on 4 ranks (two TP groups of 2): output on every rank, then the gradient of every input."""
    refuse_reference("Exercise 02.1", candidate, package_parallel_mlp_forward)
    per_rank = run_graded(each_candidate, C.WORLD, C.rank_case, [candidate], timeout=timeout)
    C.judge([results[0][1] for results in per_rank])
    return passed(_PASSED[2:])


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
            if not torch.equal(got, expected):
                for rows, message in C.qkv_mistakes(h, rank, tp):
                    if rows is not None and torch.equal(got, rows):
                        raise GradingError(f"{where}: {message}")
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
