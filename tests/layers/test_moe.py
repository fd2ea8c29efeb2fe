"""MoE MLP vs a plain per-token loop: routing, capacity, losses, outputs and gradients; TP/SP on gloo."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from minimegatron.config import ModelConfig
from minimegatron.launch import launch
from minimegatron.layers.init_seed import init_rng
from minimegatron.layers.language_model import LanguageModel, count_parameters
from minimegatron.layers.moe import MoEMLP
from minimegatron.mixtral import mixtral_config
from minimegatron.mpu.layers import shard_weight
from minimegatron.mpu.state import initialize_model_parallel

TOL = dict(rtol=1e-5, atol=1e-6)


def moe_config(**kw):
    base = dict(vocab_size=64, hidden_size=16, num_layers=2, num_attention_heads=2, ffn_hidden_size=32,
                num_experts=4, moe_top_k=2)
    return ModelConfig(**{**base, **kw})


def build(config, state=None, seed=3):
    with init_rng(seed, 1):
        return MoEMLP(config, state)


def hand_keep(experts, E, capacity):
    """Serve slots token by token, slot by slot; an expert past its capacity drops the slot."""
    used, keep = [0] * E, torch.zeros_like(experts, dtype=torch.bool)
    for t in range(experts.size(0)):
        for j in range(experts.size(1)):
            e = int(experts[t, j])
            keep[t, j] = capacity is None or used[e] < capacity
            used[e] += 1
    return keep


def loop_reference(moe, x):
    """Token by token: softmax, top-k, renormalise, capacity by hand, Σ_j w_j·expert_j(x_t)."""
    tokens = x.reshape(-1, x.size(-1))
    k, E = moe.router.top_k, moe.num_experts
    picks = []
    for t in range(tokens.size(0)):
        p = torch.softmax((moe.router.weight @ tokens[t]).float(), -1)
        w, e = torch.topk(p, k)
        picks.append((w / w.sum(), e))
    experts = torch.stack([e for _, e in picks])
    cap = None if moe.router.capacity_factor is None else math.ceil(
        moe.router.capacity_factor * tokens.size(0) * k / E)
    keep = hand_keep(experts, E, cap)
    out = []
    for t, (w, e) in enumerate(picks):
        terms = [w[j] * moe.experts[int(e[j])](tokens[t][None])[0] for j in range(k) if keep[t, j]]
        out.append(sum(terms) if terms else torch.zeros_like(tokens[t]))
    return torch.stack(out).view_as(x), keep



@pytest.mark.parametrize("activation,cf,k", [("gelu", None, 2), ("swiglu", None, 2), ("swiglu", 0.6, 2),
                                             ("gelu", 1.0, 1)])
def test_moe_matches_per_token_loop(activation, cf, k):
    config = moe_config(activation=activation, moe_capacity_factor=cf, moe_top_k=k)
    moe = build(config)
    ref = copy.deepcopy(moe)
    x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(0))
    g = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = moe(xa)
    expected, keep = loop_reference(ref, xb)
    torch.testing.assert_close(out, expected, **TOL)
    assert torch.equal(moe.routing.keep, keep)
    assert moe.routing.dropped == int((~keep).sum())
    kept = torch.bincount(moe.routing.experts[keep], minlength=4)  # the load each expert computes
    assert torch.equal(moe.routing.kept_per_expert, kept)
    if cf is not None:
        assert moe.routing.capacity == math.ceil(cf * 12 * k / 4) and int(kept.max()) <= moe.routing.capacity
    if cf is not None and cf < 1:
        assert moe.routing.dropped > 0  # the case exercises dropping
    (out * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    for (name, p), q in zip(moe.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    assert all(getattr(p, "expert_parallel", False) for p in moe.experts.parameters())
    assert not getattr(moe.router.weight, "expert_parallel", False)


def test_aux_and_z_losses_vs_formulas_and_hf():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    for k in (1, 2):
        moe = build(moe_config(moe_top_k=k))
        x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(2))
        moe(x)
        logits = x.reshape(-1, 16) @ moe.router.weight.t()
        p = torch.softmax(logits, -1)
        chosen = torch.topk(p, k, -1).indices
        f = torch.tensor([(chosen == e).sum().item() for e in range(4)]) / chosen.numel()
        torch.testing.assert_close(moe.aux_loss, 4 * (f * p.mean(0)).sum(), **TOL)
        torch.testing.assert_close(moe.z_loss, (torch.logsumexp(logits, -1) ** 2).mean(), **TOL)
        hf = load_balancing_loss_func((logits,), 4, k)  # f_e = slots/n there: k · ours, one layer
        torch.testing.assert_close(k * moe.aux_loss, hf, **TOL)
        assert torch.equal(moe.routing.tokens_per_expert, torch.bincount(chosen.flatten(), minlength=4))


def test_model_adds_router_losses_and_counts_parameters():
    config = moe_config(moe_every=2, num_layers=3, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
                        activation="swiglu", bias=True)
    assert [config.is_moe_layer(i) for i in range(3)] == [True, False, True]
    model = LanguageModel(config, init_seed=0)
    assert model.num_parameters() == count_parameters(config)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(ids, ids)
    moe = [model.layers[0].mlp, model.layers[2].mlp]
    dense = LanguageModel(config.replace(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0), init_seed=0)
    expected = dense(ids, ids) + 0.1 * sum(m.aux_loss for m in moe) + 0.01 * sum(m.z_loss for m in moe)
    torch.testing.assert_close(loss, expected, **TOL)
    full = LanguageModel(config, init_seed=0, recompute="full")  # router losses survive recomputation
    loss.backward()
    full(ids, ids).backward()
    for (name, p), q in zip(model.named_parameters(), full.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    from minimegatron.llama import LLaMAModel
    mixtral = mixtral_config(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2)
    assert LLaMAModel(mixtral).changes == {"num_experts": 8}  # one more porting point than LLaMA


@pytest.mark.parametrize("kw,match", [(dict(moe_top_k=5), "moe_top_k=5"),
                                      (dict(moe_capacity_factor=0.0), "moe_capacity_factor=0.0"),
                                      (dict(moe_every=0), "moe_every=0"),
                                      (dict(num_experts=-1), "num_experts=-1"),
                                      (dict(moe_aux_loss_coeff=-1.0), "moe_aux_loss_coeff=-1.0")])
def test_bad_moe_config_is_one_clear_line(kw, match):
    with pytest.raises(ValueError, match=match):
        moe_config(**kw)


def test_tp2_and_sequence_parallel_equal_single_rank():
    """TP=2 (SP off and on) holds the TP=1 experts' shards and computes the same outputs and grads;
    E=8, k=1 on 8 tokens leaves experts empty (no rows, still the same collectives on every rank)."""
    cases = {"swiglu": moe_config(activation="swiglu"), "gelu-cf": moe_config(moe_capacity_factor=0.5),
             "empty": moe_config(num_experts=8, moe_top_k=1)}
    x = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(0))
    g = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(1))

    def run(sp: bool):
        state = initialize_model_parallel(2, sequence_parallel=sp) if sp is not None else None
        out = {}
        for name, config in cases.items():
            moe = build(config, state)
            xs = x.clone()
            if state is not None and sp:
                xs = xs.chunk(2)[state.tp_rank]
            xs.requires_grad_(True)
            y = moe(xs)
            gs = g.chunk(2)[state.tp_rank] if sp else g
            (y * gs).sum().backward()
            out[name] = dict(y=y.detach(), dx=xs.grad, router=moe.router.weight.grad,
                             experts={n: p.grad for n, p in moe.experts.named_parameters()},
                             tokens=moe.routing.tokens_per_expert)
        return out

    single = run(None)
    for sp in (False, True):
        for rank, out in enumerate(launch(run, 2, sp, timeout=120)):
            for name in cases:
                a, b = out[name], single[name]
                y, dx = (b["y"].chunk(2)[rank], b["dx"].chunk(2)[rank]) if sp else (b["y"], b["dx"])
                torch.testing.assert_close(a["y"], y, **TOL)
                torch.testing.assert_close(a["dx"], dx, **TOL)
                torch.testing.assert_close(a["router"], b["router"], **TOL)
                assert torch.equal(a["tokens"], b["tokens"])
                for n, grad in a["experts"].items():
                    full = b["experts"][n]
                    if grad.shape != full.shape:  # TP shard: rows (column layer) or columns (row layer)
                        dim = 0 if "h_to_4h" in n else 1
                        stride = 2 if "h_to_4h" in n and name == "swiglu" else 1
                        full = shard_weight(full, dim, rank, 2, stride)
                    torch.testing.assert_close(grad, full, **TOL, msg=f"{name} sp={sp} {n}")
    assert (single["empty"]["tokens"] == 0).any()  # some expert got no token
