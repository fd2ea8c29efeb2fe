"""Exercise 11: checkpoints — reshaping tensor-parallel shards.

11.1  reshard — turn the shards of one weight saved at TP size ``len(shards)`` into its shards at TP
      size ``new_tp``, without any communication (this is what "save at TP=2, load at TP=4" does).

Rank r of tp ranks holds ``shard_weight(full, dim, r, tp, stride)``: the weight's ``dim`` is cut into
``stride`` equal blocks (fused weights: [W_Q; W_K; W_V] has stride 3, [W_gate; W_up] stride 2) and the
rank keeps its 1/tp of every block, concatenated. So rank r's shard is ``stride`` pieces, one per
block. Rebuild the full weight block by block, then cut it again for ``new_tp``.

Example (dim 0, stride 2, tp 2 -> 1): shards [g0; u0] and [g1; u1] -> [[g0; g1; u0; u1]].

Grade it with:  grade_reshard(reshard)
The reference is minimegatron.mpu.layers.shard_weight (the grader cuts a known full weight both ways).
"""
from __future__ import annotations

from typing import Callable

import torch

from exercises import _ex11_mistakes as M
from exercises.grading import GradingError, assert_close, call_candidate, grader, kind_of, passed, run_isolated

TIMEOUT = 10.0  # s: eight small weights in one process
from minimegatron.mpu.layers import shard_weight


def reshard(shards: list[torch.Tensor], dim: int, stride: int, new_tp: int) -> list[torch.Tensor]:
    """Your code: the ``new_tp`` shards of the weight whose ``len(shards)`` shards are given."""
    # Hint: each shard is `stride` pieces along `dim` (shard.chunk(stride, dim)); block i of the full
    # weight is the concatenation over ranks of their piece i. Then cut each block into new_tp parts
    # and give rank r part r of every block.
    raise NotImplementedError("Exercise 11.1: implement reshard — undo the per-block split of the old "
                              "TP size, then split every block again for new_tp")


CASES = [  # (name, full shape, dim, stride, old tp, new tp)
    ("column-parallel, TP 2 -> 1", (8, 6), 0, 1, 2, 1),
    ("row-parallel (dim 1), TP 1 -> 2", (6, 8), 1, 1, 1, 2),
    ("row-parallel (dim 1), TP 2 -> 4", (6, 8), 1, 1, 2, 4),
    ("SwiGLU [gate; up] stride 2, TP 2 -> 1", (16, 4), 0, 2, 2, 1),
    ("SwiGLU [gate; up] stride 2, TP 4 -> 2", (16, 4), 0, 2, 4, 2),
    ("fused [Q; K; V] stride 3, TP 2 -> 4", (24, 4), 0, 3, 2, 4),
    ("fused [Q; K; V] stride 3, TP 4 -> 4 (unchanged)", (24, 4), 0, 3, 4, 4),
    ("a bias (1-D) with stride 3, TP 1 -> 2", (12,), 0, 3, 1, 2),
]


@grader
def grade_reshard(candidate: Callable[..., list[torch.Tensor]],
                  timeout: float = TIMEOUT) -> str:
    """Cut a known weight at the old TP size, reshard with ``candidate``, compare with the cut at the new.

    Returns "✓ ..." (and prints it); raises GradingError naming the case, the rank and the difference.
    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError too."""
    return run_isolated(_grade_reshard, candidate, timeout=timeout, role="reshard")


def _equal(got: list, expected: list) -> bool:
    return all(isinstance(g, torch.Tensor) and g.shape == e.shape and torch.equal(g, e) for g, e in zip(got, expected))


def _grade_reshard(candidate: Callable) -> str:
    wrong = []  # (where, shards, dim, stride, new, got, expected): named by the pattern of all of them
    for name, shape, dim, stride, old, new in CASES:
        full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
        shards = [shard_weight(full, dim, r, old, stride) for r in range(old)]
        expected = [shard_weight(full, dim, r, new, stride) for r in range(new)]
        where = f"Exercise 11.1, case '{name}' (full {shape}, dim {dim}, stride {stride})"
        got = call_candidate(where, candidate, [s.clone() for s in shards], dim, stride, new,
                             exercise="Exercise 11.1")
        if not isinstance(got, (list, tuple)):
            raise GradingError(f"{where}: got {kind_of(got)}, expected a list of new_tp = {new} tensors")
        if len(got) != new:
            raise GradingError(f"{where}: got {len(got)} shards, expected a list of new_tp = {new}")
        if not _equal(got, expected):
            wrong.append((where, shards, dim, stride, new, list(got), expected))
    if not wrong:
        return passed(f"Exercise 11.1: reshard matches shard_weight on {len(CASES)} cases (strides 1, 2, 3; "
                      "TP sizes up and down)")
    for switches, message in M.MODELS:
        try:
            if all(_equal(got, M.reshard([t.clone() for t in shards], dim, stride, new, **switches))
                   for _, shards, dim, stride, new, got, _ in wrong):
                raise GradingError(f"{wrong[0][0]}: {message}")
        except RuntimeError:  # the mistake does not apply to some case's shapes
            continue
    where, _, _, stride, _, got, expected = wrong[0]
    for r, (g, e) in enumerate(zip(got, expected)):
        hint = "" if stride == 1 else (f" (with stride {stride}, a shard is {stride} pieces — one per block "
                                       f"— not one contiguous slice of the full weight)")
        try:
            assert_close(f"{where}: new rank {r}'s shard", g, e, rtol=0, atol=0)
        except GradingError as err:
            raise GradingError(f"{err}{hint}") from None
    raise GradingError(f"{where}: wrong shards")
