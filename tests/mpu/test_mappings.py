"""Each mapping against the dense computation on real gloo ranks, TP = 1, 2, 4: values and gradients.

How a test reads: every rank builds the same random tensors. A "TP region" downstream of a mapping is
modelled by a per-rank loss L_r = <y_r, c_r>, the total loss being Σ_r L_r; a replicated downstream
by the same loss <y, c> on every rank. The gradient each rank gets must be the gradient of the total.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from minimegatron.launch import launch
from minimegatron.mpu import mappings as m
from minimegatron.mpu.state import ParallelState, initialize_model_parallel


def close(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=lambda e: f"{what}: {e}")


def leaf(t):
    return t.detach().clone().requires_grad_()


def _check_mappings(tp):
    st = initialize_model_parallel(tp)  # on 4 ranks: dp = 4 / tp, so several TP groups at once
    r = st.tp_rank
    g = torch.Generator().manual_seed(10 + tp)
    s, b, h = 8, 2, 12
    x_full = torch.randn(s, b, h, generator=g)
    per_rank = torch.randn(tp, s, b, h, generator=g)  # a different tensor for each TP rank
    c = torch.randn(s, b, h, generator=g)
    total = per_rank.sum(0)

    # f: identity forward; backward sums the per-rank gradients
    x = leaf(x_full)
    y = m.copy_to_tensor_model_parallel_region(x, st)
    close(y, x_full, "copy_to fwd")
    (y * per_rank[r]).sum().backward()
    close(x.grad, total, "copy_to bwd")

    # g: all-reduce forward; backward passes the replicated gradient through
    x = leaf(per_rank[r])
    y = m.reduce_from_tensor_model_parallel_region(x, st)
    close(y, total, "reduce_from fwd")
    (y * c).sum().backward()
    close(x.grad, c, "reduce_from bwd")

    # split / gather along the last dim
    x = leaf(x_full)
    y = m.scatter_to_tensor_model_parallel_region(x, st)
    close(y, x_full.chunk(tp, -1)[r], "scatter_to fwd")
    (y * c.chunk(tp, -1)[r]).sum().backward()
    close(x.grad, c, "scatter_to bwd")

    x = leaf(x_full.chunk(tp, -1)[r])
    y = m.gather_from_tensor_model_parallel_region(x, st)
    close(y, x_full, "gather_from fwd")
    (y * c).sum().backward()
    close(x.grad, c.chunk(tp, -1)[r], "gather_from bwd")

    # sequence parallel: split / all-gather / reduce-scatter along dim 0
    x = leaf(x_full)
    y = m.scatter_to_sequence_parallel_region(x, st)
    close(y, x_full.chunk(tp, 0)[r], "scatter_to_sequence fwd")
    (y * c.chunk(tp, 0)[r]).sum().backward()
    close(x.grad, c, "scatter_to_sequence bwd")

    x = leaf(x_full.chunk(tp, 0)[r])
    y = m.gather_from_sequence_parallel_region(x, st)  # consumer is tensor-parallel
    close(y, x_full, "gather_from_sequence fwd")
    (y * per_rank[r]).sum().backward()
    close(x.grad, total.chunk(tp, 0)[r], "gather_from_sequence bwd (reduce-scatter)")

    x = leaf(x_full.chunk(tp, 0)[r])
    y = m.gather_from_sequence_parallel_region(x, st, tensor_parallel_output_grad=False)
    (y * c).sum().backward()  # consumer is replicated
    close(x.grad, c.chunk(tp, 0)[r], "gather_from_sequence bwd (split)")

    x = leaf(per_rank[r])
    y = m.reduce_scatter_to_sequence_parallel_region(x, st)
    close(y, total.chunk(tp, 0)[r], "reduce_scatter fwd")
    (y * c.chunk(tp, 0)[r]).sum().backward()
    close(x.grad, c, "reduce_scatter bwd")

    # f on a replicated weight applied to this rank's tokens only (a norm's γ under SP): the weight's
    # gradient is each rank's partial sum, and f's backward adds them up over the TP group
    w = nn.Parameter(torch.ones(h))
    (m.copy_to_tensor_model_parallel_region(w, st) * per_rank[r]).sum().backward()
    torch.testing.assert_close(w.grad, total.sum((0, 1)), rtol=1e-5, atol=1e-5)  # Σ_r of the partials


def _all_cases():
    for tp in (1, 2, 4):
        _check_mappings(tp)
    st = initialize_model_parallel(4)
    errors = []
    for fn, shape in ((m.scatter_to_tensor_model_parallel_region, (4, 10)),
                      (m.scatter_to_sequence_parallel_region, (6, 2, 8)),
                      (m.reduce_scatter_to_sequence_parallel_region, (6, 2, 8))):
        try:
            fn(torch.zeros(shape), st)
        except ValueError as e:
            errors.append(str(e))
    t = torch.ones(1)  # the errors came before any collective: the ranks are still in step
    dist.all_reduce(t)
    return errors, t.item()


def test_mappings_match_dense_tp_1_2_4():
    for errors, total in launch(_all_cases, 4, timeout=120):
        assert total == 4
        assert len(errors) == 3
        assert "last dim=10 is not divisible by tensor-parallel size 4" in errors[0]
        assert "sequence length (dim 0)=6 is not divisible by tensor-parallel size 4" in errors[1]
        assert "multiple of 4" in errors[2]


def test_identity_at_tp_1_without_distributed():
    x = torch.randn(4, 2, 6)
    st = ParallelState()
    for fn in (m.copy_to_tensor_model_parallel_region, m.reduce_from_tensor_model_parallel_region,
               m.scatter_to_tensor_model_parallel_region, m.gather_from_tensor_model_parallel_region,
               m.scatter_to_sequence_parallel_region, m.gather_from_sequence_parallel_region,
               m.reduce_scatter_to_sequence_parallel_region):
        assert fn(x, st) is x


def test_divide_names_sizes_and_fix():
    assert m.divide(12, 4) == 3
    with pytest.raises(ValueError, match=r"hidden=10 is not divisible by tensor-parallel size 4.*multiple of 4"):
        m.divide(10, 4, "hidden")
