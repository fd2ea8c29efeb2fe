"""Exercise 03's battery: plausible wrong solutions, each with the message its grader must give.

(part, name, candidate, message regex, alone). ``alone``: the mistake raises on some ranks only (an
off-by-one range looks up a row past the shard on one rank): graded by itself, with the public
grader, since a launch that grades many would stall. The others are graded together in one launch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minimegatron.mpu.mappings import gather_from_tensor_model_parallel_region as gather
from minimegatron.mpu.mappings import reduce_from_tensor_model_parallel_region as g


# --- 03.1 the embedding -------------------------------------------------------------------------------

def lookup(ids, weight, start, end, state, *, outside=None, shift=True, zero=True, reduce=True, clamp=False,
           group=True):
    """A plain lookup with the usual mistakes as switches."""
    outside = (ids < start) | (ids >= end) if outside is None else outside
    local = ids - start if shift else ids
    local = local.clamp(0, end - start - 1) if clamp else local.masked_fill(outside, 0)
    out = F.embedding(local, weight)
    if zero and not clamp:
        out = out * (~outside).unsqueeze(-1)
    if not reduce:
        return out
    if not group:
        out = out.clone()
        dist.all_reduce(out)  # raw, and over every rank
        return out
    return g(out, state)


def embedding_end_included(ids, weight, start, end, state):
    return lookup(ids, weight, start, end, state, outside=(ids < start) | (ids > end))


def embedding_start_excluded(ids, weight, start, end, state):
    return lookup(ids, weight, start, end, state, outside=(ids <= start) | (ids >= end))


def embedding_clamped(ids, weight, start, end, state):
    return lookup(ids, weight, start, end, state, clamp=True)


def embedding_not_zeroed(ids, weight, start, end, state):
    return lookup(ids, weight, start, end, state, zero=False)


def embedding_no_reduce(ids, weight, start, end, state):
    return lookup(ids, weight, start, end, state, reduce=False)


def embedding_not_shifted(ids, weight, start, end, state):
    return lookup(ids, weight, start, end, state, shift=False)


def embedding_raw_reduce(ids, weight, start, end, state):
    out = lookup(ids, weight, start, end, state, reduce=False)
    dist.all_reduce(out, group=state.tp_group)
    return out


def embedding_no_group(ids, weight, start, end, state):
    return lookup(ids, weight, start, end, state, group=False)


# --- 03.2 the cross-entropy ---------------------------------------------------------------------------

def loss(logits, target, state, *, max_op="MAX", local_max=False, shift_target=True, reduce_target=True,
         reduce_sum=True, end_included=False, start_excluded=False, group=True, mean=False):
    """A plain three-all-reduce cross-entropy with the usual mistakes as switches."""
    grp = state.tp_group if group else None
    per = logits.size(-1)
    start = state.tp_rank * per
    z = logits.float()
    m = z.max(-1).values
    if not local_max:
        dist.all_reduce(m, op=getattr(dist.ReduceOp, max_op), group=grp)
    z = z - m.unsqueeze(-1)
    hi = target > start + per if end_included else target >= start + per
    lo = target <= start if start_excluded else target < start
    outside = lo | hi
    local = (target - start).masked_fill(outside, 0)
    zt = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    if not shift_target:
        zt = zt + m.masked_fill(outside, 0.0)
    if reduce_target:
        dist.all_reduce(zt, group=grp)
    s = z.exp().sum(-1)
    if reduce_sum:
        dist.all_reduce(s, group=grp)
    out = s.log() - zt
    return out.mean() if mean else out


def switched(**switches):
    def mine(logits, target, state):
        return loss(logits, target, state, **switches)
    mine.__name__ = "vocab_parallel_cross_entropy_forward"
    return mine


def ce_gathered(logits, target, state):
    full = gather(logits, state)
    return F.cross_entropy(full.reshape(-1, full.size(-1)), target.reshape(-1), reduction="none").view(target.shape)


def ce_in_place(logits, target, state):
    logits -= logits.max()
    return loss(logits, target, state)


BATTERY = [
    ("03.1", "inclusive end (> end)", embedding_end_included, r"HALF-OPEN, \[vocab_start_index, "
                                                              r"vocab_end_index\).*not > end", True),
    ("03.1", "ids not shifted to local rows", embedding_not_shifted, r"looked up a row outside this rank's "
                                                                     r"shard .*local row is id - vocab_start_index",
     True),
    ("03.1", "exclusive start (<= start)", embedding_start_excluded, r"off-by-one at the start: the id "
                                                                     r"vocab_start_index itself", False),
    ("03.1", "clamp instead of mask", embedding_clamped, r"looked up \(clamped into this shard's rows\) "
                                                         r"instead of masked", False),
    ("03.1", "mask without zeroing", embedding_not_zeroed, r"got this shard's row 0", False),
    ("03.1", "no all-reduce", embedding_no_reduce, r"the output holds only this rank's rows", False),
    ("03.1", "raw dist.all_reduce", embedding_raw_reduce, r"a raw dist.all_reduce on a tensor autograd tracks",
     False),
    ("03.1", "all-reduce without group=", embedding_no_group, r"without group=state.tp_group", False),
    ("03.2", "local instead of global max", switched(local_max=True), r"each rank subtracted its OWN max", False),
    ("03.2", "max summed (op SUM)", switched(max_op="SUM"), r"case 'huge logits.*no all-reduce used op=MAX: the "
                                                            r"max was SUMMED", False),
    ("03.2", "target logit not all-reduced", switched(reduce_target=False), r"the target logit was not summed",
     False),
    ("03.2", "sum of exp not all-reduced", switched(reduce_sum=False), r"the sum of exp is this rank's columns "
                                                                       r"only", False),
    ("03.2", "target logit not shifted", switched(shift_target=False), r"off by the max m", False),
    ("03.2", "inclusive end (> end)", switched(end_included=True), r"HALF-OPEN", True),
    ("03.2", "exclusive start (<= start)", switched(start_excluded=True), r"off-by-one at the start: a target equal "
                                                                          r"to a slice's first column", False),
    ("03.2", "all-reduce without group=", switched(group=False), r"without group=state.tp_group", False),
    ("03.2", "the mean, not per token", switched(mean=True), r"you returned one number", False),
    ("03.2", "gathers the logits", ce_gathered, r"your code called dist.all_gather", False),
    ("03.2", "modifies the logits in place", ce_in_place, r"modified logits_shard or target in place", False),
]
