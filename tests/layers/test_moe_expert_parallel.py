"""Expert parallelism = the single-rank MoE: the MoE MLP (layers/moe.py) with its experts spread over an EP
group (mpu/expert_parallel.py's all-to-all dispatcher) gives every data-parallel rank the outputs and the
input gradients of one process running that rank's tokens through all E experts, and — after the
interface's rule (expert gradients summed over the expert-data-parallel group, router gradients over dp)
— the gradients of one process that ran every rank's tokens. Capacity is per rank's tokens, so the
reference runs each rank's tokens on their own (in one process, all experts held)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from minimegatron.config import ModelConfig
from minimegatron.launch import launch
from minimegatron.layers.init_seed import init_rng
from minimegatron.layers.moe import MoEMLP
from minimegatron.mpu.layers import shard_weight
from minimegatron.mpu.state import initialize_model_parallel

TOL = dict(rtol=1e-5, atol=1e-6)
CASES = {"swiglu-k2": dict(activation="swiglu", moe_top_k=2),
         "gelu-k1-capacity": dict(activation="gelu", moe_top_k=1, moe_capacity_factor=0.75)}
LAYOUTS = {"ep4": dict(tp=1, ep=4), "ep2-dp2": dict(tp=1, ep=2), "ep2-tp2": dict(tp=2, ep=2)}  # 4 ranks
DP_OF = {name: 4 // lay["tp"] for name, lay in LAYOUTS.items()}


def config(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2, ffn_hidden_size=32,
                       num_experts=4, **CASES[name])


def tokens(dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This replica's (s, b, h) input and the output gradient that defines its loss Σ y·g."""
    gen = torch.Generator().manual_seed(10 + dp_rank)
    return torch.randn(6, 2, 16, generator=gen), torch.randn(6, 2, 16, generator=gen)


def forward_backward(moe: MoEMLP, dp_rank: int) -> dict:
    x, g = tokens(dp_rank)
    x.requires_grad_(True)
    y = moe(x)
    (y * g).sum().backward()
    return dict(y=y.detach(), dx=x.grad, router=moe.router.weight.grad.clone(),
                experts={(e, n): p.grad.clone() for e, expert in zip(moe.local_expert_ids, moe.experts)
                         for n, p in expert.named_parameters()})


def on_rank(layout: str) -> dict:
    tp, ep = LAYOUTS[layout]["tp"], LAYOUTS[layout]["ep"]
    state = initialize_model_parallel(tp, expert_model_parallel_size=ep)
    out = {"dp_rank": state.dp_rank, "tp_rank": state.tp_rank}
    for name in CASES:
        with init_rng(3, 1):
            moe = MoEMLP(config(name), state)
        res = forward_backward(moe, state.dp_rank)
        dist.all_reduce(res["router"], group=state.dp_group)       # the replicated gate: Σ over dp
        for grad in res["experts"].values():                       # an expert: Σ over its edp group
            dist.all_reduce(grad, group=state.edp_group)
        out[name] = res
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, all experts: each dp rank's tokens alone; gradients summed over the ranks."""
    ref = {}
    for layout, dp in DP_OF.items():
        for name in CASES:
            with init_rng(3, 1):
                moe = MoEMLP(config(name))
            per_rank = [forward_backward(moe, r) for r in range(dp)]  # .grad accumulates over r
            ref[layout, name] = dict(y=[p["y"] for p in per_rank], dx=[p["dx"] for p in per_rank],
                                     router=moe.router.weight.grad,
                                     experts={(e, n): p.grad for e, expert in enumerate(moe.experts)
                                              for n, p in expert.named_parameters()})
    return ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_equals_the_single_rank_moe(layout, reference):
    tp = LAYOUTS[layout]["tp"]
    for out in launch(on_rank, 4, layout, timeout=120):
        for name in CASES:
            got, want, r = out[name], reference[layout, name], out["dp_rank"]
            torch.testing.assert_close(got["y"], want["y"][r], **TOL, msg=f"{layout} {name} output")
            torch.testing.assert_close(got["dx"], want["dx"][r], **TOL, msg=f"{layout} {name} dx")
            torch.testing.assert_close(got["router"], want["router"], **TOL, msg=f"{layout} {name} router")
            assert len(got["experts"]) * LAYOUTS[layout]["ep"] == len(want["experts"])  # E/ep experts here
            for (e, n), grad in got["experts"].items():
                full = want["experts"][e, n]
                if grad.shape != full.shape:  # TP inside the expert: this rank's shard
                    column = "h_to_4h" in n
                    stride = 2 if column and CASES[name]["activation"] == "swiglu" else 1
                    full = shard_weight(full, 0 if column else 1, out["tp_rank"], tp, stride)
                torch.testing.assert_close(grad, full, **TOL, msg=f"{layout} {name} expert {e} {n}")
