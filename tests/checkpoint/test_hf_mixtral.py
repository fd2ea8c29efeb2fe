"""MixtralForCausalLM <-> minimegatron: same logits, same greedy tokens, weights bit for bit, TP 1 and 2."""
from __future__ import annotations

import pytest
import torch

from minimegatron.checkpoint import UnsupportedHFConfig, config_from_hf, config_to_hf, from_hf, to_hf
from minimegatron.generate import generate
from minimegatron.launch import launch
from minimegatron.layers.language_model import count_parameters
from minimegatron.layers.moe import router_losses
from minimegatron.mixtral import mixtral_config
from minimegatron.mpu.state import initialize_model_parallel
from tests.checkpoint.hf_models import hf_mixtral, token_ids

TOL = dict(rtol=1e-5, atol=1e-5)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def hf_greedy(hf, ids, n=8):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kv,top_k", [(2, 2), (4, 1)], ids=["gqa-top2", "mha-top1"])
def test_from_hf_tp1_logits_generation_and_roundtrip(kv, top_k):
    hf, ids = hf_mixtral(kv_heads=kv, top_k=top_k), token_ids()
    model = from_hf(hf).eval()
    assert model.config.num_experts == 4 and model.config.moe_top_k == top_k
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(hf, ids), **TOL)
        assert torch.equal(generate(model, ids[:, :5], max_new_tokens=8), hf_greedy(hf, ids[:, :5]))
    assert same_weights(to_hf(model), hf)  # HF -> ours -> HF: every tensor bit for bit


def test_save_pretrained_directory_both_ways(tmp_path):
    """save_pretrained writes the Hub's per-expert w1/w2/w3 names: read them, and write loadable ones."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    hf, ids = hf_mixtral(), token_ids()
    hf.save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(hf, ids), **TOL)
    to_hf(model, save_directory=tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(hf) and same_weights(reloaded, hf)
    files = list((tmp_path / "out").glob("*.safetensors"))
    assert files and not list((tmp_path / "out").glob("*.bin"))
    with safe_open(files[0], "pt") as f:
        assert any("experts" in k for k in f.keys())


def test_loss_with_aux_equals_hf_for_one_moe_layer():
    """HF adds router_aux_loss_coef · load_balancing_loss_func (f_e summing to k) when asked for router
    logits; for one MoE layer it is k · ours, and config_from_hf scales the coefficient by k."""
    hf = hf_mixtral(layers=1, output_router_logits=True, router_aux_loss_coef=0.05)
    ids = token_ids()
    model = from_hf(hf).eval()
    assert model.config.moe_aux_loss_coeff == pytest.approx(0.1)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100  # HF predicts s-1 tokens (it shifts inside): the same targets both sides
    with torch.no_grad():
        ours = model(ids, labels)
        theirs = hf(ids, labels=labels)
    torch.testing.assert_close(router_losses(model.layers)[0] * 2, theirs.aux_loss, **TOL)
    # HF shifts labels inside; ours takes them as given: shift them back for HF
    with torch.no_grad():
        shifted = torch.cat([torch.full_like(ids[:, :1], -100), labels[:, :-1]], 1)
        theirs = hf(ids, labels=shifted)
    torch.testing.assert_close(ours, theirs.loss, **TOL)


def test_from_hf_tp2_matches_transformers():
    """One launch: each TP=2 rank loads its shard; logits, greedy tokens and the way back to HF."""
    hf, ids = hf_mixtral(), token_ids()

    def run():
        state = initialize_model_parallel(2)
        model = from_hf(hf, state=state).eval()
        with torch.no_grad():
            out = {"logits": model(ids), "greedy": generate(model, ids[:, :5], max_new_tokens=8)}
        out["roundtrip"] = same_weights(to_hf(model), hf)
        out["params"] = (model.num_parameters(), count_parameters(model.config))  # sharded experts too
        return out

    expected, greedy = hf_logits(hf, ids), hf_greedy(hf, ids[:, :5])
    for rank, out in enumerate(launch(run, 2, timeout=120)):
        torch.testing.assert_close(out["logits"], expected, **TOL, msg=f"rank {rank}")
        assert torch.equal(out["greedy"], greedy) and out["roundtrip"], f"rank {rank}"
        assert out["params"][0] == out["params"][1] == sum(p.numel() for p in hf.parameters())


def test_config_roundtrip_and_refusals():
    config = mixtral_config(vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4,
                            num_kv_heads=2, ffn_hidden_size=64, num_experts=4, moe_aux_loss_coeff=0.04)
    hf = config_to_hf(config)
    assert type(hf).__name__ == "MixtralConfig" and hf.num_local_experts == 4
    assert hf.output_router_logits and hf.router_aux_loss_coef == pytest.approx(0.02)
    back = config_from_hf(hf)
    assert {k: v for k, v in back.to_dict().items() if k != "name"} == \
        {k: v for k, v in config.to_dict().items() if k != "name"}
    for field, change in (("moe_every", dict(moe_every=2)), ("moe_capacity_factor",
                                                             dict(moe_capacity_factor=1.0))):
        with pytest.raises(UnsupportedHFConfig, match=field):
            config_to_hf(config.replace(**change))
    for field, value in (("sliding_window", 16), ("router_jitter_noise", 0.1)):
        with pytest.raises(UnsupportedHFConfig, match=f"field {field}"):
            config_from_hf(hf_mixtral(**{field: value}).config)
