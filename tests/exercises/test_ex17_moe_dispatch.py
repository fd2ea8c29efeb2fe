"""Exercises 17.1–17.2: the references and hand-written solutions pass their graders; the stubs and every
usual mistake — each a switch of a plain solution below — fail with the message that names it."""
import pytest
import torch
import torch.distributed as dist

from exercises import _ex17_reference as ref
from exercises import ex17_moe_dispatch as ex17
from exercises.grading import GradingError

TWO = (2,)


# --- 17.1: a plain permutation by loops over the experts, the mistakes as switches -----------------------

def permute(experts, keep, num_experts, *, drop=True, stable=True, expert_major=True, kept_counts=True,
            minlength=True, inverse="right"):
    """Correct with the defaults; written otherwise than the reference (a mask per expert)."""
    n, k = experts.shape
    flat, ids = experts.reshape(-1), torch.arange(n * k)
    mask = keep.reshape(-1) if drop else torch.ones(n * k, dtype=torch.bool)
    if expert_major:
        parts = [ids[mask & (flat == e)] for e in range(num_experts)]
        order = torch.cat([p if stable else p.flip(0) for p in parts])
    else:
        order = ids[mask]
    counted = flat[keep.reshape(-1)] if kept_counts else flat
    counts = torch.bincount(counted, minlength=num_experts if minlength else 0)
    inv = torch.full((n * k,), -1 if inverse != "zeros" else 0, dtype=torch.long)
    inv[order] = torch.arange(order.numel())
    if inverse == "argsort":  # correct too: the kept slots in token order get the ranks of order's entries
        inv[keep.reshape(-1)] = torch.argsort(order)
    if inverse in ("order", "identity"):  # the order itself, or the rows in token order, at the kept slots
        inv = torch.full((n * k,), -1, dtype=torch.long)
        inv[keep.reshape(-1)] = order if inverse == "order" else torch.arange(order.numel())
    return order, counts, inv.view(n, k)


def with_(**switches):
    def mine(experts, keep, num_experts):
        return permute(experts, keep, num_experts, **switches)
    return mine


def test_permute_references_and_hand_written_solutions_pass():
    assert ex17.grade_permute_by_expert(ref.reference_permute_by_expert).startswith("✓ Exercise 17.1")
    assert ex17.grade_permute_by_expert(permute).startswith("✓ Exercise 17.1")
    assert ex17.grade_permute_by_expert(with_(inverse="argsort")).startswith("✓ Exercise 17.1")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match=r"Exercise 17.1 is not implemented yet: Exercise 17.1: order ="):
        ex17.grade_permute_by_expert(ex17.permute_by_expert)
    with pytest.raises(GradingError, match=r"not implemented yet.*Exercise 17.2: input_split_sizes ="):
        ex17.grade_split_sizes(ex17.split_sizes, world_sizes=TWO)


@pytest.mark.parametrize("switches, message", [
    (dict(stable=False), r"not stable: the rows are grouped by expert, but inside expert \d in the order "
                         r"\[.*\], expected \[.*\] \(by token, then slot\)"),
    (dict(drop=False), r"dropped slots kept: order contains slot \d+ \(token \d+, slot \d\), whose keep is False"),
    (dict(kept_counts=False), r"counts from all slots instead of the kept ones: \[.*\] sums to 12 = n·k, but "
                              r"only \d+ slots are kept"),
    (dict(expert_major=False), r"token-major instead of expert-major: order lists the kept slots token by token"),
    (dict(minlength=False), r"counts has 3 entries, expected num_experts = 4: .*minlength=num_experts"),
    (dict(inverse="order"), r"inverse wrong: it holds \d+, but there are only m = \d+ rows — inverse maps each "
                            r"slot to its ROW"),
    (dict(inverse="identity"), r"inverse wrong — combine does not restore: with your inverse, token \d+'s output "
                            r"is \[.*\], the per-token loop gives"),
    (dict(inverse="zeros"), r"the dropped slots' inverse is not -1 \(got \[0\]\)"),
])
def test_permute_mistakes_are_named(switches, message):
    with pytest.raises(GradingError, match=rf"(?s)^Exercise 17\.1 permute_by_expert\(n=6, k=2, num_experts=4, "
                                           rf"\d+ kept\): {message}"):
        ex17.grade_permute_by_expert(with_(**switches))


def test_wrong_types_and_shapes_are_named():
    with pytest.raises(GradingError, match=r"expected a tuple \(order, counts, inverse\) of three tensors, got "
                                           r"a tuple"):
        ex17.grade_permute_by_expert(lambda e, k, n: permute(e, k, n)[:2])
    with pytest.raises(GradingError, match=r"order has dtype torch.float32, expected torch.int64"):
        ex17.grade_permute_by_expert(lambda e, k, n: (permute(e, k, n)[0].float(), *permute(e, k, n)[1:]))
    with pytest.raises(GradingError, match=r"inverse has shape \(12,\), expected \(6, 2\)"):
        ex17.grade_permute_by_expert(lambda e, k, n: (*permute(e, k, n)[:2], permute(e, k, n)[2].view(-1)))


# --- 17.2: plain splits by all_gather, the mistakes as switches ---------------------------------------------

def splits(counts, ep, ep_rank, group, *, per_expert=False, swapped=False, exchange=True, layout="contiguous",
           use_group=True):
    """Correct with the defaults; written otherwise than the reference (all_gather of every rank's counts)."""
    E = counts.numel()
    every = [torch.empty_like(counts) for _ in range(ep if use_group else dist.get_world_size())]
    dist.all_gather(every, counts, group=group if use_group else None)  # None: every rank of the job
    if not exchange:
        every = [counts] * ep
    per = E // ep
    block = {"contiguous": lambda s: list(range(s * per, (s + 1) * per)),
             "round_robin": lambda s: list(range(s, E, ep)),
             "off_by_one": lambda s: list(range(s * per + 1, min((s + 1) * per + 1, E)))}[layout]
    if per_expert:
        return counts.tolist(), torch.stack(every)[:, block(ep_rank)].sum(0).tolist() + [0] * (E - per)
    sends = [int(counts[block(s)].sum()) for s in range(ep)]
    receives = [int(every[s][block(ep_rank)].sum()) for s in range(ep)]
    return (receives, sends) if swapped else (sends, receives)


def splits_with(**switches):
    def mine(counts, ep, ep_rank, group):
        return splits(counts, ep, ep_rank, group, **switches)
    return mine


def test_split_references_and_hand_written_solutions_pass():
    assert ex17.grade_split_sizes(ref.reference_split_sizes).startswith("✓ Exercise 17.2")
    assert ex17.grade_split_sizes(splits).startswith("✓ Exercise 17.2")


@pytest.mark.parametrize("switches, message", [
    (dict(per_expert=True), r"splits per expert instead of per rank: got input \[.*\] — 8 sizes, one per expert"),
    (dict(swapped=True), r"input and output split sizes swapped: got input \[\d+, \d+\], output \[\d+, \d+\]"),
    (dict(exchange=False), r"the counts were not exchanged: got input \[\d+, \d+\], output \[\d+, \d+\], expected "
                           r"output \[\d+, \d+\]"),
    (dict(layout="round_robin"), r"experts assigned to ranks round-robin \(expert e on rank e % ep\)"),
    (dict(layout="off_by_one"), r"off-by-one block boundaries \(rank s's experts taken from s·E/ep \+ 1\)"),
])
def test_split_mistakes_are_named(switches, message):
    with pytest.raises(GradingError, match=rf"(?s)^Exercise 17\.2 \(ep=2, EP rank 0 of the group of ranks 0..1\): "
                                           rf"{message}"):
        ex17.grade_split_sizes(splits_with(**switches), world_sizes=TWO)


def test_the_default_group_instead_of_the_ep_group_is_caught_on_four_ranks():
    """ep = 2 on 4 ranks: counts gathered over every rank, not the EP group's two, sum the wrong ranks."""
    with pytest.raises(GradingError, match=r"(?s)^Exercise 17\.2 \(ep=2, EP rank 0 of the group of ranks 2..3\): the "
                                           r"counts were exchanged over the wrong group: .* pass group=group"):
        ex17.grade_split_sizes(splits_with(use_group=False), world_sizes=(4,))


def test_a_wrong_return_is_named_before_any_all_to_all():
    with pytest.raises(GradingError, match=r"output_split_sizes must be a list of ints .*got a Tensor of shape"):
        ex17.grade_split_sizes(lambda c, ep, r, g: (splits(c, ep, r, g)[0], torch.tensor(1.0)), world_sizes=TWO)
    with pytest.raises(GradingError, match=r"ep=2, EP rank 0.*expected a tuple \(input_split_sizes, "
                                           r"output_split_sizes\), got None"):
        ex17.grade_split_sizes(lambda c, ep, r, g: None, world_sizes=TWO)
