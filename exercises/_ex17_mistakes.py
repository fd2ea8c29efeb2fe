"""Exercise 17's grader internals: the definitions as per-token loops, the usual mistakes, their messages.

The references here are written from the definitions, one (token, slot) at a time — no sort, no
bincount — so they share nothing with a vectorised solution. When a candidate's result differs, the
grader compares it with the result of each usual mistake on the same input (or checks the property the
mistake breaks) and names the first that fits. Nothing here is the exercise (``ex17_moe_dispatch.py``).
"""
from __future__ import annotations

from typing import Any

import torch

from exercises.grading import GradingError, assert_close, kind_of

# --- 17.1 the routing inputs and the loop references --------------------------------------------------

#        (tokens n, slots k, experts E, experts actually used, drop probability)
PERMUTE_CASES = [(6, 2, 4, 3, 0.25),   # the last expert gets no token: its count is 0
                 (8, 1, 3, 3, 0.0),    # top-1, nothing dropped
                 (10, 3, 5, 5, 0.3)]   # top-3, a third dropped


def routing(n: int, k: int, num_experts: int, used: int, drop: float, g: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts (n, k) int64: k distinct experts per token, as top-k picks them; keep (n, k) bool)."""
    experts = torch.stack([torch.randperm(used, generator=g)[:k] for _ in range(n)])  # (n, k)
    keep = torch.rand(n, k, generator=g) >= drop                                      # (n, k)
    assert num_experts >= used
    return experts, keep


def loop_permutation(experts: torch.Tensor, keep: torch.Tensor, num_experts: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition: for each expert in turn, every kept (token, slot) routed to it, token then slot.
    order (m,) flat slot ids t·k + j; counts (E,); inverse (n, k): the row of slot (t, j), -1 if dropped."""
    n, k = experts.shape
    order, counts = [], []
    for e in range(num_experts):
        mine = [t * k + j for t in range(n) for j in range(k) if keep[t, j] and int(experts[t, j]) == e]
        order += mine
        counts.append(len(mine))
    inverse = torch.full((n, k), -1, dtype=torch.long)
    for row, s in enumerate(order):
        inverse[s // k, s % k] = row
    return torch.tensor(order, dtype=torch.long), torch.tensor(counts, dtype=torch.long), inverse


def expert_fn(e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of the check: a different affine map each, so a row sent to the wrong expert shows."""
    return x * (e + 1) + 0.5 * e


def loop_moe(x: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """out[t] = Σ_j keep[t, j] · probs[t, j] · expert_{experts[t, j]}(x[t]), token by token."""
    out = torch.zeros_like(x)
    for t in range(x.size(0)):
        for j in range(experts.size(1)):
            if keep[t, j]:
                out[t] += probs[t, j] * expert_fn(int(experts[t, j]), x[t])
    return out


def permuted_moe(x: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, inverse: torch.Tensor,
                 probs: torch.Tensor) -> torch.Tensor:
    """The same MoE run the dispatcher's way, with the candidate's order, counts and inverse."""
    k = inverse.size(1)
    rows = x.index_select(0, order // k)                                      # (m, h) expert-major
    y = torch.cat([expert_fn(e, part) for e, part in enumerate(rows.split(counts.tolist()))])  # (m, h)
    slot = y.index_select(0, inverse.clamp(min=0).reshape(-1)).view(*inverse.shape, -1)  # (n, k, h)
    return (slot * (probs * (inverse >= 0)).unsqueeze(-1)).sum(1)              # (n, h)


# --- 17.1 the mistakes --------------------------------------------------------------------------------

PERMUTE_RULE = ("order = the flat slot ids t·k + j of the kept slots, expert 0's first, then expert 1's, "
                "…; inside one expert by token, then slot")


def check_tensor(where: str, what: str, got: Any, shape: tuple | None, hint: str) -> None:
    """A torch.Tensor of int64 (and of ``shape`` unless None), or the GradingError that says what came."""
    if not isinstance(got, torch.Tensor):
        raise GradingError(f"{where}: {what} must be a torch.Tensor {hint}, got {kind_of(got)}")
    if got.dtype != torch.long:
        raise GradingError(f"{where}: {what} has dtype {got.dtype}, expected torch.int64 (indices and counts "
                           "are int64: torch.argsort, torch.bincount and torch.arange give it)")
    if shape is not None and tuple(got.shape) != shape:
        raise GradingError(f"{where}: {what} has shape {tuple(got.shape)}, expected {shape} {hint}")


def order_problem(order: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor, expected: torch.Tensor
                  ) -> str | None:
    """What is wrong with ``order`` (any shape (m',) of int64), in words; None if it is right."""
    n, k = experts.shape
    flat_keep, flat_experts = keep.reshape(-1), experts.reshape(-1)
    if order.dim() != 1 or bool(((order < 0) | (order >= n * k)).any()):
        return (f"order must be flat slot ids in [0, n·k = {n * k}), shape (m,), got shape "
                f"{tuple(order.shape)} with values {order.reshape(-1)[:12].tolist()}: {PERMUTE_RULE}")
    if bool((~flat_keep[order]).any()):
        s = int(order[~flat_keep[order]][0])
        return (f"dropped slots kept: order contains slot {s} (token {s // k}, slot {s % k}), whose keep is "
                f"False — a slot over its expert's capacity is not sent at all: select keep's slots only "
                f"({int(flat_keep.sum())} of the {n * k})")
    if order.numel() == expected.numel() and torch.equal(order, torch.nonzero(flat_keep).squeeze(1)) and \
            not torch.equal(order, expected):
        return ("token-major instead of expert-major: order lists the kept slots token by token (0, 1, 2, …); "
                "the experts' rows must be contiguous — every row of expert 0, then of expert 1, … (sort the "
                "slots by their expert id)")
    if order.numel() == expected.numel() and torch.equal(flat_experts[order], flat_experts[expected]) and \
            torch.equal(order.sort().values, expected.sort().values) and not torch.equal(order, expected):
        e = int(next(flat_experts[a] for a, b in zip(order, expected) if a != b))
        got, want = order[flat_experts[order] == e].tolist(), expected[flat_experts[expected] == e].tolist()
        return (f"not stable: the rows are grouped by expert, but inside expert {e} in the order {got}, "
                f"expected {want}"
                " (by token, then slot) — torch.argsort(..., stable=True): an unstable sort may reorder equal "
                "keys, and the rank that combines relies on (token, slot) order")
    if not torch.equal(order, expected):
        return f"order is {order.tolist()}, expected {expected.tolist()}: {PERMUTE_RULE}"
    return None


def counts_problem(counts: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor, num_experts: int,
                   expected: torch.Tensor) -> str | None:
    kept = experts[keep]
    if counts.dim() == 1 and counts.numel() < num_experts and \
            torch.equal(counts, torch.bincount(kept)[:counts.numel()]):
        return (f"counts has {counts.numel()} entries, expected num_experts = {num_experts}: the experts after "
                f"the last one used get no count — torch.bincount(..., minlength=num_experts) (an expert with "
                f"no token still has a count, 0, and a row count in the all-to-all)")
    if tuple(counts.shape) != (num_experts,):
        return f"counts has shape {tuple(counts.shape)}, expected ({num_experts},): one count per expert"
    if torch.equal(counts, torch.bincount(experts.reshape(-1), minlength=num_experts)) and \
            not torch.equal(counts, expected):
        return (f"counts from all slots instead of the kept ones: {counts.tolist()} sums to "
                f"{int(counts.sum())} = n·k, but only {int(keep.sum())} slots are kept — count experts[keep], "
                f"expected {expected.tolist()}")
    if not torch.equal(counts, expected):
        return (f"counts is {counts.tolist()}, expected {expected.tolist()}: the number of kept slots routed "
                "to each expert")
    return None


def inverse_problem(inverse: torch.Tensor, order: torch.Tensor, keep: torch.Tensor, expected: torch.Tensor,
                    x: torch.Tensor, experts: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor
                    ) -> str | None:
    """``order`` and ``counts`` are right here; is ``inverse`` the map back?"""
    if torch.equal(inverse, expected):
        return None
    if bool((inverse[~keep] != -1).any()) and torch.equal(inverse[keep], expected[keep]):
        return ("the dropped slots' inverse is not -1 (got "
                f"{sorted(set(inverse[~keep].tolist()))}): a dropped slot has no row — mark it -1, so that "
                "combine gives it 0 instead of some other slot's output")
    m = order.numel()
    if bool(((inverse < -1) | (inverse >= m)).any()):
        bad = int(inverse[(inverse < -1) | (inverse >= m)][0])
        return (f"inverse wrong: it holds {bad}, but there are only m = {m} rows — inverse maps each slot to "
                "its ROW (0 … m-1; -1 if dropped), not to a slot id: that is order. inverse.view(-1)[order] = "
                "arange(m)")
    got = permuted_moe(x, order, counts, inverse, probs)
    want = loop_moe(x, experts, keep, probs)
    t = int((got - want).abs().amax(1).argmax())
    return (f"inverse wrong — combine does not restore: with your inverse, token {t}'s output is "
            f"{got[t].tolist()}, the per-token loop gives {want[t].tolist()}. inverse[t, j] is the row that "
            f"slot (t, j) went to: inverse.view(-1)[order] = arange(m) (-1 elsewhere), not order itself "
            f"(expected {expected.tolist()}, got {inverse.tolist()})")


# --- 17.2 the splits, from every rank's counts ----------------------------------------------------------

NUM_EXPERTS, TOKENS, TOP_K = 8, 7, 2  # on every rank of 17.2: E = 8 experts, E/ep = 4 (ep 2) or 2 (ep 4)


def rank_routing(ep: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of ``rank``'s tokens in the grader's case of size ``ep``: the same in every process."""
    return routing(TOKENS, TOP_K, NUM_EXPERTS, NUM_EXPERTS, 0.2, torch.Generator().manual_seed(17 * ep + rank))


def rank_counts(ep: int, rank: int) -> torch.Tensor:
    experts, keep = rank_routing(ep, rank)
    return loop_permutation(experts, keep, NUM_EXPERTS)[1]  # (E,)


def blocks(ep: int, how: str) -> list[list[int]]:
    """The experts each EP rank holds — "contiguous" is right; the others are mistakes."""
    per, E = NUM_EXPERTS // ep, NUM_EXPERTS

    def clip(lo: int, hi: int) -> list[int]:
        return [e for e in range(lo, hi) if 0 <= e < E]
    return {"contiguous": [clip(s * per, (s + 1) * per) for s in range(ep)],
            "round_robin": [list(range(s, E, ep)) for s in range(ep)],
            "shifted": [clip(s * per + 1, (s + 1) * per + 1) for s in range(ep)],
            "inclusive": [clip(s * per, (s + 1) * per + 1) for s in range(ep)],
            "short": [clip(s * per, (s + 1) * per - 1) for s in range(ep)]}[how]


def splits_of(counts: list[torch.Tensor], me: int, how: str = "contiguous") -> tuple[list[int], list[int]]:
    """(input, output) split sizes of EP rank ``me`` given every EP rank's (E,) counts, by loops."""
    b = blocks(len(counts), how)
    sends = [sum(int(counts[me][e]) for e in b[s]) for s in range(len(counts))]
    receives = [sum(int(counts[s][e]) for e in b[me]) for s in range(len(counts))]
    return sends, receives


SPLIT_RULE = ("input_split_sizes[s] = Σ of this rank's counts over rank s's experts [s·E/ep, (s+1)·E/ep); "
              "output_split_sizes[s] = Σ of rank s's counts over this rank's experts (exchange the counts)")


def as_splits(got: Any, ep: int) -> tuple[list[int], list[int]] | str:
    """The candidate's (input_split_sizes, output_split_sizes) as two lists of ints, or what is wrong."""
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"expected a tuple (input_split_sizes, output_split_sizes), got {kind_of(got)}"
    out = []
    for name, sizes in zip(("input_split_sizes", "output_split_sizes"), got):
        if isinstance(sizes, torch.Tensor) and sizes.dim() == 1 and not sizes.is_floating_point():
            sizes = sizes.tolist()
        if not isinstance(sizes, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in sizes):
            return (f"{name} must be a list of ints (all_to_all_single's split sizes; tensor.tolist() gives "
                    f"one), got {kind_of(sizes)}")
        out.append(list(sizes))
    return out[0], out[1]


def split_problem(sends: list[int], receives: list[int], counts: list[torch.Tensor], me: int,
                  first_counts: list[torch.Tensor] | None = None) -> str | None:
    """The first usual mistake the candidate's splits on EP rank ``me`` show; None if they are right.
    ``first_counts``: the counts of global ranks 0 … ep-1 (what a gather over the whole job puts first)."""
    ep, shown = len(counts), f"got input {sends}, output {receives}"
    right_in, right_out = splits_of(counts, me)
    if (sends, receives) == (right_in, right_out):
        return None
    if len(sends) == NUM_EXPERTS or len(receives) == NUM_EXPERTS:
        return (f"splits per expert instead of per rank: {shown} — {NUM_EXPERTS} sizes, one per expert; "
                f"all_to_all_single takes ep = {ep}, one per EP rank: the sums over each rank's block of "
                f"E/ep = {NUM_EXPERTS // ep} experts, expected input {right_in}, output {right_out}")
    if len(sends) != ep or len(receives) != ep:
        return f"{shown}: all_to_all_single over the EP group takes ep = {ep} sizes each — {SPLIT_RULE}"
    if (sends, receives) == (right_out, right_in):
        return (f"input and output split sizes swapped: {shown}, expected input {right_in} (rows this rank "
                f"sends), output {right_out} (rows it receives) — return (input_split_sizes, output_split_sizes)")
    mine = sum(int(counts[me][e]) for e in blocks(ep, "contiguous")[me])
    if sends == right_in and receives in (right_in, [mine] * ep):
        return (f"the counts were not exchanged: {shown}, expected output {right_out} — the output splits "
                "are what the OTHER ranks send here, which only they know: exchange the counts first "
                "(all_to_all_single of the (E,) counts, or all_gather) and sum rank s's counts over your "
                "experts")
    if first_counts is not None and receives == splits_of(first_counts, me)[1] != right_out:
        return (f"the counts were exchanged over the wrong group: {shown}, expected output {right_out} — the "
                f"output splits summed the counts of global ranks 0..{ep - 1}, not of this EP group: pass "
                "group=group (the EP group) to the collective, not the default group (every rank of the job)")
    for how, what in (("round_robin", "experts assigned to ranks round-robin (expert e on rank e % ep)"),
                      ("shifted", "off-by-one block boundaries (rank s's experts taken from s·E/ep + 1)"),
                      ("inclusive", "off-by-one block boundaries (the block's end included: (s+1)·E/ep too)"),
                      ("short", "off-by-one block boundaries (the block's last expert left out)")):
        wrong_in, wrong_out = splits_of(counts, me, how)
        if sends == wrong_in != right_in or receives == wrong_out != right_out:
            return (f"{what}: {shown}, expected input {right_in}, output {right_out} — EP rank s holds the "
                    f"contiguous block of experts [s·E/ep, (s+1)·E/ep) = {blocks(ep, 'contiguous')[me]} "
                    f"for this rank")
    return f"{shown}, expected input {right_in}, output {right_out}: {SPLIT_RULE}"


def expected_rows(ep: int, base: int, dest: int) -> torch.Tensor:
    """The rows EP rank ``dest`` receives, by a loop over every source's tokens: (source rank, expert,
    token, slot), source by source, each source's rows expert-major."""
    rows = []
    for s in range(ep):
        experts, keep = rank_routing(ep, base + s)
        for e in blocks(ep, "contiguous")[dest]:
            rows += [[s, e, t, j] for t in range(TOKENS) for j in range(TOP_K)
                     if keep[t, j] and int(experts[t, j]) == e]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def check_rows(where: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    assert_close(f"{where}, the rows all_to_all_single delivered with your splits (source rank, expert, token, "
                 "slot)", got, expected)
