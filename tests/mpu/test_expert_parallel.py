"""AllToAllDispatcher on real gloo ranks vs one process computing every rank's tokens through every
expert: the output, ∂x, ∂probs and each expert's weight gradient (summed over edp, ÷ dp), the rows in
the protocol's order, with uneven routing (an expert that receives nothing, a rank that sends nothing)
and capacity-dropped slots."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minimegatron.launch import launch
from minimegatron.mpu.expert_parallel import AllToAllDispatcher, all_to_all
from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region,
                                       reduce_from_tensor_model_parallel_region)
from minimegatron.mpu.state import initialize_model_parallel

N, H, FFN, E, K = 6, 8, 8, 8, 2  # tokens per rank, hidden, expert ffn, experts, top-k


def _case(seed: int, dp: int) -> dict:
    """Every dp rank's tokens and routing, and every expert's weights (the same on every process).
    Expert E-1 is never chosen; dp rank 0 keeps no slot (sends nothing); ~1/4 of the others dropped."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(dp, N, E - 1, generator=g).argsort(-1)[..., :K]  # (dp, n, k) distinct ids
    keep = torch.rand(dp, N, K, generator=g) > 0.25
    keep[0] = False
    return dict(x=torch.randn(dp, N, H, generator=g), experts=experts, keep=keep,
                probs=torch.rand(dp, N, K, generator=g), grad=torch.randn(dp, N, H, generator=g),
                w1=torch.randn(E, FFN, H, generator=g) / H ** 0.5,
                w2=torch.randn(E, H, FFN, generator=g) / FFN ** 0.5)


def _moe_on_ranks(configs):
    out = {}
    for tp, ep, seed in configs:
        st = initialize_model_parallel(tp, expert_model_parallel_size=ep)
        c, d = _case(seed, st.dp), st.dp_rank
        disp = AllToAllDispatcher(E, st)
        lo, L, f = disp.local_expert_offset, disp.num_local_experts, FFN // tp
        cols = slice(st.tp_rank * f, (st.tp_rank + 1) * f)
        w1 = c["w1"][lo:lo + L, cols].clone().requires_grad_()           # (L, ffn/tp, h) column-parallel
        w2 = c["w2"][lo:lo + L, :, cols].clone().requires_grad_()        # (L, h, ffn/tp) row-parallel
        x = c["x"][d].clone().requires_grad_()
        probs = c["probs"][d].clone().requires_grad_()
        rows, counts = disp.dispatch(x, c["experts"][d], c["keep"][d])  # (m, h) expert-major
        ys = []
        for r, l in zip(rows.split(counts), range(L)):
            hidden = F.relu(copy_to_tensor_model_parallel_region(r, st) @ w1[l].T)
            ys.append(reduce_from_tensor_model_parallel_region(hidden @ w2[l].T, st))
        y = disp.combine(torch.cat(ys), probs)
        (y * c["grad"][d]).sum().backward()
        grads = torch.cat([w1.grad.flatten(), w2.grad.flatten()])
        dist.all_reduce(grads, group=st.edp_group)                       # the expert-gradient rule
        grads /= st.dp
        out[(tp, ep, seed)] = dict(d=d, tp_rank=st.tp_rank, lo=lo, rows=rows.detach(), counts=counts,
                                   y=y.detach(), dx=x.grad, dprobs=probs.grad, grads=grads)
    return out


def _reference(seed: int, dp: int):
    """One process, all ranks' tokens through all experts; loss Σ_d <y_d, grad_d>."""
    c = _case(seed, dp)
    w1, w2 = c["w1"].clone().requires_grad_(), c["w2"].clone().requires_grad_()
    x, probs = c["x"].clone().requires_grad_(), c["probs"].clone().requires_grad_()
    y = torch.zeros(dp, N, H)
    for d in range(dp):
        for t in range(N):
            for j in range(K):
                if c["keep"][d, t, j]:
                    e = c["experts"][d, t, j]
                    y[d, t] = y[d, t] + probs[d, t, j] * (F.relu(x[d, t] @ w1[e].T) @ w2[e].T)
    (y * c["grad"]).sum().backward()
    return c, y.detach(), x.grad, probs.grad, w1.grad / dp, w2.grad / dp


def _check(results, configs, world):
    for tp, ep, seed in configs:
        dp = world // tp
        c, y, dx, dprobs, gw1, gw2 = _reference(seed, dp)
        L, f = E // ep, FFN // tp
        for rank, res in enumerate(results):
            r = res[(tp, ep, seed)]
            d, lo, cols = r["d"], r["lo"], slice(r["tp_rank"] * f, (r["tp_rank"] + 1) * f)
            where = f"tp={tp} ep={ep} dp={dp} rank {rank}"
            torch.testing.assert_close(r["y"], y[d], msg=f"{where}: output")
            torch.testing.assert_close(r["dx"], dx[d], msg=f"{where}: ∂x")
            torch.testing.assert_close(r["dprobs"], dprobs[d], msg=f"{where}: ∂probs")
            expected = torch.cat([gw1[lo:lo + L, cols].flatten(), gw2[lo:lo + L, :, cols].flatten()])
            torch.testing.assert_close(r["grads"], expected, msg=f"{where}: expert weight gradients")
            # the rows: expert-major, then (source rank, token, slot), dropped slots never sent
            group = range(d - d % ep, d - d % ep + ep)
            want = [[c["x"][s, t] for s in group for t in range(N) for j in range(K)
                     if c["keep"][s, t, j] and c["experts"][s, t, j] == lo + l] for l in range(L)]
            assert r["counts"] == [len(w) for w in want], where
            flat = sum(want, [])
            expected_rows = torch.stack(flat) if flat else torch.zeros(0, H)
            torch.testing.assert_close(r["rows"], expected_rows, msg=f"{where}: rows")
    empty = [res[(tp, ep, s)]["counts"][-1] for tp, ep, s in configs for res in results
             if res[(tp, ep, s)]["lo"] == E - E // ep]
    assert empty and all(n == 0 for n in empty)  # expert E-1 received nothing, and it worked


def test_all_to_all_dispatcher_ep2():
    configs = [(1, 2, 0), (1, 2, 1)]
    _check(launch(_moe_on_ranks, 2, configs, timeout=120), configs, 2)


def test_all_to_all_dispatcher_ep4_ep2_edp2_and_tp2():
    configs = [(1, 4, 2), (1, 2, 3), (2, 2, 4)]  # ep 4 | ep 2 with edp 2 | tp 2 × ep 2
    _check(launch(_moe_on_ranks, 4, configs, timeout=120), configs, 4)


def _bad_input():
    st = initialize_model_parallel(expert_model_parallel_size=2)
    msgs = []
    for call in (lambda: AllToAllDispatcher(3, st),
                 lambda: AllToAllDispatcher(4, st).dispatch(torch.ones(2, 4), torch.tensor([[0], [9]]),
                                                            torch.ones(2, 1, dtype=torch.bool)),
                 lambda: AllToAllDispatcher(4, st).combine(torch.ones(1, 4), torch.ones(1, 1))):
        try:
            call()
            msgs.append(None)
        except (ValueError, RuntimeError) as e:
            msgs.append(str(e))
    # the bare all-to-all with uneven splits: rank r sends r+1 rows to each peer; backward = reverse
    x = torch.full((2 * (st.rank + 1), 1), float(st.rank), requires_grad=True)
    y = all_to_all(x, [1, 2], [st.rank + 1] * 2, st.ep_group)
    (y * torch.arange(1.0, 4.0).unsqueeze(1)).sum().backward()
    return msgs, y.detach().flatten().tolist(), x.grad.flatten().tolist()


def test_bad_input_and_uneven_all_to_all():
    for rank, (msgs, y, dx) in enumerate(launch(_bad_input, 2, timeout=60)):
        assert "num_experts=3 must be a positive multiple of the expert-parallel size ep=2" in msgs[0]
        assert "expert ids must be global ids in [0, 4)" in msgs[1]
        assert "combine() before dispatch()" in msgs[2]
        assert y == [0.0, 1.0, 1.0]  # one row from rank 0, two from rank 1
        # rank 0 sent row 0 to itself (weight 1) and row 1 to rank 1 (its row 0: weight 1);
        # rank 1 sent rows 0..1 to rank 0 (weights 2, 3) and rows 2..3 to itself (weights 2, 3)
        assert dx == ([1.0, 1.0] if rank == 0 else [2.0, 3.0, 2.0, 3.0])
