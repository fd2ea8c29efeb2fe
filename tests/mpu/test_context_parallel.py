"""Context-parallel attention against the dense causal attention on real gloo ranks, cp = 2, 4.

Every rank builds the same whole q, k, v and output weights c, takes its zig-zag piece, runs ring
(p2p) or all-to-all (a2a) attention, and backpropagates its share of the loss <out, c>. The outputs
(gathered) and the q/k/v gradients (gathered: each token's gradient lives on the rank holding it)
must equal the dense ones, fp32, tight tolerance; MHA, GQA and MQA.
"""
import pytest
import torch

from minimegatron import kernels
from minimegatron.launch import launch
from minimegatron.mpu import context_parallel as C
from minimegatron.mpu.ring_attention import RingStep, attention_block, merge_partial, ring_attention, ring_schedule
from minimegatron.mpu.state import initialize_model_parallel

S, B, D = 16, 2, 8


def close(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda e: f"{what}: {e}")


def _inputs(n, kv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, c = (torch.randn(S, B, h, D, generator=g) for h in (n, kv, kv, n))  # (s, b, heads, d)
    return q, k, v, c


def _dense(q, k, v, c):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernels.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in leaves), causal=True,
                                               fused=False).permute(2, 0, 1, 3)  # (s, b, n, d)
    (out * c).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _check_cp_attention(cp, comm, n, kv, engine):
    state = initialize_model_parallel(context_parallel_size=cp, cp_comm=comm)
    q, k, v, c = _inputs(n, kv)
    out_ref, grads_ref = _dense(q, k, v, c)
    local = [C.split_for_context_parallel(t, state, dim=0).clone().requires_grad_() for t in (q, k, v)]
    if comm == "a2a":
        out = C.ulysses_attention(*local, state, engine=engine, fused=False)
    else:
        out = C.context_parallel_attention(*local, state)
    (out * C.split_for_context_parallel(c, state, dim=0)).sum().backward()
    close(C.gather_from_context_parallel(out.detach(), state, dim=0), out_ref, f"{comm} output")
    for name, t, ref in zip("qkv", local, grads_ref):
        close(C.gather_from_context_parallel(t.grad, state, dim=0), ref, f"{comm} d{name}")
    return True


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("comm,engine", [("p2p", None), ("a2a", "ours"), ("a2a", "deepspeed")])
@pytest.mark.parametrize("n,kv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_context_parallel_attention_matches_dense(cp, comm, engine, n, kv):
    assert launch(_check_cp_attention, cp, cp, comm, n, kv, engine) == [True] * cp


def _check_contiguous_ring(cp):
    state = initialize_model_parallel(context_parallel_size=cp)
    q, k, v, c = _inputs(4, 2, seed=3)
    out_ref, grads_ref = _dense(q, k, v, c)
    idx = C.context_parallel_index(S, state.cp_rank, cp, layout="contiguous")
    local = [t.index_select(0, idx).permute(1, 2, 0, 3).clone().requires_grad_() for t in (q, k, v)]
    timeline = []
    out = ring_attention(*local, state.cp_group, state.cp_ranks, state.cp_rank, layout="contiguous",
                         timeline=timeline)
    (out * c.index_select(0, idx).permute(1, 2, 0, 3)).sum().backward()
    close(out.permute(2, 0, 1, 3), out_ref.index_select(0, idx), "contiguous output")
    for t, ref in zip(local, grads_ref):
        close(t.grad.permute(2, 0, 1, 3), ref.index_select(0, idx), "contiguous grad")
    return [e["scores"] for e in timeline]


def test_naive_contiguous_ring_is_exact_but_unbalanced():
    cp, c = 4, S // 4
    work = launch(_check_contiguous_ring, cp, cp)
    # rank i: one diagonal block c(c+1)/2 and i full blocks c², in step order
    for i, steps in enumerate(work):
        assert sum(steps) == c * (c + 1) // 2 + i * c * c


def test_zigzag_schedule_balances_the_causal_work():
    for cp in (2, 4, 8):
        s = 4 * cp
        local = s // cp
        per_rank = [sum(st.scores(local) for st in ring_schedule(r, cp)) for r in range(cp)]
        assert len(set(per_rank)) == 1, per_rank  # every rank the same work
        # every causal (q, k) pair is computed exactly once, over all ranks and steps
        pairs = torch.zeros(s, s, dtype=torch.int64)
        for r in range(cp):
            pos = C.context_parallel_index(s, r, cp)
            for st in ring_schedule(r, cp):
                src = C.context_parallel_index(s, st.source, cp)
                qp = {"all": pos, "second": pos[local // 2:], "none": pos[:0]}[st.q]
                kp = src if st.kv == "all" else src[:local // 2]
                for i in qp:
                    for j in kp:
                        if not st.causal or j <= i:
                            pairs[i, j] += 1
        assert torch.equal(pairs, torch.ones(s, s, dtype=torch.int64).tril()), f"cp={cp}"
        # and no block wastes work on a fully masked pair outside the diagonal step
        for r in range(cp):
            assert all(st.causal == (st.source == r) for st in ring_schedule(r, cp))


def test_log_sum_exp_merge_is_exact():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 1, 5, 4, generator=g), torch.randn(1, 2, 9, 4, generator=g), \
        torch.randn(1, 2, 9, 4, generator=g)
    whole, lse = attention_block(q * 30, k, v, False, 1.0)  # large scores: the max matters
    a = attention_block(q * 30, k[:, :, :4], v[:, :, :4], False, 1.0)
    b = attention_block(q * 30, k[:, :, 4:], v[:, :, 4:], False, 1.0)
    merged, merged_lse = merge_partial(*a, *b)
    close(merged, whole, "merged output")
    close(merged_lse, lse, "merged lse")
    assert torch.isfinite(merged).all()


def test_ring_step_table():
    assert ring_schedule(1, 4)[0] == RingStep(1, 0, 1, "all", "all", True)
    assert ring_schedule(1, 4)[1] == RingStep(1, 1, 0, "all", "first", False)  # j < i
    assert ring_schedule(1, 4)[2] == RingStep(1, 2, 3, "second", "all", False)  # j > i
    with pytest.raises(ValueError, match="zigzag"):
        ring_schedule(0, 2, layout="diagonal")


def test_split_needs_2cp_chunks():
    with pytest.raises(ValueError, match="multiple of 8"):
        C.context_parallel_split(12, 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        C.context_parallel_split(20, 2, tp=4, sequence_parallel=True)
    assert C.context_parallel_index(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert C.context_parallel_index(8, 1, 2).tolist() == [2, 3, 4, 5]
