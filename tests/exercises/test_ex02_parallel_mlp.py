"""Exercises 02.1–02.2: the package passes its graders; stubs and typical mistakes fail precisely."""
import pytest
import torch
import torch.nn.functional as F

from exercises import ex02_parallel_mlp as ex02
from exercises.grading import GradingError
from minimegatron.mpu.layers import shard_weight
from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region,
                                       reduce_from_tensor_model_parallel_region)


def _mlp(x, w1, b1, w2, b2, state, f=True, bias_after_g=True, approximate="tanh"):
    if f:
        x = copy_to_tensor_model_parallel_region(x, state)
    y = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, None if bias_after_g else b2)
    y = reduce_from_tensor_model_parallel_region(y, state)
    return y + b2 if bias_after_g else y


def test_references_pass():
    assert ex02.grade_parallel_mlp_forward(ex02.package_parallel_mlp_forward).startswith("✓")
    assert ex02.grade_fused_qkv_rows(lambda h, r, tp: shard_weight(torch.arange(3 * h), 0, r, tp, 3)
                                     ).startswith("✓")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 02.1"):
        ex02.grade_parallel_mlp_forward(ex02.parallel_mlp_forward)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 02.2"):
        ex02.grade_fused_qkv_rows(ex02.fused_qkv_rows)


def test_missing_f_is_a_wrong_gradient_of_x_at_tp2():
    with pytest.raises(GradingError, match=r"tp=2, rank 0, gradient of x \(x must enter the TP region "
                                           r"through f.*wrong values"):
        ex02.grade_parallel_mlp_forward(lambda *a: _mlp(*a, f=False))


def test_bias_added_on_every_rank_is_named():
    with pytest.raises(GradingError, match="b2 was added 2 times; add it once, after the all-reduce"):
        ex02.grade_parallel_mlp_forward(lambda *a: _mlp(*a, bias_after_g=False))


def test_exact_gelu_instead_of_tanh_is_a_wrong_output():
    with pytest.raises(GradingError, match=r"tp=1, rank 0, forward output Y = GeLU_tanh.*wrong values"):
        ex02.grade_parallel_mlp_forward(lambda *a: _mlp(*a, approximate="none"))


def test_contiguous_qkv_block_is_explained():
    with pytest.raises(GradingError, match="one contiguous block of 3h/tp rows; with stride 3"):
        ex02.grade_fused_qkv_rows(lambda h, r, tp: torch.arange(r * 3 * h // tp, (r + 1) * 3 * h // tp))
