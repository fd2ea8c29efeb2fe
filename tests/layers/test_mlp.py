"""ParallelMLP (GeLU and SwiGLU) against the dense two-matrix MLP, at TP = 1 and on 2 real ranks."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from minimegatron import launch
from minimegatron.config import gpt_config, llama_config
from minimegatron.layers.mlp import ParallelMLP
from minimegatron.mpu import ParallelState, initialize_model_parallel
from minimegatron.mpu.layers import gather_weight

S, B, H = 8, 2, 32
CONFIGS = {"gelu": gpt_config(hidden_size=H, num_attention_heads=4),
           "swiglu": llama_config(hidden_size=H, num_attention_heads=4, multiple_of=16, bias=True)}


def _x():
    return torch.randn(S, B, H, generator=torch.Generator().manual_seed(0))


def _run(name, state):
    torch.manual_seed(0)
    mlp = ParallelMLP(CONFIGS[name], state)
    x = _x().requires_grad_(True)
    weigh = torch.linspace(-1, 1, x.numel()).view_as(x)
    sp = state.sequence_parallel
    x_in, w_in = x, weigh
    if sp:  # this rank's (s/tp, b, h) slice
        x_in, w_in = x.chunk(state.tp)[state.tp_rank], weigh.chunk(state.tp)[state.tp_rank]
    out = mlp(x_in)
    (out * w_in).sum().backward()  # under SP the fc2 bias's f sums its gradient over TP
    grads = {n: gather_weight(p.grad, p.partition_dim, state, p.partition_stride)
             if p.tensor_model_parallel else p.grad for n, p in mlp.named_parameters()}
    dx = x.grad.chunk(state.tp)[state.tp_rank] if sp else x.grad
    return out.detach(), dx, grads, mlp.dense_h_to_4h.weight.detach()


def _dense(name):
    """act(x·W1ᵀ + b1)·W2ᵀ + b2, with W1 = [W_gate; W_up] for SwiGLU: the single-device MLP."""
    torch.manual_seed(0)
    mlp = ParallelMLP(CONFIGS[name])
    w = {n: p.detach().clone().requires_grad_(True) for n, p in mlp.named_parameters()}
    x = _x().requires_grad_(True)
    y = x @ w["dense_h_to_4h.weight"].T + w["dense_h_to_4h.bias"]
    if name == "swiglu":
        gate, up = y.chunk(2, -1)
        y = F.silu(gate) * up
    else:
        y = F.gelu(y, approximate="tanh")
    out = y @ w["dense_4h_to_h.weight"].T + w["dense_4h_to_h.bias"]
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: t.grad for n, t in w.items()}, w["dense_h_to_4h.weight"].detach()


def _check(got, expected, rank=0, tp=1, sp=False):
    out, dx, grads, _ = got
    ref_out, ref_dx, ref_grads, _ = expected
    if sp:
        ref_out, ref_dx = ref_out.chunk(tp)[rank], ref_dx.chunk(tp)[rank]
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp1_is_the_dense_mlp(name):
    _check(_run(name, ParallelState()), _dense(name))


def _tp2():
    state = initialize_model_parallel(2)
    return {(name, sp): _run(name, dataclasses.replace(state, sequence_parallel=sp))
            for name in CONFIGS for sp in (False, True)}


def test_tp2_matches_the_dense_mlp_and_swiglu_shards_hold_matching_gate_and_up_rows():
    dense = {name: _dense(name) for name in CONFIGS}
    for rank, results in enumerate(launch(_tp2, 2, timeout=60)):
        for (name, sp), got in results.items():
            _check(got, dense[name], rank, 2, sp)
        ffn = CONFIGS["swiglu"].ffn_hidden_size
        gate, up = dense["swiglu"][3].split(ffn)  # full [W_gate; W_up]
        rows = slice(rank * ffn // 2, (rank + 1) * ffn // 2)
        torch.testing.assert_close(results[("swiglu", False)][3], torch.cat([gate[rows], up[rows]]))


def _tp4():
    state = initialize_model_parallel(4)
    return {(name, sp): _run(name, dataclasses.replace(state, sequence_parallel=sp))
            for name in CONFIGS for sp in (False, True)}


def test_tp4_matches_the_dense_mlp_with_and_without_sequence_parallel():
    dense = {name: _dense(name) for name in CONFIGS}
    for rank, results in enumerate(launch(_tp4, 4, timeout=120)):
        for (name, sp), got in results.items():
            _check(got, dense[name], rank, 4, sp)


def test_ffn_not_divisible_by_tp_raises():
    with pytest.raises(ValueError, match="ffn_hidden_size=96 is not divisible by tensor-parallel size 5"):
        ParallelMLP(llama_config(hidden_size=H, num_attention_heads=4, multiple_of=32), ParallelState(tp=5))
