"""Exercise 05's battery: plausible wrong solutions, each with the message its grader must give.

(name, candidate, message regex) for 05.1 and 05.2; each graded by the public grader (most fail on
the first layout, one launch of 2 ranks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from exercises.ex05_sequence_parallel import all_gather_single, reduce_scatter_single
from minimegatron.mpu import mappings


def gather(x, group, tp):
    out = torch.empty((tp * x.size(0), *x.shape[1:]), dtype=x.dtype)
    all_gather_single(out, x.contiguous(), group=group)
    return out


class Gather(torch.autograd.Function):
    """A correct 05.1 whose forward and backward the mistakes override."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return gather(x, state.tp_group, state.tp)

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty((grad.size(0) // ctx.state.tp, *grad.shape[1:]), dtype=grad.dtype)
        reduce_scatter_single(out, grad.contiguous(), group=ctx.state.tp_group)
        return out, None


class SplitBackward(Gather):
    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.state.tp)[ctx.state.tp_rank].contiguous(), None


class DefaultGroup(Gather):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return gather(x, None, dist.get_world_size())

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty((grad.size(0) // dist.get_world_size(), *grad.shape[1:]))
        reduce_scatter_single(out, grad.contiguous())
        return out, None


class AllReduceBackward(Gather):
    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.state.tp_group)
        return grad, None


class NoGather(Gather):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return x.clone()


class Reversed(Gather):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return torch.cat(gather(x, state.tp_group, state.tp).chunk(state.tp)[::-1])


def last_dim(x, state):
    return mappings.gather_from_tensor_model_parallel_region(x, state)


GATHER_BATTERY = [
    ("split instead of reduce-scatter", SplitBackward, r"∂L/∂x is only this rank's rows of its \*own\* ∂L/∂X "
                                                       r"\(a split\)"),
    ("all-reduce in backward", AllReduceBackward, r"reduce-SCATTER \(sum, then keep this rank's rows\)"),
    ("the default group", DefaultGroup, r"with 4 ranks and tp=2 there are 2 TP groups: pass "
                                            r"group=state.tp_group"),
    ("the last dim gathered", last_dim, r"you gathered the last dim"),
    ("no all-gather", NoGather, r"the output is this rank's own rows"),
    ("reverse rank order", Reversed, r"the gathered rows are in reverse rank order"),
]


# --- 05.2 ----------------------------------------------------------------------------------------------

def row(x, w, b, state, *, bias_first=False, all_reduce=False, f_on_bias=True, scatter="package"):
    """The SP row layer with the usual mistakes as switches (the defaults are right)."""
    y = F.linear(x, w, b if bias_first else None)
    if all_reduce:  # same numbers, twice the bytes
        y = mappings.scatter_to_sequence_parallel_region(mappings.reduce_from_tensor_model_parallel_region(y, state),
                                                         state)
    elif scatter == "package":
        y = mappings.reduce_scatter_to_sequence_parallel_region(y, state)
    elif scatter == "raw":  # no autograd
        out = torch.empty((y.size(0) // state.tp, *y.shape[1:]))
        reduce_scatter_single(out, y.detach().contiguous(), group=state.tp_group)
        y = out
    elif scatter == "none":
        y = mappings.reduce_from_tensor_model_parallel_region(y, state)
    if f_on_bias:
        b = mappings.copy_to_tensor_model_parallel_region(b, state)
    return y if bias_first else y + b


def row_with(**switches):
    def sequence_parallel_row_linear(x, w, b, state):
        return row(x, w, b, state, **switches)
    return sequence_parallel_row_linear


ROW_BATTERY = [
    ("bias without f", row_with(f_on_bias=False), r"bias gradient is only this rank's partial sum over its s/tp "
                                                  r"rows.*pass it through f \(copy_to_tensor_model_parallel_region\)"),
    ("bias before the reduce-scatter", row_with(bias_first=True), r"bias went in before the reduce-scatter and was "
                                                                  r"summed 2 times"),
    ("all-reduce then split", row_with(all_reduce=True), r"the values are right, but the forward ran 1× all_reduce"
                                                         r".*twice the bytes"),
    ("no reduce-scatter", row_with(scatter="none"), r"each rank keeps only its s/tp rows of Y"),
    ("raw reduce-scatter", row_with(scatter="raw"), r"no gradient reached x, only the bias's — the "
                                                    r"reduce-scatter is not in the autograd graph"),
]
