"""ModelConfig / ParallelConfig: derived fields, presets, validation messages, round trips."""
import math

import pytest

from minimegatron.config import ModelConfig, ParallelConfig, gpt_config, llama_config


def test_derived_fields():
    c = ModelConfig(hidden_size=96, num_attention_heads=6)
    assert c.num_kv_heads == 6 and c.ffn_hidden_size == 4 * 96 and c.head_dim == 16
    s = ModelConfig(hidden_size=4096, num_attention_heads=32, activation="swiglu", multiple_of=256)
    assert s.ffn_hidden_size == 11008  # LLaMA-7B: 8/3·4096 = 10922.7, rounded up to a multiple of 256
    assert ModelConfig(ffn_hidden_size=100).ffn_hidden_size == 100  # explicit wins


def test_presets_differ_exactly_in_the_llama_changes():
    gpt, llama = gpt_config(), llama_config()
    assert (gpt.norm, gpt.activation, gpt.position_embedding, gpt.bias, gpt.tie_embeddings) == \
        ("layernorm", "gelu", "learned", True, True)
    assert (llama.norm, llama.activation, llama.position_embedding, llama.bias, llama.tie_embeddings) == \
        ("rmsnorm", "swiglu", "rope", False, False)
    assert gpt.final_norm and llama.final_norm
    assert llama_config(num_kv_heads=1).num_kv_heads == 1


def test_replace_rederives_derived_fields_only():
    gpt = gpt_config(hidden_size=96, num_attention_heads=6)
    swiglu = gpt.replace(activation="swiglu")
    assert swiglu.ffn_hidden_size == 32 * math.ceil(8 * 96 / 3 / 32)
    assert gpt.replace(num_attention_heads=12).num_kv_heads == 12  # was derived: follows the heads
    fixed = gpt_config(ffn_hidden_size=200, num_kv_heads=2, num_attention_heads=4)
    assert fixed.replace(activation="swiglu").ffn_hidden_size == 200  # explicit: kept
    assert fixed.replace(num_attention_heads=8).num_kv_heads == 2
    assert gpt.replace(name="x") == gpt_config(hidden_size=96, num_attention_heads=6, name="x")


def test_round_trip_and_unknown_fields():
    c = llama_config(num_kv_heads=2)
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['n_embd'\]"):
        ModelConfig.from_dict({**c.to_dict(), "n_embd": 3})


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=0), "hidden_size must be a positive int"),
    (dict(hidden_size=60, num_attention_heads=8), "hidden_size=60 is not divisible by num_attention_heads=8"),
    (dict(num_kv_heads=3), "num_kv_heads=3 must divide num_attention_heads=4"),
    (dict(norm="batchnorm"), "use 'layernorm' \\(GPT\\) or 'rmsnorm' \\(LLaMA\\)"),
    (dict(activation="relu"), "use 'gelu' \\(GPT\\) or 'swiglu' \\(LLaMA\\)"),
    (dict(position_embedding="sinusoidal"), "'learned' \\(GPT\\), 'rope' \\(LLaMA\\) or 'alibi'"),
    (dict(hidden_size=36, num_attention_heads=4, position_embedding="rope"), "head_dim=9 must be even"),
    (dict(dropout=1.0), "dropout=1.0 must be in"),
    (dict(head_dim=0), "head_dim=0 must be a positive int"),
    (dict(head_dim=9, position_embedding="rope"), "head_dim=9 must be even"),
    (dict(attention_bias="yes"), "attention_bias='yes' must be True or False"),
])
def test_bad_model_configs_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_validate_tp():
    c = llama_config(hidden_size=64, num_attention_heads=8, num_kv_heads=2, multiple_of=32)
    c.validate_tp(2)
    c.validate_tp(4)  # kv heads replicated: 2 kv heads on 4 ranks
    c.validate_tp(8)
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by tensor-parallel size 3"):
        c.validate_tp(3)
    with pytest.raises(ValueError, match="num_kv_heads=6 and tensor-parallel size 4"):
        llama_config(hidden_size=96, num_attention_heads=24, num_kv_heads=6, multiple_of=96).validate_tp(4)
    with pytest.raises(ValueError, match="ffn_hidden_size=100 is not divisible by tensor-parallel size 8"):
        gpt_config(ffn_hidden_size=100, num_attention_heads=8).validate_tp(8)


def test_padded_vocab():
    c = ModelConfig(vocab_size=50257, make_vocab_size_divisible_by=128)
    assert c.padded_vocab_size(1) == 50304 and c.padded_vocab_size(8) == 51200


def test_parallel_config():
    assert ParallelConfig(tp=2, pp=2, world_size=8).dp == 2
    assert ParallelConfig(tp=2).world_size == 2
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp·cp·pp = 2·1·2"):
        ParallelConfig(tp=2, pp=2, world_size=6)
    with pytest.raises(ValueError, match="ParallelConfig.tp must be an int >= 1"):
        ParallelConfig(tp=0)


@pytest.mark.parametrize("field,value,message", [
    ("norm_eps", 0.0, r"norm_eps=0.0 must be > 0"),
    ("norm_eps", -1e-5, r"norm_eps=-1e-05 must be > 0"),
    ("rope_theta", 0.0, r"rope_theta=0.0 must be > 0"),
    ("rope_theta", -10000.0, r"rope_theta=-10000.0 must be > 0"),
    ("init_std", -0.02, r"init_std=-0.02 must be >= 0"),
    ("vocab_size", True, r"vocab_size must be a positive int, got True"),
    ("num_kv_heads", True, r"num_kv_heads=True must divide"),
])
def test_bad_numeric_fields_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        llama_config(**{field: value})
    assert llama_config(init_std=0.0).init_std == 0.0  # zero init is allowed (e.g. to study it)


def test_parallel_sizes_reject_bools():
    with pytest.raises(ValueError, match=r"ParallelConfig.tp must be an int >= 1, got True"):
        ParallelConfig(tp=True)


LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)


@pytest.mark.parametrize("config", [gpt_config(), llama_config(num_kv_heads=2, name="a name, with spaces"),
                                    ParallelConfig(tp=2, pp=2, dp=2),
                                    llama_config(rope_scaling=LLAMA31_ROPE, head_dim=32, attention_bias=True)],
                         ids=["gpt", "llama", "parallel", "llama3"])
def test_print_is_wrapped_and_still_the_repr(config):
    """print(config) in a notebook: lines of at most 100 columns, broken between fields, and eval of
    the text gives the same config back (the repr, only wrapped)."""
    import minimegatron.config as module
    text = str(config)
    assert max(len(line) for line in text.splitlines()) <= 100 and (len(repr(config)) <= 100) == ("\n" not in text)
    assert eval(text, vars(module)) == config
    assert " ".join(text.split()) == " ".join(repr(config).split())


def test_head_dim_is_derived_unless_set():
    """None: hidden/heads (and derived again on replace); set, it frees hidden from heads·head_dim."""
    c = llama_config(hidden_size=64, num_attention_heads=4)
    assert (c.head_dim, c.attention_width, c.replace(hidden_size=128).head_dim) == (16, 64, 32)
    wide = llama_config(hidden_size=60, num_attention_heads=4, head_dim=32)
    assert (wide.head_dim, wide.attention_width, wide.replace(hidden_size=64).head_dim) == (32, 128, 32)
    assert ModelConfig.from_dict(wide.to_dict()) == wide
