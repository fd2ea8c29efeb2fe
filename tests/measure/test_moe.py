"""MoE numbers: the all-to-all bytes CommCounter sees on gloo ranks = the exact count for the routing
used and = the uniform formula for uniform routing; dropped fractions vs a simulation."""
import matplotlib
import pytest
import torch

from minimegatron.launch import launch
from minimegatron.measure.moe import (MoECommCounter, dropped_fraction, expected_dropped_fraction,
                                      expert_capacity, moe_a2a_comm, plot_expert_load, routing_a2a_comm)
from minimegatron.mpu.expert_parallel import AllToAllDispatcher
from minimegatron.mpu.state import initialize_model_parallel

N, H, E, K = 8, 4, 8, 2


def _routing(kind: str, ep: int):
    """(ep, n, k) expert ids and keep: uniform (every expert N·k/E slots from every rank) or skewed."""
    if kind == "uniform":
        experts = (torch.arange(N * K).view(N, K) % E).expand(ep, N, K).clone()
        return experts, torch.ones(ep, N, K, dtype=torch.bool)
    g = torch.Generator().manual_seed(7)
    experts = (torch.rand(ep, N, K, generator=g) ** 3 * E).long()  # skewed to low ids (rank 0)
    keep = torch.rand(ep, N, K, generator=g) > 0.2
    return experts, keep


def _count_on_ranks():
    st = initialize_model_parallel(expert_model_parallel_size=4)   # 4 ranks: dp 4, ep 4
    out = {}
    for kind in ("uniform", "skewed"):
        experts, keep = _routing(kind, st.ep)
        x = torch.randn(N, H, requires_grad=True)
        probs = torch.rand(N, K, requires_grad=True)
        disp = AllToAllDispatcher(E, st)
        with MoECommCounter() as comm:
            with comm.phase("forward"):
                rows, _ = disp.dispatch(x, experts[st.ep_rank], keep[st.ep_rank])
                y = disp.combine(rows * 2.0, probs)
            with comm.phase("backward"):
                y.sum().backward()
        out[kind] = dict(totals=comm.totals(by_phase=True), off=dict(comm.off_rank_bytes))
    return out


def test_comm_counter_equals_routing_and_uniform_formulas():
    results = launch(_count_on_ranks, 4, timeout=120)
    uniform = moe_a2a_comm(N, K, H, ep=4, num_experts=E)
    for rank, res in enumerate(results):
        for kind in ("uniform", "skewed"):
            exact = routing_a2a_comm(*_routing(kind, 4), num_experts=E, hidden=H, ep_rank=rank)
            got = res[kind]["totals"]
            assert set(got) == set(exact["totals"]), (rank, kind)
            for key, total in exact["totals"].items():
                assert (got[key].count, got[key].bytes) == (total.count, total.bytes), (rank, kind, key)
            assert res[kind]["off"] == exact["off_rank_bytes"], (rank, kind)
        assert res["uniform"]["totals"] == uniform, rank  # calls, bytes and ring wire bytes
        off = {p: uniform[(p, "all_to_all")].wire_bytes for p in ("forward", "backward")}
        assert res["uniform"]["off"] == off, rank          # the split-exact count agrees
    rows = routing_a2a_comm(*_routing("skewed", 4), num_experts=E, hidden=H, ep_rank=0)["rows"]
    assert rows[:, 0].sum() > rows[:, 3].sum()  # the skew is real: rank 0's experts get the most
    # uniform formula: 2·N·k·h·(ep−1)/ep elements per phase off the rank, plus E·8 count bytes
    assert uniform[("backward", "all_to_all")].wire_bytes == 2 * N * K * H * 4 * 3 // 4


def test_dropped_fraction_vs_simulation_and_plot():
    g = torch.Generator().manual_seed(0)
    tokens, load = 64, torch.tensor([0.4, 0.2, 0.2, 0.1, 0.1, 0.0, 0.0, 0.0])
    for cf in (1.0, 1.5, 2.0):
        cap = expert_capacity(tokens, K, E, cf)
        sims = [dropped_fraction(torch.bincount(torch.multinomial(load, tokens * K, True, generator=g),
                                                minlength=E), cap) for _ in range(400)]
        expected = expected_dropped_fraction(load, tokens, K, cf)
        assert abs(sum(sims) / len(sims) - expected) < 0.01, cf  # the mean's std error is ≈ 0.002
    assert dropped_fraction([5, 1, 0], capacity=2) == 3 / 6
    assert expected_dropped_fraction(torch.full((E,), 1 / E), tokens, K, 1.0) > 0  # spread drops
    assert expected_dropped_fraction(torch.full((E,), 1 / E), tokens, K, E) == 0   # capacity = all
    with pytest.raises(ValueError, match="summing to 1"):
        expected_dropped_fraction([0.5, 0.2], tokens, K, 1.0)
    with pytest.raises(ValueError, match="ep=3 to divide num_experts=8"):
        moe_a2a_comm(N, K, H, ep=3, num_experts=E)
    matplotlib.use("Agg")
    ax = plot_expert_load([5, 1, 0, 2], capacity=2, ep=2)
    assert [p.get_height() for p in ax.patches] == [5, 1, 0, 2]
