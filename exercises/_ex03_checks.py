"""Exercise 03's grader internals: every rank's data, the single-device computation, the mistakes.

As in exercise 01: 4 ranks, two TP groups of 2 with their own data; each rank returns what the
candidate gave and which collectives it called; the parent draws the data again, computes the
expected result on one device (``table[ids]``, ``F.cross_entropy``) and, when the candidate's
differs, the result of each usual mistake — the first match is named. An index out of a shard's rows
(an off-by-one vocab range) is caught on the rank and named, not shown as a raw IndexError.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from exercises.grading import GradingError, assert_close, kind_of
from exercises.watch import Collectives
from minimegatron.mpu.state import initialize_model_parallel

WORLD, TP, V, H, B, S = 4, 2, 20, 6, 3, 5
PER = V // TP
GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object", "gather", "_all_gather_base",
           "all_to_all", "all_to_all_single")
CE_CASES = [("random logits", 0.0), ("huge logits (exp overflows unless the max is subtracted)", 1e4)]
EDGES = torch.tensor([0, PER - 1, PER, V - 1, PER + 1])  # the first and last id of both slices


def embedding_data(group: int) -> dict:
    g = torch.Generator().manual_seed(30 + group)
    ids = torch.randint(0, V, (B, S), generator=g)
    ids[0] = EDGES
    return {"table": torch.randn(V, H, generator=g), "ids": ids, "c": torch.randn(B, S, H, generator=g)}


def ce_data(group: int, offset: float) -> dict:
    g = torch.Generator().manual_seed(40 + group)
    target = torch.randint(0, V, (S, B), generator=g)
    target[:, 0] = EDGES
    return {"logits": 3 * torch.randn(S, B, V, generator=g) + offset, "target": target}


INDEX_HINT = ("looked up a row outside this rank's shard (an IndexError): the slice is HALF-OPEN, "
              "[vocab_start_index, vocab_end_index) — an id equal to vocab_end_index is the next rank's "
              "(outside = ids < start | ids >= end, not > end), and the local row is id - vocab_start_index")


def _out_of_range(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, IndexError) or ("index" in text and ("out of" in text or "bounds" in text))


def rank_case(item: tuple[str, Callable]) -> dict:
    """On every rank: the candidate of ``part`` ("03.1" / "03.2") on this rank's data, watched."""
    part, candidate = item
    state = initialize_model_parallel(TP)
    group, r = state.tp_ranks[0] // TP, state.tp_rank
    start, end = r * PER, (r + 1) * PER
    log = Collectives()
    results = []
    try:
        with log.watching(candidate):
            if part == "03.1":
                d = embedding_data(group)
                w = d["table"][start:end].clone().requires_grad_()  # (V/tp, h)
                y = candidate(d["ids"].clone(), w, start, end, state)
                res = {"output": y.detach().clone() if isinstance(y, torch.Tensor) else y,
                       "connected": isinstance(y, torch.Tensor) and y.requires_grad}
                if res["connected"] and y.shape == d["c"].shape:
                    (y * d["c"]).sum().backward()
                res["grad"] = None if w.grad is None else w.grad.clone()
                results.append(res)
            else:
                for _, offset in CE_CASES:
                    d = ce_data(group, offset)
                    shard = d["logits"][..., start:end].contiguous()  # (s, b, V/tp)
                    given_logits, given_target = shard.clone(), d["target"].clone()
                    got = _without_gathers(candidate, given_logits, given_target, state)
                    results.append({"output": got.detach().clone() if isinstance(got, torch.Tensor) else got,
                                    "modified": not (torch.equal(given_logits, shard)
                                                     and torch.equal(given_target, d["target"]))})
    except (IndexError, RuntimeError) as err:
        if not _out_of_range(err):
            raise
        raise GradingError(f"Exercise {part}, TP rank {r} (vocab slice [{start}, {end})): your code {INDEX_HINT} "
                           f"({type(err).__name__}: {str(err)[:120]})") from None
    return {"part": part, "results": results, "tp_rank": r, "group": group, "calls": log.summary(state.tp_group)}


def _without_gathers(candidate: Callable, *args: Any) -> Any:
    saved = {name: getattr(dist, name) for name in GATHERS if hasattr(dist, name)}
    for name in saved:
        def refuse(*a, _name=name, **k):
            raise GradingError(f"Exercise 03.2: your code called dist.{_name}; the point is never to "
                               "build the full (…, V) logits — use three all_reduce calls instead")
        setattr(dist, name, refuse)
    try:
        return candidate(*args)
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


# --- the single-device computation and the mistakes --------------------------------------------------

def embedding(d: dict, r: int, variant: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(output (b, s, h), gradient of rank r's shard (V/tp, h)) on one device; or a usual mistake's."""
    table = d["table"].clone().requires_grad_()
    ids = d["ids"]
    rows = []
    for q in range(TP):  # what each rank contributes before the sum
        lo, hi = q * PER, (q + 1) * PER
        mine = {"start_excluded": (ids > lo) & (ids < hi)}.get(variant, (ids >= lo) & (ids < hi))
        local = (ids - lo).clamp(0, PER - 1) if variant == "clamped" else (ids - lo).masked_fill(~mine, 0)
        out = F.embedding(local, table[lo:hi])
        if variant != "clamped" and variant != "not_zeroed":
            out = out.masked_fill(~mine.unsqueeze(-1), 0.0)
        rows.append(out)
    y = rows[r] if variant == "no_reduce" else sum(rows)
    (y * d["c"]).sum().backward()
    return y.detach(), table.grad[r * PER:(r + 1) * PER]


EMBEDDING_MISTAKES = [
    ("clamped", "ids other ranks own were looked up (clamped into this shard's rows) instead of masked: "
                "zero the output rows of ids outside [vocab_start_index, vocab_end_index) before the all-reduce"),
    ("not_zeroed", "the ids other ranks own got this shard's row 0 (the masked local id): zero their output "
                   "rows after the lookup — out.masked_fill(outside.unsqueeze(-1), 0)"),
    ("start_excluded", "an off-by-one at the start: the id vocab_start_index itself was treated as another "
                       "rank's — the slice [vocab_start_index, vocab_end_index) includes its start "
                       "(outside = ids < start, not <=)"),
    ("no_reduce", "the output holds only this rank's rows: sum over the TP group with g "
                  "(reduce_from_tensor_model_parallel_region) — every id's row comes from exactly one rank")]


def cross_entropy(d: dict, r: int, variant: str = "right") -> torch.Tensor:
    """The per-token loss (s, b) on TP rank r on one device, or a usual mistake's."""
    z, t = d["logits"].double(), d["target"]
    if variant == "right":
        return F.cross_entropy(z.reshape(-1, V), t.reshape(-1), reduction="none").view(t.shape).float()
    shards = z.split(PER, -1)
    local_max = torch.stack([s.max(-1).values for s in shards])            # (tp, s, b)
    m = {"local_max": local_max, "no_max": torch.zeros_like(local_max)}.get(
        variant, local_max.max(0).values.expand_as(local_max))             # the shift each rank used
    owner = t // PER
    zt = z.gather(-1, t.unsqueeze(-1)).squeeze(-1) - m.gather(0, owner.unsqueeze(0)).squeeze(0)
    sums = torch.stack([(s - m[q].unsqueeze(-1)).exp().sum(-1) for q, s in enumerate(shards)])  # (tp, s, b)
    total = sums[r] if variant == "local_sum" else sums.sum(0)
    if variant == "start_excluded":  # a target on a slice's first column counted as another rank's
        zt = torch.where(t % PER == 0, torch.zeros_like(zt), zt)
    if variant == "local_target":
        zt = torch.where(owner == r, zt, torch.zeros_like(zt))
    if variant == "target_unshifted":
        zt = zt + m[0]
    return (total.log() - zt).float()


CE_MISTAKES = [
    ("local_max", "each rank subtracted its OWN max: the shift must be the same on every rank, the max over "
                  "the whole vocabulary — all-reduce the local max with op=dist.ReduceOp.MAX"),
    ("local_target", "the target logit was not summed over the TP group: only the rank that owns the target "
                     "has it, the others add 0 — all-reduce z_t (SUM)"),
    ("local_sum", "the sum of exp is this rank's columns only: all-reduce S = Σ exp(z − m) (SUM) over the TP "
                  "group"),
    ("start_excluded", "an off-by-one at the start: a target equal to a slice's first column (vocab_start_index "
                       "= tp_rank·V/tp) was treated as another rank's — the slice [start, end) includes its start "
                       "(outside = target < start, not <=)"),
    ("target_unshifted", "the loss is off by the max m: you subtracted m inside the exp but not from the target "
                         "logit — loss = log S − (z_t − m)")]


def _close(a: Any, b: torch.Tensor, tol: float) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and \
        bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=tol, atol=tol)


def judge(part: str, ranks: list[dict]) -> None:
    for rank, res in enumerate(ranks):
        r, calls = res["tp_rank"], res["calls"]
        where = f"Exercise {part}, rank {rank} (TP rank {r}, vocab slice [{r * PER}, {(r + 1) * PER}))"
        if calls["ungrouped"]:
            raise GradingError(f"{where}: dist.{calls['ungrouped'][0]} without group=state.tp_group — it runs "
                               f"over every rank (the default group), here {WORLD} ranks in two TP groups whose "
                               "data differ: pass group=state.tp_group")
        if part == "03.1":
            _judge_embedding(where, res, r, calls)
        else:
            _judge_cross_entropy(where, res, r, calls)


def _judge_embedding(where: str, res: dict, r: int, calls: dict) -> None:
    got, d = res["results"][0], embedding_data(res["group"])
    if calls["tracked"]:
        raise GradingError(f"{where}: a raw dist.{calls['tracked'][0]} on a tensor autograd tracks: it has no "
                           "backward of its own — sum with g (reduce_from_tensor_model_parallel_region)")
    y, grad = embedding(d, r)
    if not _close(got["output"], y, 1e-6):
        for variant, message in EMBEDDING_MISTAKES:
            if _close(got["output"], embedding(d, r, variant)[0], 1e-6):
                raise GradingError(f"{where}: {message}")
        assert_close(f"{where}, output (every token's row comes from exactly one rank: mask the others to "
                     "zero, then all-reduce)", got["output"], y)
    if not got["connected"] or got["grad"] is None:
        raise GradingError(f"{where}: no gradient reached weight_shard — keep the lookup in the autograd graph "
                           "(no .detach() / torch.no_grad())")
    assert_close(f"{where}, gradient of weight_shard (each rank's rows get the gradient of the tokens it owns)",
                 got["grad"], grad)


def _judge_cross_entropy(where: str, res: dict, r: int, calls: dict) -> None:
    for (name, offset), got in zip(CE_CASES, res["results"]):
        here, d = f"{where}, case '{name}'", ce_data(res["group"], offset)
        out = got["output"]
        if got["modified"]:
            raise GradingError(f"{here}: your code modified logits_shard or target in place; work on a copy "
                               "(logits = logits_shard.float() - m makes a new tensor)")
        expected = cross_entropy(d, r)
        # a correct solution may form log S and z_t at the logits' scale: float32 keeps ~1e-7 of it
        tol = 1e-5 + 4 * torch.finfo(torch.float32).eps * float(d["logits"].abs().max())
        if isinstance(out, torch.Tensor) and out.numel() == 1 and expected.numel() > 1:
            raise GradingError(f"{here}: you returned one number ({kind_of(out)}): return the per-token loss "
                               f"of shape {tuple(expected.shape)} (reduction='none'), not its mean or sum")
        if _close(out, expected, tol):
            continue
        for variant, message in CE_MISTAKES:
            if _close(out, cross_entropy(d, r, variant), 10 * tol):
                raise GradingError(f"{here}: {message}")
        if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
            if "MAX" not in calls["reduce_ops"] and len(calls["reduce_ops"]) >= 3:
                raise GradingError(f"{here}: the loss has inf/nan and no all-reduce used op=MAX: the max was "
                                   "SUMMED over the ranks (the default op) — m_0 + m_1 is no max: exp(z − m) "
                                   "underflows to 0. all_reduce(m, op=dist.ReduceOp.MAX, group=state.tp_group)")
            raise GradingError(f"{here}: the loss has inf/nan — subtract the max over the WHOLE vocabulary "
                               "(dist.all_reduce with op=dist.ReduceOp.MAX) before exp")
        assert_close(f"{here}, per-token loss", out, expected, rtol=1e-5, atol=tol)
