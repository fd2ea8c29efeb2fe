"""HF config <-> ModelConfig: faithful where the models agree, a named refusal where they do not."""
from __future__ import annotations

import pytest

from minimegatron.checkpoint import UnsupportedHFConfig, config_from_hf, config_to_hf, from_hf
from minimegatron.config import gpt_config, llama_config


def gpt2(**kw):
    from transformers import GPT2Config
    return GPT2Config(**dict(dict(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=None, eos_token_id=None), **kw))


def llama(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(**dict(dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   bos_token_id=None, eos_token_id=None), **kw))


def test_llama_fields():
    c = config_from_hf(llama(rope_theta=500000.0, rms_norm_eps=1e-6, max_position_embeddings=77))
    sizes = (c.vocab_size, c.hidden_size, c.num_layers, c.num_attention_heads, c.num_kv_heads)
    assert sizes == (100, 32, 2, 4, 2)
    assert (c.ffn_hidden_size, c.rope_theta, c.norm_eps, c.max_seq_len) == (64, 500000.0, 1e-6, 77)
    assert (c.norm, c.activation, c.position_embedding, c.bias, c.tie_embeddings) == (
        "rmsnorm", "swiglu", "rope", False, False)


def test_gpt2_fields():
    c = config_from_hf(gpt2(n_inner=96, layer_norm_epsilon=1e-6))
    assert (c.ffn_hidden_size, c.norm_eps, c.max_seq_len, c.gelu_approximate) == (96, 1e-6, 64, "tanh")
    assert (c.norm, c.activation, c.position_embedding, c.bias, c.tie_embeddings) == (
        "layernorm", "gelu", "learned", True, True)
    assert config_from_hf(gpt2()).ffn_hidden_size == 128  # n_inner None = 4h
    assert config_from_hf(gpt2(activation_function="gelu")).gelu_approximate == "none"


@pytest.mark.parametrize("config", [
    gpt_config(vocab_size=100, hidden_size=32, num_attention_heads=4, ffn_hidden_size=96, norm_eps=1e-6),
    gpt_config(vocab_size=100, hidden_size=32, num_attention_heads=4, tie_embeddings=False,
               gelu_approximate="none"),
    llama_config(vocab_size=100, hidden_size=32, num_attention_heads=4, num_kv_heads=1, rope_theta=1e6),
    llama_config(vocab_size=100, hidden_size=32, num_attention_heads=4, tie_embeddings=True),
], ids=["gpt", "gpt-untied-exact-gelu", "llama-mqa", "llama-tied"])
def test_config_roundtrip(config):
    back = config_from_hf(config_to_hf(config))
    assert back.replace(name=config.name) == config


@pytest.mark.parametrize("make,field", [
    (lambda: llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope"),
    (lambda: llama(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope"),
    (lambda: llama(mlp_bias=True), "mlp_bias"),
    (lambda: llama(hidden_act="gelu"), "hidden_act"),
    (lambda: gpt2(activation_function="relu"), "activation_function"),
    (lambda: gpt2(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (lambda: gpt2(scale_attn_weights=False), "scale_attn_weights"),
    (lambda: gpt2(add_cross_attention=True), "add_cross_attention"),
    (lambda: {"model_type": "bert"}, "model_type"),
])
def test_unsupported_hf_configs_name_the_field(make, field):
    with pytest.raises(UnsupportedHFConfig, match=f"field {field}"):
        config_from_hf(make())


def test_bad_config_refused_before_building_a_model():
    with pytest.raises(UnsupportedHFConfig, match="mlp_bias=True"):
        from_hf({}, llama(mlp_bias=True))


@pytest.mark.parametrize("config,field", [
    (gpt_config(position_embedding="alibi"), "position_embedding='alibi'"),
    (gpt_config(norm="rmsnorm"), "norm='rmsnorm'"),
    (gpt_config(num_kv_heads=2), "num_kv_heads=2"),
    (llama_config(bias=True), "bias=True"),
    (llama_config(final_norm=False), "final_norm=False"),
])
def test_configs_without_hf_counterpart_are_refused(config, field):
    with pytest.raises(UnsupportedHFConfig, match=field.replace("(", r"\(")):
        config_to_hf(config)
