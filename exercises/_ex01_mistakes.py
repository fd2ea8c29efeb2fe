"""Exercise 01's battery: plausible wrong solutions, each with the message its grader must give.

Each entry is (part, name, candidate, a regex of the message). The tests grade them all in one launch
(``ex01.battery_verdicts``) and check that every one fails with ITS message — the mistakes of issue 19
included: an all-reduce without ``group=`` (caught because the grader runs two TP groups), a raw
``dist.all_reduce`` in the row layer's forward (no autograd), a g that all-reduces in backward too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minimegatron.mpu import mappings
from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region as f,
                                       gather_from_tensor_model_parallel_region as gather,
                                       reduce_from_tensor_model_parallel_region as g)


class _Function(torch.autograd.Function):
    """Forward and backward as two static hooks: a mistake overrides one."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# --- 01.1 f ------------------------------------------------------------------------------------------

class FNoBackwardReduce(_Function):
    """Identity both ways."""


class FNoGroup(_Function):
    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)  # the default group: every rank
        return grad, None


class FReducesForward(_Function):
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


class FAverages(_Function):
    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.state.tp_group)
        return grad / dist.get_world_size(ctx.state.tp_group), None


class FOneGradient(_Function):
    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.state.tp_group)
        return grad  # no None for state


class FSubclassOfThePackage(mappings._CopyToModelParallelRegion):
    """The package's f under another name."""


# --- 01.2 g ------------------------------------------------------------------------------------------

class GNoForwardReduce(_Function):
    """Identity both ways."""


class GReducesBackward(_Function):
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


class GNoGroup(_Function):
    @staticmethod
    def forward(ctx, x, state):
        y = x.clone()
        dist.all_reduce(y)
        return y


class GInPlace(_Function):
    @staticmethod
    def forward(ctx, x, state):
        dist.all_reduce(x, group=state.tp_group)
        return x.view_as(x)


class GAverages(_Function):
    @staticmethod
    def forward(ctx, x, state):
        y = x.clone()
        dist.all_reduce(y, group=state.tp_group)
        return y / dist.get_world_size(state.tp_group)


# --- 01.3 the column-parallel layer -------------------------------------------------------------------

def column_no_gather(x, w, b, state):
    return F.linear(f(x, state), w, b)


def column_without_f(x, w, b, state):
    return gather(F.linear(x, w, b), state)


def column_reversed(x, w, b, state):
    y = gather(F.linear(f(x, state), w, b), state)
    return torch.cat(y.split(w.size(0), -1)[::-1], -1)


def column_raw_all_gather(x, w, b, state):
    y = F.linear(f(x, state), w, b)
    parts = [torch.empty_like(y) for _ in range(state.tp)]
    dist.all_gather(parts, y, group=state.tp_group)
    return torch.cat(parts, -1)


def column_detached(x, w, b, state):
    return gather(F.linear(f(x, state), w, b), state).detach()


# --- 01.4 the row-parallel layer ----------------------------------------------------------------------

def row_bias_before_reduce(x, w, b, state):
    return g(F.linear(x, w, b), state)


def row_raw_all_reduce(x, w, b, state):
    y = F.linear(x, w)
    dist.all_reduce(y, group=state.tp_group)  # no autograd Function: invisible to backward
    return y + b


def row_no_reduce(x, w, b, state):
    return F.linear(x, w, b)


def row_no_bias(x, w, b, state):
    return g(F.linear(x, w), state)


def row_with_g_both_ways(x, w, b, state):
    return GReducesBackward.apply(F.linear(x, w), state) + b


def row_no_group(x, w, b, state):
    return GNoGroup.apply(F.linear(x, w), state) + b


REFERENCE = r"that is the reference itself \(.*\), not your own solution"
NO_GROUP = r"without group=state.tp_group — it runs over every rank"
BATTERY = [
    ("01.1", "identity both ways", FNoBackwardReduce, r"f's backward returned the gradient unchanged"),
    ("01.1", "all-reduce without group=", FNoGroup, NO_GROUP),
    ("01.1", "all-reduce in forward too", FReducesForward, r"f's forward all-reduced x: the output is tp × x"),
    ("01.1", "mean instead of sum", FAverages, r"the gradient is the MEAN over the TP group"),
    ("01.1", "backward returns one gradient", FOneGradient, r"backward must return one gradient per input"),
    ("01.1", "the package's f", mappings._CopyToModelParallelRegion, REFERENCE),
    ("01.1", "the package's f, renamed", FSubclassOfThePackage, REFERENCE),
    ("01.1", "the package's function", mappings.copy_to_tensor_model_parallel_region, REFERENCE),
    ("01.2", "identity both ways", GNoForwardReduce, r"g's forward returned this rank's partial result"),
    ("01.2", "all-reduce in backward too", GReducesBackward, r"g's backward all-reduced too: .*2× = tp×"),
    ("01.2", "all-reduce without group=", GNoGroup, NO_GROUP),
    ("01.2", "all-reduce in place", GInPlace, r"modified its input in place"),
    ("01.2", "mean instead of sum", GAverages, r"the output is the MEAN of the partials"),
    ("01.2", "the package's g", mappings._ReduceFromModelParallelRegion, REFERENCE),
    ("01.3", "no all-gather", column_no_gather, r"the output is this rank's slice \(…, out/tp\): all-gather"),
    ("01.3", "x not through f", column_without_f, r"x's gradient holds only this rank's share"),
    ("01.3", "slices reversed", column_reversed, r"the gathered slices are in the wrong order"),
    ("01.3", "raw dist.all_gather", column_raw_all_gather, r"a raw dist.all_gather on a tensor autograd tracks"),
    ("01.3", "detached output", column_detached, r"not connected to the inputs' autograd graph"),
    ("01.4", "bias before the all-reduce", row_bias_before_reduce, r"the bias was added on every rank before "
                                                                   r"the all-reduce: it is counted tp times"),
    ("01.4", "raw dist.all_reduce in forward", row_raw_all_reduce, r"a raw dist.all_reduce on a tensor autograd "
                                                                   r"tracks .*no backward"),
    ("01.4", "no all-reduce", row_no_reduce, r"the partial products were not summed"),
    ("01.4", "no bias", row_no_bias, r"the bias is missing"),
    ("01.4", "g all-reduces in backward too", row_with_g_both_ways, r"tp× \(2× = tp×\) too large: your g "
                                                                    r"all-reduces in backward too"),
    ("01.4", "g without group=", row_no_group, NO_GROUP),
]
