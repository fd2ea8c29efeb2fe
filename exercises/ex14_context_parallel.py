"""Exercise 14: context parallelism — the log-sum-exp merge and one step of zig-zag ring attention.

Context parallelism splits every sequence over ``cp`` ranks (``minimegatron/mpu/context_parallel.py``);
ring attention (``minimegatron/mpu/ring_attention.py``) makes attention whole again: the k/v blocks
travel round the ring, and at each step a rank attends with its queries to the block that has just
arrived and folds that partial result into a running one. Layouts (MHA, float32 throughout)::

    q, k_block, v_block, o   (b, n, L, d)    L = seq_len/cp local tokens, d the head size
    lse                      (b, n, L)       log Σ_k exp(score) over the keys seen so far
    score                    q·kᵀ/√d

14.1  merge_partial(o_a, lse_a, o_b, lse_b) -> (o, lse)
      Two partial results over DISJOINT sets of keys — o_x = softmax(S_x)·V_x and lse_x = log Σ exp(S_x)
      per query (o_x (..., L, d), lse_x (..., L)) — give the result over the union::

          lse = log(exp(lse_a) + exp(lse_b))
          o   = exp(lse_a - lse)·o_a + exp(lse_b - lse)·o_b

      Written like this it overflows: exp(89) is already inf in float32, and scores in the hundreds
      are ordinary. Subtract the max first, or use torch.logaddexp. A side that has seen no keys
      yet has lse = -inf and o = 0: its weight must come out 0.

14.2  ring_step(q, k_block, v_block, o, lse, my_rank, source_rank, cp) -> (o, lse)
      One step on rank i = my_rank. Zig-zag: the sequence is cut into 2·cp chunks of c = L/2 tokens
      and rank r holds chunks r and 2cp-1-r, in that order: q = [q0 | q1] (chunks i, 2cp-1-i), and
      the block that arrived from rank j = source_rank is [k0 | k1] (chunks j, 2cp-1-j). Causal::

          j == i   all of q × the whole block, with the causal mask (the L local tokens are in order)
          j <  i   all of q × the block's first half (k0, v0), no mask
          j >  i   the second half q1 × the whole block, no mask (q0 comes before all of it)

      Attend, merge the partial result into the running (o, lse) of the rows it reaches (with your
      merge_partial) and return the whole (o, lse), other rows unchanged. A rank that starts from
      o = 0, lse = -inf and runs the cp steps j = i, i-1, ... (mod cp) holds the causal attention of
      its tokens over the whole sequence — the grader checks that too.

14.3  zigzag_positions(seq_len, rank, cp) -> the global positions (int64, shape (seq_len/cp,),
      increasing) of the tokens rank ``rank`` holds: chunks rank and 2cp-1-rank of the 2·cp chunks.
      cp = 2, seq_len = 8: rank 0 -> [0, 1, 6, 7], rank 1 -> [2, 3, 4, 5].

Grade with:  grade_merge_partial(merge_partial)     grade_ring_step(ring_step)
             grade_zigzag_positions(zigzag_positions)
Each runs in one separate process (no ranks): 14.1 against ``ring_attention.merge_partial`` on random,
large (overflowing) and half-empty partials; 14.2 against a step made of ``ring_schedule``,
``attention_block`` and ``merge_partial`` for every (my_rank, source_rank) of cp = 2, 3, 4, then whole
rings against the dense causal attention (``kernels.scaled_dot_product_attention``); 14.3 against
``context_parallel_index``. Each names the usual mistakes (``exercises/_ex14_mistakes.py``).
"""
from __future__ import annotations

from typing import Callable

import torch

from exercises import _ex14_mistakes as M
from exercises.grading import (SINGLE_PROCESS_TIMEOUT, GradingError, assert_close, call_candidate, grader,
                               passed, run_isolated)


def merge_partial(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Your code (14.1): the log-sum-exp merge of two partial attention results over disjoint keys."""
    # Hint: the weights exp(lse_x - lse) have the shape of lse: .unsqueeze(-1) before scaling o_x.
    raise NotImplementedError("Exercise 14.1: merge the partials — lse = log(e^lse_a + e^lse_b) computed "
                              "stably (the max first, or torch.logaddexp), o = Σ exp(lse_x - lse)·o_x")


def ring_step(q: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, my_rank: int, source_rank: int, cp: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Your code (14.2): attend to the block of ``source_rank`` by the zig-zag rule, merge into (o, lse)."""
    # Hint: half = q.size(-2) // 2; pick q's rows and the block's keys from the table; the causal mask
    # is torch.ones(L, L, dtype=torch.bool).triu(1) (True = hidden); lse_b = torch.logsumexp(scores, -1).
    raise NotImplementedError("Exercise 14.2: one ring step — j == i causal, j < i all queries × the "
                              "block's first half, j > i the second half of the queries × the whole block; "
                              "then merge_partial into the rows reached")


def zigzag_positions(seq_len: int, rank: int, cp: int) -> torch.Tensor:
    """Your code (14.3): the global positions of the tokens ``rank`` holds under the zig-zag split."""
    raise NotImplementedError("Exercise 14.3: torch.cat of the positions of chunk rank and chunk "
                              "2·cp-1-rank, each seq_len/(2·cp) tokens long")


# --- grading -----------------------------------------------------------------------------------------

B, N, C, D = 1, 2, 2, 8  # batch, heads, tokens per chunk (L = 2C local tokens), head size


def package_merge_partial(o_a, lse_a, o_b, lse_b):
    """The package's merge (``ring_attention.merge_partial``)."""
    from minimegatron.mpu.ring_attention import merge_partial as merge
    return merge(o_a, lse_a, o_b, lse_b)


def package_ring_step(q, k_block, v_block, o, lse, my_rank, source_rank, cp):
    """One step made of the package's pieces: ``ring_schedule`` says which rows, keys and mask."""
    from minimegatron.mpu.ring_attention import attention_block, ring_schedule
    step = next(st for st in ring_schedule(my_rank, cp) if st.source == source_rank)
    half = q.size(-2) // 2
    rows = slice(half, None) if step.q == "second" else slice(None)
    keys = slice(None, half) if step.kv == "first" else slice(None)
    o_b, lse_b = attention_block(q[..., rows, :].unsqueeze(2), k_block[..., keys, :], v_block[..., keys, :],
                                 step.causal, q.size(-1) ** -0.5)  # (b, n, 1, rows, d): one head group
    o, lse = o.clone(), lse.clone()
    o[..., rows, :], lse[..., rows] = package_merge_partial(o[..., rows, :], lse[..., rows],
                                                            o_b.squeeze(2), lse_b.squeeze(2))
    return o, lse


def package_zigzag_positions(seq_len, rank, cp):
    """The package's split (``context_parallel.context_parallel_index``)."""
    from minimegatron.mpu.context_parallel import context_parallel_index
    return context_parallel_index(seq_len, rank, cp)


@grader
def grade_merge_partial(candidate: Callable, timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """14.1: ``candidate(o_a, lse_a, o_b, lse_b)`` against the package's merge on random, large and
    half-empty partials. Runs in a separate process: an exception or an endless loop (``timeout`` s)
    is reported as a GradingError."""
    import minimegatron.mpu.ring_attention  # noqa: F401  (imported once here, not in the grading process)
    return run_isolated(_grade_merge_partial, candidate, timeout=timeout, role="merge_partial")


def _grade_merge_partial(candidate: Callable) -> str:
    g = torch.Generator().manual_seed(14)
    for case, (what, _, hint) in enumerate(M.MERGE_CASES):
        inputs = M.merge_inputs(case, g)
        where = f"Exercise 14.1 merge_partial, {what}"
        got = call_candidate(where, candidate, *(t.clone() for t in inputs), exercise="Exercise 14.1")
        M.judge(where, got, package_merge_partial(*inputs), M.merge_mistakes(*inputs), hint)
    return passed("Exercise 14.1: merge_partial matches the log-sum-exp merge on random, large (no "
                  "overflow) and half-empty partials")


@grader
def grade_ring_step(candidate: Callable, timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """14.2: every (my_rank, source_rank) of cp = 2, 3, 4 against the package's step, then large
    scores, then whole rings against the dense causal attention. Runs in a separate process: an
    exception or an endless loop (``timeout`` s) is reported as a GradingError."""
    import minimegatron.kernels  # noqa: F401  (imported once here, not in the grading process)
    import minimegatron.mpu.context_parallel  # noqa: F401
    return run_isolated(_grade_ring_step, candidate, timeout=timeout, role="ring_step")


def _grade_ring_step(candidate: Callable) -> str:
    g = torch.Generator().manual_seed(14)
    for scale, cps in ((1.0, (2, 3, 4)), (100.0, (4,))):
        for cp in cps:
            for i in range(cp):
                for j in ((i - t) % cp for t in range(cp)):  # the ring's order: the own block first
                    q, k, v = (torch.randn(B, N, 2 * C, D, generator=g) for _ in range(3))
                    q = q * scale
                    o, lse = M.attend(q, *(torch.randn(B, N, 3, D, generator=g) for _ in range(2)))
                    where = (f"Exercise 14.2 ring_step(my_rank={i}, source_rank={j}, cp={cp}), "
                             f"{M.kind(i, j)}, {'large' if scale > 1 else 'random'} scores")
                    got = call_candidate(where, candidate, q.clone(), k.clone(), v.clone(), o.clone(),
                                         lse.clone(), i, j, cp, exercise="Exercise 14.2")
                    M.judge(where, got, package_ring_step(q, k, v, o, lse, i, j, cp),
                            M.step_mistakes(q, k, v, o, lse, i, j), M.STEP_HINTS[scale], M.SHAPE_HINT)
    for cp, scale in ((2, 1.0), (4, 1.0), (4, 100.0)):
        _whole_ring(candidate, cp, scale, g)
    return passed("Exercise 14.2: ring_step matches the package on every (my_rank, source_rank) of cp = 2, "
                  "3, 4, and whole rings give the dense causal attention")


def _whole_ring(candidate: Callable, cp: int, scale: float, g: torch.Generator) -> None:
    """Every rank from o = 0, lse = -inf through its cp steps: the dense causal attention at its tokens."""
    from minimegatron.kernels import scaled_dot_product_attention
    from minimegatron.mpu.context_parallel import context_parallel_index

    s = 2 * C * cp
    q, k, v = (torch.randn(B, N, s, D, generator=g) for _ in range(3))
    q = q * scale
    dense = scaled_dot_product_attention(q, k, v, causal=True, fused=False)  # (b, n, s, d)
    scores = torch.einsum("bnqd,bnkd->bnqk", q, k) * D ** -0.5
    dense_lse = torch.logsumexp(scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -M.INF), -1)
    for i in range(cp):
        def mine(t, r=i, dim=-2):  # rank r's tokens of a whole-sequence tensor
            return t.index_select(dim, context_parallel_index(s, r, cp))

        o, lse = torch.zeros(B, N, 2 * C, D), torch.full((B, N, 2 * C), -M.INF)
        order = [(i - t) % cp for t in range(cp)]
        where = (f"Exercise 14.2, the whole ring on rank {i} of cp={cp} ({'large' if scale > 1 else 'random'}"
                 f" scores): from o = 0, lse = -inf, ring_step with source_rank = {order}")
        for j in order:
            got = call_candidate(where, candidate, mine(q), mine(k, j), mine(v, j), o, lse, i, j, cp,
                                 exercise="Exercise 14.2")
            o, lse = M.as_pair(where, got, (o, lse), M.SHAPE_HINT)
        M.judge(f"{where}, against the dense causal attention of the whole sequence at this rank's "
                "positions", (o, lse), (mine(dense), mine(dense_lse, dim=-1)), [], M.START_HINT, M.SHAPE_HINT)


@grader
def grade_zigzag_positions(candidate: Callable, timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """14.3: every rank of several (seq_len, cp) against ``context_parallel_index``. Runs in a separate
    process: an exception or an endless loop (``timeout`` s) is reported as a GradingError."""
    import minimegatron.mpu.context_parallel  # noqa: F401  (imported once here, not in the grading process)
    return run_isolated(_grade_zigzag_positions, candidate, timeout=timeout, role="zigzag_positions")


def _grade_zigzag_positions(candidate: Callable) -> str:
    for seq_len, cp in ((8, 2), (16, 4), (24, 3), (40, 4), (6, 1)):
        for r in range(cp):
            where = f"Exercise 14.3 zigzag_positions(seq_len={seq_len}, rank={r}, cp={cp})"
            got = call_candidate(where, candidate, seq_len, r, cp, exercise="Exercise 14.3")
            expected = package_zigzag_positions(seq_len, r, cp)
            if isinstance(got, torch.Tensor) and not torch.equal(got, expected):
                for model, message in M.position_mistakes(seq_len, r, cp):
                    if got.shape == model.shape and torch.equal(got.long(), model):
                        raise GradingError(f"{where}: got {got.tolist()}, expected {expected.tolist()} — "
                                           f"{message}")
            assert_close(f"{where}, positions (int64, as torch.arange gives)", got, expected)
    return passed("Exercise 14.3: zigzag_positions matches context_parallel_index for cp = 1, 2, 3, 4")
