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


@pytest.mark.parametrize("config_json,match", [
    (dict(rope_theta=1e4, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "rope_type 'dynamic' is not implemented; supported: 'default'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope_type 'longrope'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "field partial_rotary_factor=0.5 is not supported: RoPE here rotates the whole head"),
    (dict(rope_theta=1e4, partial_rotary_factor=0.25), "field partial_rotary_factor=0.25"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 32}),
     r"keys \['beta_fast'\] are not part of rope_type 'linear'"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "per layer type"),
])
def test_rope_configs_we_do_not_compute_are_refused(config_json, match):
    """Only plain, linear and llama3 RoPE convert; the rest is refused with its field named."""
    base = llama().to_dict()
    base.pop("rope_parameters", None)
    with pytest.raises(UnsupportedHFConfig, match=match):
        config_from_hf({**base, **config_json})


def test_llama3_original_context_defaults_to_max_position_embeddings():
    """As transformers 5 does when a llama3 rope dict omits original_max_position_embeddings."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    base = {k: v for k, v in llama(max_position_embeddings=96).to_dict().items() if k != "rope_parameters"}
    c = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": scaling})
    assert (c.rope_scaling.original_max_position_embeddings, c.rope_theta) == (96, 5e5)


@pytest.mark.parametrize("config,match", [
    (gpt_config(head_dim=32), "head_dim=32: GPT2LMHeadModel"),
    (llama_config(num_experts=4, attention_bias=True), "MixtralForCausalLM has no attention biases"),
], ids=["gpt-head-dim", "mixtral-attention-bias"])
def test_llama3_fields_without_hf_counterpart_are_refused(config, match):
    with pytest.raises(UnsupportedHFConfig, match=match):
        config_to_hf(config)


@pytest.mark.parametrize("config", [
    llama_config(vocab_size=100, hidden_size=32, num_attention_heads=4, head_dim=16, attention_bias=True),
    llama_config(vocab_size=100, hidden_size=64, num_attention_heads=4, rope_theta=5e5,
                 rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=32)),
    llama_config(vocab_size=100, hidden_size=32, num_attention_heads=4, rope_scaling=dict(
        rope_type="linear", factor=2.0)),
], ids=["head-dim-bias", "llama3", "linear"])
def test_llama3_config_roundtrip(config):
    back = config_from_hf(config_to_hf(config))
    assert back.replace(name=config.name) == config
