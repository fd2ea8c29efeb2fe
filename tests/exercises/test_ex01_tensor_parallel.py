"""Exercises 01.1–01.4: references pass their graders; untouched stubs and typical mistakes fail precisely."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from exercises import ex01_tensor_parallel as ex01
from exercises.grading import GradingError
from minimegatron.mpu import mappings


def test_references_pass():
    assert ex01.grade_copy_to(mappings._CopyToModelParallelRegion).startswith("✓")
    assert ex01.grade_reduce_from(mappings.reduce_from_tensor_model_parallel_region).startswith("✓")
    assert ex01.grade_column_parallel_linear(ex01.reference_column_parallel_linear).startswith("✓")
    assert ex01.grade_row_parallel_linear(ex01.reference_row_parallel_linear).startswith("✓")


def test_untouched_stubs_fail_with_not_implemented():
    for grade, stub, number in ((ex01.grade_copy_to, ex01.CopyToTensorParallelRegion, "01.1"),
                                (ex01.grade_reduce_from, ex01.ReduceFromTensorParallelRegion, "01.2"),
                                (ex01.grade_column_parallel_linear, ex01.column_parallel_linear, "01.3"),
                                (ex01.grade_row_parallel_linear, ex01.row_parallel_linear, "01.4")):
        with pytest.raises(GradingError, match=f"not implemented yet.*Exercise {number}"):
            grade(stub)


class _IdentityBothWays(torch.autograd.Function):
    """A typical mistake for f: forgetting the all-reduce in backward."""

    @staticmethod
    def forward(ctx, x, state):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _InPlaceReduce(torch.autograd.Function):
    """g that all-reduces its input in place: right values, but the caller's tensor is clobbered."""

    @staticmethod
    def forward(ctx, x, state):
        dist.all_reduce(x, group=state.tp_group)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def test_f_without_backward_all_reduce_is_a_wrong_gradient():
    with pytest.raises(GradingError, match=r"Exercise 01.1, rank 0, backward: gradient of x .*f's backward "
                                           r"all-reduces.*wrong values — max abs error"):
        ex01.grade_copy_to(_IdentityBothWays)


def test_in_place_all_reduce_is_named():
    with pytest.raises(GradingError, match=r"modified its input in place.*x = x.clone\(\)"):
        ex01.grade_reduce_from(_InPlaceReduce)


def test_bias_added_before_the_reduction_is_wrong_values():
    def bias_twice(x_shard, weight_shard, bias, state):
        return mappings.reduce_from_tensor_model_parallel_region(F.linear(x_shard, weight_shard, bias), state)

    with pytest.raises(GradingError, match=r"Exercise 01.4, rank 0, forward output \(all-reduce the partial "
                                           r"products, then add the bias once\): wrong values"):
        ex01.grade_row_parallel_linear(bias_twice)


def test_column_without_gather_is_a_wrong_shape_and_detach_is_named():
    def no_gather(x, w, b, state):
        return F.linear(mappings.copy_to_tensor_model_parallel_region(x, state), w, b)

    with pytest.raises(GradingError, match=r"wrong shape \(4, 3, 3\), expected \(4, 3, 6\)"):
        ex01.grade_column_parallel_linear(no_gather)

    def detached(x, w, b, state):
        return ex01.reference_column_parallel_linear(x, w, b, state).detach()

    with pytest.raises(GradingError, match="not connected to the inputs' autograd graph"):
        ex01.grade_column_parallel_linear(detached)
