"""Exercise 02's battery: plausible wrong solutions, each with the message its grader must give.

02.1: (name, candidate, message regex), all graded in one launch; a candidate is :func:`mlp` with its
usual mistakes as switches. 02.2: (name, candidate, message regex), single-process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minimegatron.mpu.mappings import copy_to_tensor_model_parallel_region as f
from minimegatron.mpu.mappings import reduce_from_tensor_model_parallel_region as g


class _GBothWays(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        y = x.clone()
        dist.all_reduce(y, group=state.tp_group)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.state.tp_group)
        return grad, None


def mlp(x, w1, b1, w2, b2, state, *, use_f=True, bias="after", approximate="tanh", b1_where="before",
        reduce="g"):
    """The parallel MLP with the usual mistakes as switches (the defaults are right)."""
    if use_f:
        x = f(x, state)
    pre = F.linear(x, w1, b1 if b1_where == "before" else None)
    act = F.gelu(pre, approximate=approximate) + (b1 if b1_where == "after" else 0)
    y = F.linear(act, w2, b2 if bias == "before" else None)
    if reduce == "g":
        y = g(y, state)
    elif reduce == "both_ways":
        y = _GBothWays.apply(y, state)
    elif reduce == "raw":
        dist.all_reduce(y, group=state.tp_group)
    elif reduce == "no_group":
        y = y.clone()
        dist.all_reduce(y)
    return y + b2 if bias == "after" else y


def switched(**switches):
    def parallel_mlp_forward(x, w1, b1, w2, b2, state):
        return mlp(x, w1, b1, w2, b2, state, **switches)
    return parallel_mlp_forward


MLP_BATTERY = [
    ("b2 before the all-reduce", switched(bias="before"), r"b2 was added 2 times"),
    ("exact GeLU", switched(approximate="none"), r"the exact GeLU: GPT-2's MLP uses the tanh approximation"),
    ("x not through f", switched(use_f=False), r"x's gradient holds only this rank's share of the ffn"),
    ("no b1", switched(b1_where="none"), r"b1 is missing"),
    ("b1 after the GeLU", switched(b1_where="after"), r"b1 was added after the GeLU"),
    ("no all-reduce", switched(reduce="none"), r"the row layer's partial products were not summed"),
    ("g all-reduces in backward too", switched(reduce="both_ways"), r"2× \(2× = tp×\) too large: your g "
                                                                    r"all-reduces in backward too"),
    ("raw dist.all_reduce", switched(reduce="raw"), r"a raw dist.all_reduce on a tensor autograd tracks"),
    ("all-reduce without group=", switched(reduce="no_group"), r"without group=state.tp_group"),
]


# --- 02.2 ----------------------------------------------------------------------------------------------

def contiguous(h, r, tp):
    return torch.arange(r * 3 * h // tp, (r + 1) * 3 * h // tp)


def blocks(h, r, tp, order=(0, 1, 2), rank_shift=0, base=0):
    n = h // tp
    return torch.cat([torch.arange(w * h + (r + rank_shift) * n, w * h + (r + rank_shift + 1) * n)
                      for w in order]) + base


QKV_BATTERY = [
    ("one contiguous block", contiguous, r"you took one contiguous block of 3h/tp rows; with stride 3"),
    ("K, Q, V order", lambda h, r, tp: blocks(h, r, tp, order=(1, 0, 2)), r"the right rows in the wrong order"),
    ("round-robin rows", lambda h, r, tp: torch.arange(r, 3 * h, tp), r"every tp-th row \(round-robin\)"),
    ("ranks from 1", lambda h, r, tp: blocks(h, r, tp, rank_shift=1), r"rank r\+1's rows: ranks count "
                                                                                r"from 0"),
    ("Q only", lambda h, r, tp: blocks(h, r, tp, order=(0,)), r"only the rank's slice of Q"),
    ("rows from 1", lambda h, r, tp: blocks(h, r, tp, base=1), r"row indices count from 0"),
]
