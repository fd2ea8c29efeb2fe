"""ring_all_reduce and all_reduce_via_reduce_scatter_all_gather agree with dist.all_reduce on real ranks."""
import pytest
import torch
import torch.distributed as dist

from minimegatron.collectives import (all_reduce_via_reduce_scatter_all_gather, plot_rank_data,
                                      ring_all_reduce, ring_bytes_per_rank)
from minimegatron.launch import RankError, launch

IMPLEMENTATIONS = {"ring": ring_all_reduce, "rs+ag": all_reduce_via_reduce_scatter_all_gather}
SHAPES = [(1,), (5,), (7,), (12,), (3, 5), (2, 3, 4), (1000,), ()]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32]


def _all_cases():
    """Every rank: each implementation on every (shape, dtype), next to dist.all_reduce of the same x."""
    rank = dist.get_rank()
    out = []
    for shape in SHAPES:
        for dtype in DTYPES:
            g = torch.Generator().manual_seed(1000 * rank + len(out))
            # small integers: every dtype holds them and their sums exactly, in any order of addition
            x = torch.randint(-8, 9, shape, generator=g).to(dtype)
            expected = x.clone()
            dist.all_reduce(expected)
            for name, fn in IMPLEMENTATIONS.items():
                before = x.clone()
                got = fn(x)
                assert torch.equal(x, before), f"{name} modified its input"
                out.append((f"{name} {shape} {dtype}", got, expected))
    x = torch.randn(333, generator=torch.Generator().manual_seed(rank))  # real floats: order matters
    expected = x.clone()
    dist.all_reduce(expected)
    out += [(f"{name} randn", fn(x), expected) for name, fn in IMPLEMENTATIONS.items()]
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_matches_dist_all_reduce(world_size):
    for rank, cases in enumerate(launch(_all_cases, world_size, timeout=60)):
        for name, got, expected in cases:
            assert got.shape == expected.shape and got.dtype == expected.dtype, (rank, name)
            if "randn" in name:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
            else:
                assert torch.equal(got, expected), f"rank {rank} {name}: {got} != {expected}"


def test_empty_tensor_is_returned_unchanged():
    def body():
        x = torch.empty(0, 3)
        return [fn(x).shape for fn in IMPLEMENTATIONS.values()]

    assert launch(body, 2, timeout=30) == [[torch.Size([0, 3])] * 2] * 2


def test_subgroups_use_their_own_ranks():
    """Groups [3, 1] and [0, 2, 3]: group ranks are not global ranks, and only members take part."""
    def body():
        rank = dist.get_rank()
        x = torch.arange(10.0) * (rank + 1)
        out = {}
        for members in ([3, 1], [0, 2, 3]):
            group = dist.new_group(members)  # every rank must call new_group, member or not
            if rank in members:
                expected = x.clone()
                dist.all_reduce(expected, group=group)
                out[tuple(members)] = [(fn(x, group=group), expected) for fn in IMPLEMENTATIONS.values()]
        return out

    results = launch(body, 4, timeout=60)
    for members, factor in (((3, 1), 4 + 2), ((0, 2, 3), 1 + 3 + 4)):
        for rank in range(4):
            if rank in members:
                for got, expected in results[rank][members]:
                    assert torch.equal(got, expected)
                    assert torch.equal(got, torch.arange(10.0) * factor)
            else:
                assert members not in results[rank]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_sends_2_n_minus_1_over_n_bytes(world_size):
    """Count the bytes the ring really hands to isend; compare with 2(N-1)/N · B."""
    def body():
        sent = []
        real = dist.batch_isend_irecv

        def counting(ops):  # a spy: records what is sent, then does the real communication
            sent.extend(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            return real(ops)

        dist.batch_isend_irecv = counting
        try:
            ring_all_reduce(torch.ones(1200))
        finally:
            dist.batch_isend_irecv = real
        return sum(sent)

    nbytes = 1200 * 4
    assert launch(body, world_size, timeout=30) == [ring_bytes_per_rank(nbytes, world_size)] * world_size
    assert ring_bytes_per_rank(nbytes, world_size) == 2 * (world_size - 1) / world_size * nbytes


def test_outside_a_process_group_the_error_says_to_use_launch():
    with pytest.raises(RuntimeError, match=r"initialized process group.*launch"):
        ring_all_reduce(torch.ones(4))
    with pytest.raises(RuntimeError, match=r"initialized process group.*launch"):
        all_reduce_via_reduce_scatter_all_gather(torch.ones(4))


def test_bad_inputs_are_named():
    def not_a_tensor():
        ring_all_reduce([1.0, 2.0])

    with pytest.raises(RankError, match="expects a torch.Tensor, got list"):
        launch(not_a_tensor, 2, timeout=30)

    def not_a_member():
        group = dist.new_group([0])
        if dist.get_rank() == 1:
            ring_all_reduce(torch.ones(3), group=group)

    with pytest.raises(RankError, match=r"rank \(1\) is not a member of the group"):
        launch(not_a_member, 2, timeout=30)
    with pytest.raises(ValueError, match="unknown collective 'broadcast'"):
        ring_bytes_per_rank(10, 2, "broadcast")


def test_plot_rank_data_draws_one_panel_per_stage():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_rank_data({"before": [torch.arange(2.0), torch.arange(2.0) + 2],
                          "after": [torch.arange(4.0)] * 2}, title="all-gather")
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "after"
    assert len(fig.axes[1].texts) == 8  # every value is written in its cell
    plt.close(fig)
