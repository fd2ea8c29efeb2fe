"""Exercise 03: vocab-parallel embedding and cross-entropy.

The vocabulary V is split over the TP ranks: rank i holds rows [vocab_start_index, vocab_end_index)
of the embedding table, and the same columns of the logits.

03.1  vocab_parallel_embedding_forward(input_ids, weight_shard, vocab_start_index, vocab_end_index,
      state) — look up the ids this rank owns (shifted to local rows), write zeros for the others,
      and sum over the TP group with g (``minimegatron.mpu.reduce_from_tensor_model_parallel_region``).
      (b, s) ids → (b, s, h), the same on every rank; weight_shard's gradient must be right too.
03.2  vocab_parallel_cross_entropy_forward(logits_shard, target, state) — per-token loss (…) from
      this rank's logit columns (…, V/tp) and the full targets (…), equal to
      F.cross_entropy(full_logits, target, reduction="none") — WITHOUT gathering the logits: only
      all-reduces of per-token tensors (…,) over ``state.tp_group`` are allowed, and it must stay
      exact for logits of size 1e4 (no overflow of exp). loss_t = log Σ_v exp(z_v) − z_target: which
      pieces of that can each rank compute from its own columns, and how do they combine?
      Forward only: no autograd needed. No padding and no ignore_index here (the package handles both).

Grade with:  grade_vocab_parallel_embedding(vocab_parallel_embedding_forward)
             grade_vocab_parallel_cross_entropy(vocab_parallel_cross_entropy_forward)
Graded on 4 ranks (two TP groups of 2, each with its own data) against the single-device computation
(table[ids], F.cross_entropy), naming the usual mistakes (``_ex03_checks.py``). The package's versions
are minimegatron/mpu/embedding.py (VocabParallelEmbedding) and mpu/cross_entropy.py: submitting them is
refused.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist  # noqa: F401  (you will need it)
import torch.nn.functional as F

from exercises import _ex03_checks as C
from exercises.battery import each_candidate, refuse_reference, verdicts
from exercises.grading import GradingError, grader, passed, run_graded
from minimegatron.mpu import cross_entropy as _cross_entropy
from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from minimegatron.mpu.mappings import reduce_from_tensor_model_parallel_region
from minimegatron.mpu.state import ParallelState


def vocab_parallel_embedding_forward(input_ids: torch.Tensor, weight_shard: torch.Tensor,
                                     vocab_start_index: int, vocab_end_index: int,
                                     state: ParallelState) -> torch.Tensor:
    """Your code (03.1): masked lookup in this rank's rows, then g (all-reduce). (b, s) → (b, s, h)."""
    # Hint: an id outside [vocab_start_index, vocab_end_index) must not index weight_shard (it can be
    # out of range, or negative once shifted). What should this rank contribute for it, so that the sum
    # over ranks is the right row? The sum is g: its backward must leave weight_shard's gradient right.
    raise NotImplementedError("Exercise 03.1: implement the vocab-parallel embedding lookup (the "
                              "contract is in the module docstring)")


def vocab_parallel_cross_entropy_forward(logits_shard: torch.Tensor, target: torch.Tensor,
                                         state: ParallelState) -> torch.Tensor:
    """Your code (03.2): per-token loss (…) from logits (…, V/tp), all-reduces of (…,) only, no gather."""
    # Hint: this rank's columns are [r·V/tp, (r+1)·V/tp), r = state.tp_rank; pass group=state.tp_group
    # to every dist.all_reduce; work in float32 on clones (never modify logits_shard in place).
    raise NotImplementedError("Exercise 03.2: implement the vocab-parallel cross-entropy forward (the "
                              "contract is in the module docstring)")


# --- grading -----------------------------------------------------------------------------------------

TIMEOUT = 15.0  # s: four ranks, a table of 20 rows — a hang is reported well before a minute


def reference_embedding_forward(input_ids, weight_shard, vocab_start_index, vocab_end_index, state):
    outside = (input_ids < vocab_start_index) | (input_ids >= vocab_end_index)  # (b, s)
    local = (input_ids - vocab_start_index).masked_fill(outside, 0)
    out = F.embedding(local, weight_shard).masked_fill(outside.unsqueeze(-1), 0.0)  # (b, s, h)
    return reduce_from_tensor_model_parallel_region(out, state)


REFERENCES = {"03.1": (reference_embedding_forward,),
              "03.2": (vocab_parallel_cross_entropy, _cross_entropy._VocabParallelCrossEntropy)}
PASSED = {"03.1": "the vocab-parallel embedding and its gradient match table[ids]",
          "03.2": "the vocab-parallel cross-entropy matches F.cross_entropy, also for huge logits"}


def battery_verdicts(cases: Sequence[tuple[str, Any]], timeout: float = TIMEOUT) -> list[str]:
    """Grade many (part, candidate) pairs ("03.1" / "03.2") in ONE launch (the tests' batteries): for
    each, "✓ ..." or the message its grading raises. Only for candidates that behave alike on every rank."""
    out: list[str | None] = []
    for part, c in cases:
        try:
            refuse_reference(f"Exercise {part}", c, *REFERENCES[part])
            out.append(None)
        except GradingError as err:
            out.append(str(err))
    run = [(part, c) for (part, c), o in zip(cases, out) if o is None]
    per_rank = run_graded(each_candidate, C.WORLD, C.rank_case, run, catch=True, timeout=timeout) if run else [[]]
    judged = iter(verdicts(_judged, per_rank))
    return [o if o is not None else next(judged) for o in out]


def _judged(results: list[dict]) -> str:
    part = results[0]["part"]
    C.judge(part, results)
    return f"✓ Exercise {part}: {PASSED[part]} on {C.WORLD} ranks (two TP groups of {C.TP})"


def _grade(part: str, candidate: Any, timeout: float) -> str:
    refuse_reference(f"Exercise {part}", candidate, *REFERENCES[part])
    per_rank = run_graded(each_candidate, C.WORLD, C.rank_case, [(part, candidate)], timeout=timeout)
    return passed(_judged([results[0][1] for results in per_rank])[2:])


@grader
def grade_vocab_parallel_embedding(candidate: Callable, timeout: float = TIMEOUT) -> str:
    """03.1 on 4 ranks: the output (b, s, h) and the gradient of each rank's weight shard."""
    return _grade("03.1", candidate, timeout)


@grader
def grade_vocab_parallel_cross_entropy(candidate: Callable, timeout: float = TIMEOUT) -> str:
    """03.2 on 4 ranks: the per-token loss equals F.cross_entropy, also for huge logits; no gathers."""
    return _grade("03.2", candidate, timeout)
