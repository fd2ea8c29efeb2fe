"""Exercise 14's grader internals: the usual mistakes, each as the result it gives, and its message.

A grader computes the right result with the package, and when the candidate's differs, the result
of every mistake listed here on the same inputs: the first one the candidate matches is named, so a
student reads "the weights are swapped" instead of only "wrong values". Nothing here is the exercise
(``ex14_context_parallel.py``); it is kept apart to keep that file short.
"""
from __future__ import annotations

from typing import Any

import torch

from exercises.grading import GradingError, assert_close, kind_of

TOL = 1e-5
INF = float("inf")


def attend(q, k, v, visible=None):
    """Plain attention of q (b, n, sq, d) over k/v (b, n, sk, d): (o, lse); ``visible`` (sq, sk) bool."""
    s = torch.einsum("bnqd,bnkd->bnqk", q, k) * q.size(-1) ** -0.5
    if visible is not None:
        s = s.masked_fill(~visible, -INF)
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bnqk,bnkd->bnqd", torch.exp(s - lse.unsqueeze(-1)), v), lse


def close(got: Any, expected: torch.Tensor, tol: float = TOL) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype
            and torch.allclose(got, expected, rtol=tol, atol=tol))


def tolerance(lse: torch.Tensor) -> float:
    """TOL, and more for large scores: every correct merge rounds exp(lse_x - lse) differently, by
    about float32's eps·|lse| (1e-7·|lse|, relative)."""
    finite = lse[torch.isfinite(lse)]
    return TOL + 1e-6 * (float(finite.abs().max()) if finite.numel() else 0.0)


def as_pair(where: str, got: Any, expected: tuple, shape_hint: str = "") -> tuple:
    """The candidate's (o, lse), or the GradingError that says what came back instead."""
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise GradingError(f"{where}: expected a tuple (o, lse) of two tensors, got {kind_of(got)}")
    for name, g, e in zip(("o", "lse"), got, expected):
        if not (isinstance(g, torch.Tensor) and g.shape == e.shape and g.dtype == e.dtype):
            try:
                assert_close(f"{where}, {name}", g, e)  # names the type, shape or dtype
            except GradingError as err:
                raise GradingError(f"{err}{shape_hint}") from None
    return tuple(got)


def judge(where: str, got: Any, expected: tuple, mistakes: list, nonfinite: str,
          shape_hint: str = "") -> None:
    """Raise the GradingError that names what is wrong with the candidate's (o, lse), if anything.
    ``mistakes``: ((o or None, lse or None), message) — None matches anything."""
    got, tol = as_pair(where, got, expected, shape_hint), tolerance(expected[1])
    if all(close(g, e, tol) for g, e in zip(got, expected)):
        return
    if not all(bool(torch.isfinite(g).all()) for g in got):
        raise GradingError(f"{where}: inf/nan in your (o, lse) where the result is finite — {nonfinite}")
    for model, message in mistakes:
        if all(m is None or close(g, m, tol) for g, m in zip(got, model)):
            raise GradingError(f"{where}: {message}")
    for name, g, e in zip(("lse", "o"), got[::-1], expected[::-1]):
        assert_close(f"{where}, {name}", g, e, rtol=tol, atol=tol)


# --- 14.1 --------------------------------------------------------------------------------------------

MAX_HINT = ("exp(lse) overflows float32 past lse ≈ 88: subtract the max first — m = torch.maximum(lse_a, "
            "lse_b), lse = m + log(exp(lse_a - m) + exp(lse_b - m)) — or use torch.logaddexp(lse_a, lse_b)")
MERGE_CASES = (  # (what, score scale, what to do when the result is inf/nan)
    ("random partials", 1.0, "compute lse = torch.logaddexp(lse_a, lse_b), the weights exp(lse_x - lse)"),
    ("large scores (lse in the hundreds)", 100.0, MAX_HINT),
    ("queries with no keys on one side (lse = -inf, o = 0)", 1.0,
     "a side with no keys must get the weight exp(-inf - lse) = 0; -inf - (-inf) is nan: shift by the "
     "max of the two lse (finite here) or use torch.logaddexp"))


def merge_inputs(case: int, g: torch.Generator) -> list[torch.Tensor]:
    """(o_a, lse_a, o_b, lse_b): attention of 5 queries over keys 0-2 and over keys 3-6."""
    q = torch.randn(2, 2, 5, 4, generator=g) * MERGE_CASES[case][1]
    k, v = torch.randn(2, 2, 7, 4, generator=g), torch.randn(2, 2, 7, 4, generator=g)
    out = [*attend(q, k[..., :3, :], v[..., :3, :]), *attend(q, k[..., 3:, :], v[..., 3:, :])]
    if case == 2:  # query 0 saw no key of side a, query 3 none of side b
        out[0][..., 0, :], out[1][..., 0], out[2][..., 3, :], out[3][..., 3] = 0.0, -INF, 0.0, -INF
    return out


def merge_mistakes(o_a, lse_a, o_b, lse_b) -> list:
    lse, m = torch.logaddexp(lse_a, lse_b), torch.maximum(lse_a, lse_b)

    def w(x, ref=lse):
        return torch.exp(x - ref).unsqueeze(-1)

    exact = "log(exp(lse_a) + exp(lse_b)) = torch.logaddexp(lse_a, lse_b)"
    weights = "o = exp(lse_a - lse)·o_a + exp(lse_b - lse)·o_b, with the merged lse"
    return [
        ((None, m), f"lse is max(lse_a, lse_b) — the merged lse is the log-sum-exp of the two, {exact}; "
                    "the max is only the shift that keeps exp from overflowing"),
        ((None, lse_a + lse_b), "lse is lse_a + lse_b, the log of a product exp(lse_a)·exp(lse_b); the "
                                f"merged softmax's denominator is the SUM of the two: {exact}"),
        ((None, (lse_a + lse_b) / 2), f"lse is the mean of lse_a and lse_b — it is {exact}"),
        ((None, lse - m), "lse is short by max(lse_a, lse_b): you subtracted the max inside the log but did "
                          "not add it back — lse = m + log(exp(lse_a - m) + exp(lse_b - m))"),
        ((o_b, lse_b), "you returned (o_b, lse_b): the second partial replaced the first instead of being "
                       "merged with it"),
        ((o_a, lse_a), "you returned (o_a, lse_a) unchanged: merge o_b and lse_b in"),
        (((o_a + o_b) / 2, None), "o is the plain average of o_a and o_b — weight each by its share of the "
                                  f"merged softmax's mass: {weights}"),
        ((w(lse_b) * o_a + w(lse_a) * o_b, None), "the weights are swapped: o_a goes with exp(lse_a - lse) "
                                                  "and o_b with exp(lse_b - lse)"),
        ((o_a + o_b, None), f"o = o_a + o_b: the two weights must sum to 1 — {weights}"),
        ((w(lse_a, m) * o_a + w(lse_b, m) * o_b, None), "the weights exp(lse_x - max) do not sum to 1: "
                                                        f"divide by their sum — {weights}")]


# --- 14.2 --------------------------------------------------------------------------------------------

OWN, EARLIER, LATER = ("your own block (j == i)", "a block from an earlier rank (j < i)",
                       "a block from a later rank (j > i)")
FORGOT = ("the rows this block reaches were overwritten with the block's own result: merge it into the "
          "running (o, lse) with merge_partial — the keys of the earlier blocks count too")
STEP_MISTAKES = {  # kind -> [((q rows, block keys, mask[, merge]) or None: unchanged, message)]
    OWN: [
        (("all", "all", None), "no causal mask on your own block: each query may only see the keys at or "
                               "before it — hide torch.ones(L, L, dtype=torch.bool).triu(1)"),
        (("all", "all", "chunks"), "the causal mask was applied to each chunk separately: your L tokens are "
                                   "chunk i then chunk 2cp-1-i, in increasing order, so chunk 2cp-1-i sees "
                                   "ALL of chunk i — one causal mask over the L tokens"),
        (("all", "all", "causal", False), FORGOT),
        (None, "(o, lse) came back unchanged: your own block is attended too, with the causal mask")],
    EARLIER: [
        (("all", "first", "causal"), "the causal mask is for your own block only (j == i): the block's "
                                     "first half, chunk j < i, lies before every one of your queries — no "
                                     "mask"),
        (("all", "all", None), "all queries × the WHOLE block: its second half, chunk 2cp-1-j, comes after "
                               "both of your chunks (2cp-1-j > 2cp-1-i > i) — only the first half k0/v0. "
                               "(Whole blocks are the rule of a contiguous split; zig-zag gives rank i "
                               "chunks i and 2cp-1-i.)"),
        (("all", "all", "causal"), "the rule of your own block (whole block, causal mask) on a block from "
                                   "an earlier rank: j < i takes all queries × the block's first half, no "
                                   "mask"),
        (("all", "second", None), "the block's second half (chunk 2cp-1-j) instead of its first: a block is "
                                  "[chunk j | chunk 2cp-1-j] in that order, and chunk j lies before your "
                                  "queries"),
        (("second", "all", None), "the rule of a later rank (q1 × the whole block) on a block from an "
                                  "earlier one: j < i takes all queries × the block's first half"),
        (("all", "first", None, False), FORGOT),
        (None, "(o, lse) came back unchanged: a block from an earlier rank is not in the future — its "
               "first half, chunk j < i, lies before all your queries")],
    LATER: [
        (("second", "all", "causal"), "the causal mask is for your own block only (j == i): both chunks of "
                                      "rank j lie before your second chunk 2cp-1-i — no mask"),
        (("all", "all", None), "all of your queries × the block: your first chunk i comes before both of "
                               "the block's chunks (i < j < 2cp-1-j) — only the second half q1 sees it"),
        (("first", "all", None), "the first half of your queries: your piece is [chunk i | chunk 2cp-1-i] "
                                 "in that order — the late chunk 2cp-1-i, which sees the block, is the "
                                 "SECOND half"),
        (("second", "first", None), "only the block's first half: its chunk 2cp-1-j lies before your "
                                    "2cp-1-i too (j > i) — q1 × the whole block"),
        (("all", "first", None), "the rule of an earlier rank (all queries × the first half) on a block "
                                 "from a later one: j > i takes q1, your second half, × the whole block"),
        (("second", "all", None, False), FORGOT),
        (None, "(o, lse) came back unchanged — the rule of a contiguous split (a later rank's keys all in "
               "the future); under zig-zag your second chunk 2cp-1-i comes after both chunks of rank j: "
               "q1 × the whole block")]}
STEP_HINTS = {  # by the scale of the scores: what an inf/nan means
    1.0: "a query row that sees no key of a block gets lse = -inf and o = 0/0 = nan, and merging it "
         "spreads the nan: attend only the rows the block reaches (for j > i just q1)",
    100.0: "exp of scores this large overflows float32: subtract the row max before exp (torch.logsumexp "
          "and torch.softmax do) and merge stably (torch.logaddexp), as in 14.1"}
START_HINT = ("the ring starts from o = 0, lse = -inf (no keys yet): that side's weight exp(-inf - lse) "
              "must be 0 — shift by the max or use torch.logaddexp; -inf - (-inf) and -inf + inf are nan")
SHAPE_HINT = " — return the whole running (o, lse) of all L local queries, the rows not reached unchanged"


def kind(i: int, j: int) -> str:
    return OWN if j == i else EARLIER if j < i else LATER


def variant(q, k, v, o, lse, rows, keys, mask, merge=True):
    """The step with these query rows and block keys ("all", "first", "second") and mask ("causal",
    "chunks": causal within each chunk only, None); ``merge=False``: overwrite the rows."""
    from minimegatron.mpu.ring_attention import merge_partial

    half = q.size(-2) // 2
    r, kk = ({"all": slice(None), "first": slice(None, half), "second": slice(half, None)}[x]
             for x in (rows, keys))
    qs, ks, vs = q[..., r, :], k[..., kk, :], v[..., kk, :]
    vis = torch.ones(qs.size(-2), ks.size(-2), dtype=torch.bool).tril() if mask else None
    if mask == "chunks":
        vis &= torch.arange(qs.size(-2))[:, None] // half == torch.arange(ks.size(-2))[None] // half
    o_b, lse_b = attend(qs, ks, vs, vis)
    o, lse = o.clone(), lse.clone()
    if merge:
        o_b, lse_b = merge_partial(o[..., r, :], lse[..., r], o_b, lse_b)
    o[..., r, :], lse[..., r] = o_b, lse_b
    return o, lse


def step_mistakes(q, k, v, o, lse, i: int, j: int) -> list:
    return [(variant(q, k, v, o, lse, *m) if m else (o, lse), message)
            for m, message in STEP_MISTAKES[kind(i, j)]]


# --- 14.3 --------------------------------------------------------------------------------------------

def position_mistakes(seq_len: int, r: int, cp: int) -> list:
    """(positions, message) of the usual wrong splits of rank r."""
    c = seq_len // (2 * cp)

    def chunk(x, n=c):
        return torch.arange(x * n, (x + 1) * n)

    return [
        (torch.arange(2 * r * c, 2 * (r + 1) * c), "that is the contiguous split (rank r holds the r-th of "
         "cp pieces): zig-zag cuts the sequence into 2·cp chunks of seq_len/(2·cp) tokens and gives rank r "
         "chunks r and 2cp-1-r"),
        (torch.cat([chunk(2 * cp - 1 - r), chunk(r)]), "the right tokens in the wrong order: chunk r first, "
         "then chunk 2cp-1-r — positions increase (the causal order within the piece)"),
        (torch.cat([chunk(r), chunk(2 * cp - r)]), "off by one: the chunks are numbered 0 … 2cp-1, so the "
         "mirror of chunk r is 2cp-1-r, not 2cp-r"),
        (torch.cat([chunk(r), chunk(cp + r)]), "the second chunk is cp+r (a stride of cp): zig-zag pairs "
         "the r-th chunk from the start with the r-th from the END, chunk 2cp-1-r — that pairing balances "
         "the causal work"),
        (torch.cat([chunk(r), chunk(2 * cp - 1 - r)]) + 1, "positions count from 0"),
        (torch.cat([chunk(r, 2 * c), chunk(2 * cp - 1 - r, 2 * c)]), "each chunk is seq_len/(2·cp) "
         "tokens, not seq_len/cp: the two chunks together are the rank's seq_len/cp")]
