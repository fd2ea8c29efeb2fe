"""Shards <-> full tensors: gathering a TP=2 model gives the TP=1 model; loading full weights re-shards."""
from __future__ import annotations

import pytest
import torch

from minimegatron.checkpoint import (CheckpointError, expected_full_shapes, full_state_dict,
                                     load_full_state_dict)
from minimegatron.config import gpt_config, llama_config
from minimegatron.gpt import GPTModel
from minimegatron.launch import launch
from minimegatron.llama import LLaMAModel
from minimegatron.mpu.state import initialize_model_parallel

SIZES = dict(vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4, max_seq_len=32)
CONFIGS = {"gpt": (GPTModel, gpt_config(**SIZES)),
           "llama-gqa": (LLaMAModel, llama_config(num_kv_heads=2, **SIZES)),
           "llama-mqa": (LLaMAModel, llama_config(num_kv_heads=1, **SIZES))}  # kv replicated at TP=2
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def build(name, state=None, seed=0):
    cls, config = CONFIGS[name]
    torch.manual_seed(seed)
    return cls(config, state).eval()


def test_tp1_full_state_dict_is_the_state_dict_without_vocab_padding():
    model = build("llama-gqa")
    full, sd = full_state_dict(model), model.state_dict()
    assert full.keys() == sd.keys()
    for name, t in full.items():
        if name in ("embedding.word_embeddings.weight", "lm_head.weight"):
            assert t.shape == (100, 32) and sd[name].shape == (128, 32)
            torch.testing.assert_close(t, sd[name][:100], rtol=0, atol=0)
            assert sd[name][100:].abs().sum() == 0  # padding rows are zero
        else:
            torch.testing.assert_close(t, sd[name], rtol=0, atol=0)
    assert expected_full_shapes(model) == {k: tuple(v.shape) for k, v in full.items()}


def test_gather_at_tp2_equals_tp1_and_reload_reshards():
    """Seeded alike, a TP=2 model holds the shards of the TP=1 model (the init rule), so gathering
    them must give the TP=1 weights exactly; loading the TP=1 weights into a fresh TP=2 model (other
    seed) must reproduce the TP=1 logits."""
    dense = {name: build(name) for name in CONFIGS}
    dense_full = {name: full_state_dict(m) for name, m in dense.items()}

    def run():
        state = initialize_model_parallel(2)
        out = {}
        for name in CONFIGS:
            gathered = full_state_dict(build(name, state))
            fresh = build(name, state, seed=123)
            load_full_state_dict(fresh, dense_full[name])
            with torch.no_grad():
                logits = fresh(IDS)
            shards = {k: v.clone() for k, v in fresh.state_dict().items()}
            out[name] = (gathered, logits, shards, expected_full_shapes(fresh))
        return out

    results = launch(run, 2, timeout=120)
    for name, model in dense.items():
        with torch.no_grad():
            expected = model(IDS)
        for rank, res in enumerate(results):
            gathered, logits, shards, shapes = res[name]
            assert gathered.keys() == dense_full[name].keys()
            for k in gathered:
                torch.testing.assert_close(gathered[k], dense_full[name][k], rtol=0, atol=0,
                                           msg=f"{name} {k} rank {rank}")
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            assert shapes == {k: tuple(v.shape) for k, v in dense_full[name].items()}
            # vocab: TP=2 pads 100 -> 256 rows, 128 per rank; rank 1 holds rows 128..255, all padding
            emb = shards["embedding.word_embeddings.weight"]
            assert emb.shape == (128, 32)
            assert (emb.abs().sum() == 0) == (rank == 1)
    # the fused SwiGLU weight is split with stride 2: rank r holds [gate_r; up_r]
    f = CONFIGS["llama-gqa"][1].ffn_hidden_size
    full_w = dense_full["llama-gqa"]["layers.0.mlp.dense_h_to_4h.weight"]  # (2f, h) = [gate; up]
    gate, up = full_w[:f], full_w[f:]
    for rank, res in enumerate(results):
        shard = res["llama-gqa"][2]["layers.0.mlp.dense_h_to_4h.weight"]  # (2f/2, h)
        half = slice(rank * f // 2, (rank + 1) * f // 2)
        torch.testing.assert_close(shard, torch.cat([gate[half], up[half]]), rtol=0, atol=0)
    # MQA at TP=2: the single kv head cannot be split, so key_value is replicated whole
    for res in results:
        torch.testing.assert_close(res["llama-mqa"][2]["layers.0.attention.key_value.weight"],
                                   dense_full["llama-mqa"]["layers.0.attention.key_value.weight"])


def test_load_errors_name_tensors_and_do_not_touch_weights():
    model = build("gpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = full_state_dict(build("gpt", seed=1))
    bad = dict(full)
    del bad["layers.1.mlp.dense_4h_to_h.bias"]
    bad["layers.0.attention.query_key_value.weight"] = torch.zeros(48, 32)
    bad["layers.7.input_norm.weight"] = torch.ones(32)
    with pytest.raises(CheckpointError) as err:
        load_full_state_dict(model, bad)
    msg = str(err.value)
    assert "missing tensors: ['layers.1.mlp.dense_4h_to_h.bias']" in msg
    assert "unexpected tensors (not in this model): ['layers.7.input_norm.weight']" in msg
    assert "'layers.0.attention.query_key_value.weight': checkpoint has full shape (48, 32), this " \
           "model expects (96, 32)" in msg
    assert "load_config" in msg  # the fix
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    del bad["layers.7.input_norm.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        load_full_state_dict(model, bad, strict=False)
