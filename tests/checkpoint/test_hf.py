"""HF -> minimegatron -> HF: same logits as transformers (the independent reference), at TP 1 and 2."""
from __future__ import annotations

import pytest
import torch

from minimegatron.checkpoint import CheckpointError, from_hf, state_dict_from_hf, to_hf
from minimegatron.checkpoint.hf_config import config_from_hf
from minimegatron.launch import launch
from minimegatron.mpu.state import initialize_model_parallel
from tests.checkpoint.hf_models import hf_gpt2, hf_llama, token_ids

TOL = dict(rtol=1e-5, atol=1e-5)
CASES = {"gpt2": lambda: hf_gpt2(), "llama-mha": lambda: hf_llama(kv_heads=4),
         "llama-gqa": lambda: hf_llama(kv_heads=2), "llama-mqa": lambda: hf_llama(kv_heads=1)}


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_from_hf_tp1_matches_transformers(case):
    hf, ids = CASES[case](), token_ids()
    model = from_hf(hf).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(hf, ids), **TOL)


def test_from_hf_tp2_matches_transformers():
    """One launch, all four models: each TP=2 rank loads its shard straight from the HF weights."""
    hfs = {name: make() for name, make in CASES.items()}
    ids = token_ids()

    def run():
        state = initialize_model_parallel(2)
        out = {}
        for name, hf in hfs.items():
            model = from_hf(hf, state=state).eval()
            with torch.no_grad():
                out[name] = model(ids)
        return out

    results = launch(run, 2, timeout=120)
    for name, hf in hfs.items():
        expected = hf_logits(hf, ids)
        for rank in range(2):
            torch.testing.assert_close(results[rank][name], expected, **TOL, msg=f"{name} rank {rank}")


def test_from_hf_state_dict_and_directory(tmp_path):
    """A state dict + its config, or a save_pretrained directory (safetensors, no pickle)."""
    hf, ids = hf_llama(kv_heads=2), token_ids()
    expected = hf_logits(hf, ids)
    with torch.no_grad():
        torch.testing.assert_close(from_hf(hf.state_dict(), hf.config).eval()(ids), expected, **TOL)
        torch.testing.assert_close(from_hf(hf.state_dict(), hf.config.to_dict()).eval()(ids), expected,
                                   **TOL)
        hf.save_pretrained(tmp_path / "hf")
        torch.testing.assert_close(from_hf(tmp_path / "hf").eval()(ids), expected, **TOL)


@pytest.mark.parametrize("make", [hf_gpt2, lambda: hf_llama(kv_heads=2)], ids=["gpt2", "llama-gqa"])
def test_to_hf_save_pretrained_roundtrip(make, tmp_path):
    """minimegatron -> save_pretrained -> AutoModelForCausalLM.from_pretrained: same logits."""
    from transformers import AutoModelForCausalLM
    hf, ids = make(), token_ids()
    model = from_hf(hf).eval()
    exported = to_hf(model, save_directory=tmp_path / "out")
    assert list((tmp_path / "out").glob("*.safetensors")), "weights must be written as safetensors"
    assert not list((tmp_path / "out").glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(hf)
    expected = hf_logits(hf, ids)
    torch.testing.assert_close(hf_logits(exported, ids), expected, **TOL)
    torch.testing.assert_close(hf_logits(reloaded, ids), expected, **TOL)


def test_to_hf_from_tp2_model(tmp_path):
    """Export gathers the TP shards: a TP=2 model exports the same HF model; rank 0 writes it."""
    from transformers import AutoModelForCausalLM
    hf, ids = hf_llama(kv_heads=2), token_ids()
    out = tmp_path / "from_tp2"

    def run():
        state = initialize_model_parallel(2)
        return hf_logits(to_hf(from_hf(hf, state=state), save_directory=out), ids)

    results = launch(run, 2, timeout=120)
    expected = hf_logits(hf, ids)
    for r in results:
        torch.testing.assert_close(r, expected, **TOL)
    torch.testing.assert_close(hf_logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids),
                               expected, **TOL)


def test_gpt2_layout_is_transposed_conv1d():
    """Conv1D stores (in, out): c_attn (h, 3h) becomes query_key_value (3h, h) = [W_Q; W_K; W_V]."""
    hf = hf_gpt2()
    full = state_dict_from_hf(hf.state_dict(), config_from_hf(hf.config))
    c_attn = hf.transformer.h[0].attn.c_attn.weight  # (h, 3h): x @ W
    qkv = full["layers.0.attention.query_key_value.weight"]  # (3h, h): x @ Wᵀ
    assert qkv.shape == (96, 32)
    torch.testing.assert_close(qkv, c_attn.t())
    assert "lm_head.weight" not in full  # tied to the word embeddings


def test_llama_fused_weights_are_concatenations():
    hf = hf_llama(kv_heads=2)
    full = state_dict_from_hf(hf.state_dict(), config_from_hf(hf.config))
    layer = hf.model.layers[1]
    torch.testing.assert_close(full["layers.1.attention.key_value.weight"],
                               torch.cat([layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]))
    torch.testing.assert_close(full["layers.1.mlp.dense_h_to_4h.weight"],
                               torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))


def test_incomplete_or_foreign_state_dicts_are_named():
    hf = hf_gpt2()
    sd = dict(hf.state_dict())
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match=r"lacks \['h\.1\.mlp\.c_fc\.bias'\]"):
        from_hf(sd, hf.config)
    sd = dict(hf.state_dict(), **{"transformer.h.2.ln_1.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match=r"no minimegatron weight maps to: \['h\.2\.ln_1\.weight'\]"):
        from_hf(sd, hf.config)
    with pytest.raises(ValueError, match="needs hf_config="):
        from_hf(hf.state_dict())
    with pytest.raises(CheckpointError, match="not a Hugging Face model directory"):
        from_hf("/nonexistent/dir")


def test_from_hf_into_impossible_tp_size_is_refused():
    hf = hf_llama(kv_heads=2)  # 4 heads cannot be split over 3 ranks

    def run():
        return from_hf(hf, state=initialize_model_parallel(3))

    with pytest.raises(Exception, match="num_attention_heads=4 is not divisible by tensor-parallel size 3"):
        launch(run, 3, timeout=60)


def test_export_is_readable_without_transformers(tmp_path):
    """A serving stack that reads safetensors and config.json only (no transformers, no pickle) gets every
    tensor of the HF model under its HF name, bit for bit, and the config it needs."""
    import json

    from safetensors import safe_open
    hf = hf_llama(kv_heads=2)
    to_hf(from_hf(hf).eval(), save_directory=tmp_path / "out")
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    tensors = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    expected = {k: v for k, v in hf.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if hf.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert torch.equal(tensors[name], value), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["hidden_size"]) == \
           ("llama", 2, hf.config.hidden_size)
