"""ParallelAttention (MHA, GQA, MQA, ALiBi, cross-attention, KV cache) against a dense reference written
here head by head, at TP = 1 and on 2 real ranks (with and without sequence parallelism)."""
import dataclasses
import math

import pytest
import torch

from minimegatron import launch
from minimegatron.config import llama_config
from minimegatron.layers.attention import KVCache, ParallelAttention
from minimegatron.mpu import ParallelState, initialize_model_parallel
from minimegatron.mpu.layers import gather_weight, shard_weight

S, B, H = 8, 2, 32


def _config(heads=4, kv=4, alibi=False, bias=True):
    return llama_config(hidden_size=H, num_attention_heads=heads, num_kv_heads=kv, bias=bias,
                        position_embedding="alibi" if alibi else "rope", vocab_size=64)


CASES = {  # name: (config, attention_type)
    "mha": (_config(), "self"),
    "gqa": (_config(kv=2), "self"),
    "mqa": (_config(kv=1), "self"),  # at tp=2: kv heads replicated
    "alibi-mha": (_config(alibi=True), "self"),
    "alibi-mqa": (_config(kv=1, alibi=True), "self"),
    "alibi-8-heads": (_config(heads=8, alibi=True, bias=False), "self"),
    "cross": (_config(), "cross"),
    "cross-mqa": (_config(kv=1), "cross"),
    "gqa-8-kv2": (_config(heads=8, kv=2), "self"),  # at tp=4: kv heads replicated (2 ranks per kv head)
    "gqa-8-kv4": (_config(heads=8, kv=4, bias=False), "self"),  # at tp=4: one kv head per rank (split)
}
TP4_CASES = ["mha", "mqa", "gqa-8-kv2", "gqa-8-kv4", "alibi-8-heads", "cross-mqa"]


def dense_attention(x, weights, config, attention_type, enc=None):
    """softmax(Q_i K_jᵀ/√d + bias)·V_j per head i (kv head j = i // group), then the output matmul."""
    heads, kv, d = config.num_attention_heads, config.num_kv_heads, config.head_dim
    src = x if attention_type == "self" else enc
    zeros = torch.zeros(3 * H)
    if "query_key_value.weight" in weights:  # fused [Q; K; V]
        wq, wk, wv = weights["query_key_value.weight"].split(H)
        bq, bk, bv = weights.get("query_key_value.bias", zeros).split(H)
    else:  # query, and [K; V]
        wq, bq = weights["query.weight"], weights.get("query.bias", zeros[:H])
        wk, wv = weights["key_value.weight"].chunk(2)
        bk, bv = weights.get("key_value.bias", zeros[:2 * kv * d]).chunk(2)
    q = (x @ wq.T + bq).unflatten(-1, (heads, d))  # (s, b, heads, d)
    k = (src @ wk.T + bk).unflatten(-1, (kv, d))  # (s_k, b, kv, d)
    v = (src @ wv.T + bv).unflatten(-1, (kv, d))
    sq, sk = q.shape[0], k.shape[0]
    outputs = []
    for i in range(heads):
        j = i // (heads // kv)
        scores = torch.einsum("sbd,tbd->bst", q[:, :, i], k[:, :, j]) / math.sqrt(d)
        if config.position_embedding == "alibi":  # power-of-two head counts: m_i = 2^(-8(i+1)/n)
            slope = 2.0 ** (-8.0 * (i + 1) / heads)
            distance = torch.arange(sq)[:, None] - torch.arange(sk)[None, :]
            scores = scores - slope * distance
        if attention_type == "self":
            scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))
        outputs.append(torch.einsum("bst,tbd->sbd", scores.softmax(-1), v[:, :, j]))
    return torch.cat(outputs, -1) @ weights["dense.weight"].T + weights.get("dense.bias", zeros[:H])


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, H, generator=g), torch.randn(S + 3, B, H, generator=g)


def _run(name, state):
    """Build the layer with seed 0 (same full weights at any TP), forward + backward on fixed inputs."""
    config, attention_type = CASES[name]
    torch.manual_seed(0)
    layer = ParallelAttention(config, state, attention_type=attention_type)
    with torch.no_grad():  # non-zero biases, so that a bias in the wrong place shows
        for n, p in layer.named_parameters():
            if n.endswith("bias"):
                split = getattr(p, "tensor_model_parallel", False)
                full = 0.1 * torch.randn(p.numel() * (state.tp if split else 1),
                                         generator=torch.Generator().manual_seed(len(n)))
                p.copy_(shard_weight(full, 0, state.tp_rank, state.tp, p.partition_stride) if split else full)
    x, enc = _inputs()
    x.requires_grad_(True)
    enc.requires_grad_(True)
    x_in, weigh = x, torch.linspace(-1, 1, x.numel()).view_as(x)  # loss = Σ weigh·out
    sp = state.sequence_parallel
    if sp:  # this rank's (s/tp, b, h) slice of the sequence
        x_in, weigh = x.chunk(state.tp)[state.tp_rank], weigh.chunk(state.tp)[state.tp_rank]
    out = layer(x_in, encoder_output=enc if attention_type == "cross" else None)
    (out * weigh).sum().backward()  # the row bias saw s/tp tokens only: its f summed over TP
    dx = x.grad.chunk(state.tp)[state.tp_rank] if sp else x.grad
    grads = {}
    for n, p in layer.named_parameters():
        g = p.grad
        if getattr(p, "tensor_model_parallel", False):
            g = gather_weight(g, p.partition_dim, state, p.partition_stride)
        grads[n] = g
    return out.detach(), dx, enc.grad, grads, layer


def _dense(name):
    config, attention_type = CASES[name]
    _, _, _, _, layer = _run(name, ParallelState())
    weights = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    x, enc = _inputs()
    x.requires_grad_(True)
    enc.requires_grad_(True)
    out = dense_attention(x, weights, config, attention_type, enc)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, enc.grad, {n: w.grad for n, w in weights.items()}


def _compare(got, expected, chunk=None):
    out, dx, denc, grads = got[:4]
    ref_out, ref_dx, ref_denc, ref_grads = expected
    if chunk is not None:  # sequence parallel: this rank's slice of the sequence
        ref_out, ref_dx = ref_out.chunk(chunk[1])[chunk[0]], ref_dx.chunk(chunk[1])[chunk[0]]
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    if ref_denc is not None:
        torch.testing.assert_close(denc, ref_denc, rtol=1e-5, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.fixture(scope="module")
def dense():
    return {name: _dense(name) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_tp1_matches_dense_reference(name, dense):
    _compare(_run(name, ParallelState()), dense[name])


def _tp2_all_cases():
    state = initialize_model_parallel(2)
    out = {}
    for sp in (False, True):
        st = dataclasses.replace(state, sequence_parallel=sp)
        out.update({(name, sp): _run(name, st)[:4] for name in CASES})
    return out


def test_tp2_matches_dense_reference_with_and_without_sequence_parallel(dense):
    for rank, results in enumerate(launch(_tp2_all_cases, 2, timeout=60)):
        for (name, sp), got in results.items():
            _compare(got, dense[name], chunk=(rank, 2) if sp else None)


def _tp4_cases():
    state = initialize_model_parallel(4)
    return {(name, sp): _run(name, dataclasses.replace(state, sequence_parallel=sp))[:4]
            for sp in (False, True) for name in TP4_CASES}


def test_tp4_matches_dense_reference_with_and_without_sequence_parallel(dense):
    """One launch of 4 ranks: kv heads split (MHA, 8 heads / 4 kv) and replicated (MQA, 8 heads / 2 kv)."""
    for rank, results in enumerate(launch(_tp4_cases, 4, timeout=120)):
        for (name, sp), got in results.items():
            _compare(got, dense[name], chunk=(rank, 4) if sp else None)


def test_mqa_at_tp2_replicates_the_key_value_weights():
    layer = ParallelAttention(_config(kv=1), ParallelState(tp=2, rank=1))
    assert layer.kv_replicated and layer.first_kv_head == 0
    assert layer.key_value.weight.shape == (2 * 8, H)  # the full [K; V] of the one kv head
    assert not layer.key_value.weight.tensor_model_parallel
    gqa = ParallelAttention(_config(heads=8, kv=2), ParallelState(tp=4, rank=3))
    assert gqa.kv_replicated and gqa.first_kv_head == 1  # rank 3's query heads 6, 7 read kv head 1


def test_layout_is_decided_once_and_recompute_core_is_a_constructor_argument():
    from minimegatron.mpu.layers import ReplicatedLinear

    assert ParallelAttention(_config()).layout == "fused"
    assert ParallelAttention(_config(kv=2)).layout == "split"
    assert ParallelAttention(_config(), attention_type="cross").layout == "split"
    mqa = ParallelAttention(_config(kv=1), ParallelState(tp=2, rank=0))
    assert mqa.layout == "replicated-kv" and isinstance(mqa.key_value, ReplicatedLinear)
    assert all(not p.tensor_model_parallel and p.partition_dim == -1 for p in mqa.key_value.parameters())
    assert ParallelAttention(_config(), recompute_core=True).recompute_core
    assert not ParallelAttention(_config()).recompute_core


@pytest.mark.parametrize("name", ["mha", "gqa", "alibi-mqa"])
def test_kv_cache_prefill_then_one_token_at_a_time_equals_full(name):
    config, _ = CASES[name]
    torch.manual_seed(0)
    layer = ParallelAttention(config).eval()
    x, _ = _inputs()
    with torch.no_grad():
        full = layer(x)
        cache = KVCache(1)
        steps = [layer(x[:5], kv_cache=cache)]
        cache.offset = 5
        steps += [layer(x[t:t + 1], kv_cache=cache) for t in range(5, S)]
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-5, atol=1e-6)
    assert cache.keys[0].shape == (S, B, config.num_kv_heads, config.head_dim)


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor-parallel size 3"):
        ParallelAttention(_config(), ParallelState(tp=3))
    with pytest.raises(ValueError, match="num_kv_heads=2 and tensor-parallel size 3"):
        ParallelAttention(llama_config(hidden_size=48, num_attention_heads=6, num_kv_heads=2),
                          ParallelState(tp=3))
    with pytest.raises(ValueError, match="needs encoder_output"):
        ParallelAttention(_config(), attention_type="cross")(torch.randn(S, B, H))
    with pytest.raises(ValueError, match="attention_type='causal'"):
        ParallelAttention(_config(), attention_type="causal")
