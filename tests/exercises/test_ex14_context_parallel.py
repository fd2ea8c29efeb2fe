"""Exercises 14.1–14.3: the package and hand-written solutions pass their graders; the stubs and every
usual mistake — each its own small function below — fail with the message that names it."""
import pytest
import torch
import torch.nn.functional as F

from exercises import ex14_context_parallel as ex14
from exercises.grading import GradingError
from minimegatron.mpu.context_parallel import context_parallel_index

INF = float("inf")


# --- hand-written solutions (correct), the pieces the mistakes are made of -------------------------------

def merge(o_a, lse_a, o_b, lse_b):
    """14.1 with the max shift spelled out."""
    m = torch.maximum(lse_a, lse_b)
    lse = m + torch.log(torch.exp(lse_a - m) + torch.exp(lse_b - m))
    return torch.exp(lse_a - lse).unsqueeze(-1) * o_a + torch.exp(lse_b - lse).unsqueeze(-1) * o_b, lse


def merge_sigmoid(o_a, lse_a, o_b, lse_b):
    """14.1 another way: the weight of side a is sigmoid(lse_a - lse_b)."""
    w = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)
    return w * o_a + (1 - w) * o_b, torch.logaddexp(lse_a, lse_b)


def attend(q, k, v, causal=False, stable=True):
    """(o, lse) of q over k/v; ``causal``: query r sees keys 0..r."""
    s = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -INF)
    if not stable:  # the max not subtracted
        e = torch.exp(s)
        return e @ v / e.sum(-1, keepdim=True), torch.log(e.sum(-1))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def rule(i, j):
    """(query rows, block keys, causal) of the zig-zag step on rank i with the block of rank j."""
    return ("all", "all", True) if j == i else ("all", "first", False) if j < i else ("second", "all", False)


def step(q, k, v, o, lse, rows, keys, causal, merge_fn=merge, stable=True, overwrite=False):
    half = q.size(-2) // 2
    r, kk = ({"all": slice(None), "first": slice(None, half), "second": slice(half, None)}[x]
             for x in (rows, keys))
    o_b, lse_b = attend(q[..., r, :], k[..., kk, :], v[..., kk, :], causal, stable)
    o, lse = o.clone(), lse.clone()
    o[..., r, :], lse[..., r] = (o_b, lse_b) if overwrite else merge_fn(o[..., r, :], lse[..., r], o_b, lse_b)
    return o, lse


def ring_step(q, k, v, o, lse, i, j, cp):
    return step(q, k, v, o, lse, *rule(i, j))


def ring_step_by_positions(q, k, v, o, lse, i, j, cp):
    """Correct, if wasteful: all of q × the block, masked by global positions; empty rows left alone."""
    s = q.size(-2) * cp
    visible = context_parallel_index(s, i, cp)[:, None] >= context_parallel_index(s, j, cp)[None]
    rows = visible.any(-1)
    scores = (q @ k.transpose(-1, -2) / q.size(-1) ** 0.5).masked_fill(~visible, -INF)[..., rows, :]
    o, lse = o.clone(), lse.clone()
    o[..., rows, :], lse[..., rows] = merge(o[..., rows, :], lse[..., rows], torch.softmax(scores, -1) @ v,
                                            torch.logsumexp(scores, -1))
    return o, lse


def chunks(seq_len, cp, *which, size=None):
    """The positions of the chunks ``which`` (seq_len/(2·cp) tokens each, or ``size``), in that order."""
    c = size or seq_len // (2 * cp)
    return torch.cat([torch.arange(x * c, (x + 1) * c) for x in which])


def zigzag(seq_len, rank, cp):
    return chunks(seq_len, cp, rank, 2 * cp - 1 - rank)


def test_references_and_hand_written_solutions_pass():
    for candidate in (ex14.package_merge_partial, merge, merge_sigmoid):
        assert ex14.grade_merge_partial(candidate).startswith("✓ Exercise 14.1")
    for candidate in (ex14.package_ring_step, ring_step, ring_step_by_positions):
        assert ex14.grade_ring_step(candidate).startswith("✓ Exercise 14.2")
    for candidate in (ex14.package_zigzag_positions, zigzag):
        assert ex14.grade_zigzag_positions(candidate).startswith("✓ Exercise 14.3")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="Exercise 14.1 is not implemented yet"):
        ex14.grade_merge_partial(ex14.merge_partial)
    with pytest.raises(GradingError, match="Exercise 14.2 is not implemented yet"):
        ex14.grade_ring_step(ex14.ring_step)
    with pytest.raises(GradingError, match="Exercise 14.3 is not implemented yet"):
        ex14.grade_zigzag_positions(ex14.zigzag_positions)


# --- 14.1: wrong merges ---------------------------------------------------------------------------------

def merge_exp_directly(o_a, lse_a, o_b, lse_b):  # no max: exp(lse) overflows
    ea, eb = torch.exp(lse_a).unsqueeze(-1), torch.exp(lse_b).unsqueeze(-1)
    return (ea * o_a + eb * o_b) / (ea + eb), torch.log(torch.exp(lse_a) + torch.exp(lse_b))


def merge_lse_without_max(o_a, lse_a, o_b, lse_b):  # the weights right, the lse overflows
    lse = torch.log(torch.exp(lse_a) + torch.exp(lse_b))
    return torch.exp(lse_a - lse).unsqueeze(-1) * o_a + torch.exp(lse_b - lse).unsqueeze(-1) * o_b, lse


def merge_average(o_a, lse_a, o_b, lse_b):
    return (o_a + o_b) / 2, torch.logaddexp(lse_a, lse_b)


def merge_swapped(o_a, lse_a, o_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    return torch.exp(lse_b - lse).unsqueeze(-1) * o_a + torch.exp(lse_a - lse).unsqueeze(-1) * o_b, lse


def merge_lse_max(o_a, lse_a, o_b, lse_b):
    return merge(o_a, lse_a, o_b, lse_b)[0], torch.maximum(lse_a, lse_b)


def merge_lse_sum(o_a, lse_a, o_b, lse_b):
    return merge(o_a, lse_a, o_b, lse_b)[0], lse_a + lse_b


def merge_max_not_added_back(o_a, lse_a, o_b, lse_b):
    m = torch.maximum(lse_a, lse_b)
    return merge(o_a, lse_a, o_b, lse_b)[0], torch.log(torch.exp(lse_a - m) + torch.exp(lse_b - m))


def merge_unnormalised(o_a, lse_a, o_b, lse_b):
    m = torch.maximum(lse_a, lse_b)
    o = torch.exp(lse_a - m).unsqueeze(-1) * o_a + torch.exp(lse_b - m).unsqueeze(-1) * o_b
    return o, torch.logaddexp(lse_a, lse_b)


def merge_sum(o_a, lse_a, o_b, lse_b):
    return o_a + o_b, torch.logaddexp(lse_a, lse_b)


@pytest.mark.parametrize("mistake, message", [
    (merge_exp_directly, r"large scores.*inf/nan .*subtract the max first.*torch\.logaddexp"),
    (merge_lse_without_max, r"large scores.*inf/nan .*subtract the max first.*torch\.logaddexp"),
    (merge_average, r"random partials: o is the plain average of o_a and o_b .*exp\(lse_a - lse\)"),
    (merge_swapped, r"the weights are swapped: o_a goes with exp\(lse_a - lse\)"),
    (merge_lse_max, r"lse is max\(lse_a, lse_b\) — the merged lse is the log-sum-exp"),
    (merge_lse_sum, r"lse is lse_a \+ lse_b, the log of a product"),
    (merge_max_not_added_back, r"subtracted the max inside the log but did not add it back"),
    (merge_unnormalised, r"the weights exp\(lse_x - max\) do not sum to 1"),
    (merge_sum, r"o = o_a \+ o_b: the two weights must sum to 1"),
    (lambda o_a, lse_a, o_b, lse_b: (o_b, lse_b), r"returned \(o_b, lse_b\): the second partial replaced"),
    (lambda o_a, lse_a, o_b, lse_b: o_a + o_b, r"expected a tuple \(o, lse\) of two tensors, got a Tensor"),
    (lambda o_a, lse_a, o_b, lse_b: (merge(o_a, lse_a, o_b, lse_b)[0], lse_a[..., None]),
     r"lse: wrong shape \(2, 2, 5, 1\), expected \(2, 2, 5\)"),
])
def test_merge_mistakes_are_named(mistake, message):
    with pytest.raises(GradingError, match=rf"(?s)Exercise 14\.1 merge_partial, .*{message}"):
        ex14.grade_merge_partial(mistake)


# --- 14.2: wrong ring steps -----------------------------------------------------------------------------

def mask_on_every_step(q, k, v, o, lse, i, j, cp):
    return step(q, k, v, o, lse, *rule(i, j)[:2], True)


def no_mask_on_own_block(q, k, v, o, lse, i, j, cp):
    return step(q, k, v, o, lse, *rule(i, j)[:2], False)


def mask_per_chunk(q, k, v, o, lse, i, j, cp):  # the two local chunks masked as if unrelated
    if j != i:
        return ring_step(q, k, v, o, lse, i, j, cp)
    h = q.size(-2) // 2
    first, second = (step(q[..., r, :], k[..., r, :], v[..., r, :], o[..., r, :], lse[..., r], "all", "all",
                          True) for r in (slice(None, h), slice(h, None)))
    return torch.cat([first[0], second[0]], -2), torch.cat([first[1], second[1]], -1)


def earlier_whole_block(q, k, v, o, lse, i, j, cp):
    return step(q, k, v, o, lse, "all", "all", False) if j < i else ring_step(q, k, v, o, lse, i, j, cp)


def earlier_second_half(q, k, v, o, lse, i, j, cp):  # the block's halves swapped
    return step(q, k, v, o, lse, "all", "second", False) if j < i else ring_step(q, k, v, o, lse, i, j, cp)


def earlier_skipped(q, k, v, o, lse, i, j, cp):  # an earlier rank's block taken for the future
    return (o, lse) if j < i else ring_step(q, k, v, o, lse, i, j, cp)


def later_all_queries(q, k, v, o, lse, i, j, cp):
    return step(q, k, v, o, lse, "all", "all", False) if j > i else ring_step(q, k, v, o, lse, i, j, cp)


def later_first_half_queries(q, k, v, o, lse, i, j, cp):  # the local piece's halves swapped
    return step(q, k, v, o, lse, "first", "all", False) if j > i else ring_step(q, k, v, o, lse, i, j, cp)


def later_first_half_keys(q, k, v, o, lse, i, j, cp):
    return step(q, k, v, o, lse, "second", "first", False) if j > i else ring_step(q, k, v, o, lse, i, j, cp)


def contiguous_rules(q, k, v, o, lse, i, j, cp):  # the piece taken as contiguous chunk i of cp
    if j == i:
        return step(q, k, v, o, lse, "all", "all", True)
    return step(q, k, v, o, lse, "all", "all", False) if j < i else (o, lse)


def swapped_rules(q, k, v, o, lse, i, j, cp):
    return ring_step(q, k, v, o, lse, i, j, cp) if j == i else ring_step(q, k, v, o, lse, j, i, cp)


def overwrite(q, k, v, o, lse, i, j, cp):  # the merge forgotten
    return step(q, k, v, o, lse, *rule(i, j), overwrite=True)


def no_max_in_the_block(q, k, v, o, lse, i, j, cp):
    return step(q, k, v, o, lse, *rule(i, j), stable=False)


def no_max_in_the_merge(q, k, v, o, lse, i, j, cp):
    return step(q, k, v, o, lse, *rule(i, j), merge_fn=merge_exp_directly)


def nan_rows_by_positions(q, k, v, o, lse, i, j, cp):  # global-position mask, empty rows merged too
    s = q.size(-2) * cp
    visible = context_parallel_index(s, i, cp)[:, None] >= context_parallel_index(s, j, cp)[None]
    scores = (q @ k.transpose(-1, -2) / q.size(-1) ** 0.5).masked_fill(~visible, -INF)
    return merge(o, lse, torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1))


def only_the_rows_reached(q, k, v, o, lse, i, j, cp):  # for j > i, q1's rows alone
    o, lse = ring_step(q, k, v, o, lse, i, j, cp)
    h = q.size(-2) // 2
    return (o[..., h:, :], lse[..., h:]) if j > i else (o, lse)


def softplus_merge_nan_at_the_start(q, k, v, o, lse, i, j, cp):  # stable, except from lse = -inf
    def softplus_merge(o_a, lse_a, o_b, lse_b):
        new = lse_a + F.softplus(lse_b - lse_a)  # -inf + inf = nan
        return (torch.exp(lse_a - new).unsqueeze(-1) * o_a + torch.exp(lse_b - new).unsqueeze(-1) * o_b), new
    return step(q, k, v, o, lse, *rule(i, j), merge_fn=softplus_merge)


OWN, EARLIER, LATER = r"\(j == i\)", r"\(j < i\)", r"\(j > i\)"


@pytest.mark.parametrize("mistake, message", [
    (mask_on_every_step, rf"source_rank=1, cp=2\), .*{LATER}.*the causal mask is for your own block only"),
    (no_mask_on_own_block, rf"{OWN}, random scores: no causal mask on your own block"),
    (mask_per_chunk, rf"{OWN}.*the causal mask was applied to each chunk separately"),
    (earlier_whole_block, rf"{EARLIER}.*all queries × the WHOLE block.*contiguous split"),
    (earlier_second_half, rf"{EARLIER}.*the block's second half \(chunk 2cp-1-j\) instead of its first"),
    (earlier_skipped, rf"{EARLIER}.*came back unchanged: a block from an earlier rank is not in the future"),
    (later_all_queries, rf"{LATER}.*all of your queries × the block: your first chunk i comes before both"),
    (later_first_half_queries, rf"{LATER}.*the late chunk 2cp-1-i, which sees the block, is the SECOND half"),
    (later_first_half_keys, rf"{LATER}.*only the block's first half"),
    (contiguous_rules, rf"my_rank=0, source_rank=1, cp=2\).*{LATER}.*unchanged — the rule of a contiguous"),
    (swapped_rules, rf"{LATER}.*the rule of an earlier rank .* on a block from a later one"),
    (overwrite, rf"my_rank=0, source_rank=0, cp=2\).*{OWN}.*overwritten with the block's own result"),
    (no_max_in_the_block, r"large scores: inf/nan .*subtract the row max before exp"),
    (no_max_in_the_merge, r"large scores: inf/nan .*subtract the row max before exp"),
    (nan_rows_by_positions, rf"{LATER}, random scores: inf/nan .*a query row that sees no key"),
    (only_the_rows_reached, r"o: wrong shape \(1, 2, 2, 8\), expected \(1, 2, 4, 8\) — return the whole"),
    (softplus_merge_nan_at_the_start, r"the whole ring on rank 0 of cp=2 .*inf/nan .*starts from o = 0, "
                                      r"lse = -inf"),
    (lambda *a: None, r"expected a tuple \(o, lse\) of two tensors, got None"),
])
def test_ring_step_mistakes_are_named(mistake, message):
    with pytest.raises(GradingError, match=rf"(?s)Exercise 14\.2.*{message}"):
        ex14.grade_ring_step(mistake)


# --- 14.3: wrong splits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mistake, message", [
    pytest.param(lambda s, r, cp: torch.arange(r * s // cp, (r + 1) * s // cp),
                 r"\(seq_len=8, rank=0, cp=2\): got \[0, 1, 2, 3\], expected \[0, 1, 6, 7\] — that is the "
                 r"contiguous split", id="contiguous"),
    pytest.param(lambda s, r, cp: chunks(s, cp, 2 * cp - 1 - r, r),
                 r"got \[6, 7, 0, 1\], expected \[0, 1, 6, 7\] — the right tokens in the wrong order",
                 id="reversed-chunks"),
    pytest.param(lambda s, r, cp: chunks(s, cp, r, 2 * cp - r), r"off by one: .*2cp-1-r, not 2cp-r",
                 id="mirror-2cp-r"),
    pytest.param(lambda s, r, cp: chunks(s, cp, r, cp + r), r"the second chunk is cp\+r", id="stride-cp"),
    pytest.param(lambda s, r, cp: zigzag(s, r, cp) + 1, r"positions count from 0", id="one-based"),
    pytest.param(lambda s, r, cp: chunks(s, cp, r, 2 * cp - 1 - r, size=s // cp),
                 r"each chunk is seq_len/\(2·cp\) tokens, not seq_len/cp", id="chunk-of-s/cp"),
    pytest.param(lambda s, r, cp: zigzag(s, r, cp).float(), r"positions \(int64.*wrong dtype torch.float32",
                 id="float"),
    pytest.param(lambda s, r, cp: zigzag(s, r, cp).tolist(), r"expected a torch.Tensor, got a list",
                 id="list"),
])
def test_position_mistakes_are_named(mistake, message):
    with pytest.raises(GradingError, match=rf"Exercise 14\.3 zigzag_positions.*{message}"):
        ex14.grade_zigzag_positions(mistake)
