"""Exercises 05.1–05.2: the package passes its graders; stubs and typical mistakes fail precisely."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from exercises import ex05_sequence_parallel as ex05
from exercises.grading import GradingError
from minimegatron.mpu import mappings


def test_references_pass():
    assert ex05.grade_gather_from_sequence_parallel(mappings.gather_from_sequence_parallel_region
                                                    ).startswith("✓")
    assert ex05.grade_sequence_parallel_row_linear(ex05.package_sequence_parallel_row_linear
                                                   ).startswith("✓")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 05.1"):
        ex05.grade_gather_from_sequence_parallel(ex05.GatherFromSequenceParallelRegion)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 05.2"):
        ex05.grade_sequence_parallel_row_linear(ex05.sequence_parallel_row_linear)


def _gather(x, group, tp):
    out = torch.empty((tp * x.size(0), *x.shape[1:]), dtype=x.dtype)
    ex05.all_gather_single(out, x.contiguous(), group=group)
    return out


class _SplitBackward(torch.autograd.Function):
    """A typical mistake: backward keeps this rank's rows of its own gradient instead of summing."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return _gather(x, state.tp_group, state.tp)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.state.tp)[ctx.state.tp_rank].contiguous(), None


class _DefaultGroup(torch.autograd.Function):
    """Correct on tp = world, wrong with two TP groups: the collectives use the default group."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return _gather(x, None, dist.get_world_size())

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty((grad.size(0) // dist.get_world_size(), *grad.shape[1:]))
        ex05.reduce_scatter_single(out, grad.contiguous())
        return out, None


class _AllReduceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return _gather(x, state.tp_group, state.tp)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.state.tp_group)
        return grad, None


def test_split_instead_of_reduce_scatter_is_explained():
    with pytest.raises(GradingError, match=r"world 2, tp=2\), rank 0: ∂L/∂x is only this rank's rows "
                                           r"of its \*own\* ∂L/∂X \(a split\)"):
        ex05.grade_gather_from_sequence_parallel(_SplitBackward)


def test_all_reduce_backward_is_a_wrong_shape():
    with pytest.raises(GradingError, match=r"reduce-SCATTER \(sum, then keep this rank's rows\)"):
        ex05.grade_gather_from_sequence_parallel(_AllReduceBackward)


def test_default_group_is_caught_with_two_tp_groups():
    with pytest.raises(GradingError, match=r"world 4, tp=2\).*pass group=state.tp_group"):
        ex05.grade_gather_from_sequence_parallel(_DefaultGroup)


def test_gathering_the_last_dim_is_named():
    def last_dim(x, state):
        return mappings.gather_from_tensor_model_parallel_region(x, state)
    with pytest.raises(GradingError, match="you gathered the last dim"):
        ex05.grade_gather_from_sequence_parallel(last_dim)


def _row(x, w, b, state, bias_first=False, all_reduce=False, f_on_bias=True):
    y = F.linear(x, w, b if bias_first else None)
    if all_reduce:  # same numbers, twice the bytes
        y = mappings.scatter_to_sequence_parallel_region(
            mappings.reduce_from_tensor_model_parallel_region(y, state), state)
    else:
        y = mappings.reduce_scatter_to_sequence_parallel_region(y, state)
    if f_on_bias:
        b = mappings.copy_to_tensor_model_parallel_region(b, state)
    return y if bias_first else y + b


def test_a_hand_written_row_layer_with_f_on_the_bias_passes():
    assert ex05.grade_sequence_parallel_row_linear(_row).startswith("✓")


def test_row_bias_without_f_is_a_partial_gradient_and_named():
    with pytest.raises(GradingError, match=r"bias gradient is only this rank's partial sum over its s/tp "
                                           r"rows.*pass it through f \(copy_to_tensor_model_parallel_region\)"):
        ex05.grade_sequence_parallel_row_linear(lambda *a: _row(*a, f_on_bias=False))


def test_row_bias_before_the_reduce_scatter_is_named():
    with pytest.raises(GradingError, match="bias went in before the reduce-scatter and was summed 2 times"):
        ex05.grade_sequence_parallel_row_linear(lambda *a: _row(*a, bias_first=True))


def test_row_all_reduce_then_split_is_caught_by_the_byte_count():
    with pytest.raises(GradingError, match=r"the values are right, but the forward ran 1× all_reduce.*"
                                           r"twice the bytes"):
        ex05.grade_sequence_parallel_row_linear(lambda *a: _row(*a, all_reduce=True))


def test_row_without_scatter_is_a_wrong_shape():
    def no_scatter(x, w, b, state):
        return mappings.reduce_from_tensor_model_parallel_region(F.linear(x, w), state) + b
    with pytest.raises(GradingError, match="each rank keeps only its s/tp rows of Y"):
        ex05.grade_sequence_parallel_row_linear(no_scatter)
