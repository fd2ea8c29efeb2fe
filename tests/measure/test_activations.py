"""Saved-activation bytes per layer vs the formula derived for our code (and the paper's identities)."""
import pytest
import torch

from minimegatron import launch
from minimegatron.config import gpt_config, llama_config
from minimegatron.measure.activation_formulas import (korthikanti_activation_bytes,
                                                      layer_activation_bytes, layer_activation_terms)
from minimegatron.measure.activations import SavedActivationCounter

S, B, H, A = 16, 2, 64, 4
CONFIGS = {
    "gpt": gpt_config(hidden_size=H, num_attention_heads=A, num_layers=2, vocab_size=128),
    "llama": llama_config(hidden_size=H, num_attention_heads=A, num_layers=2, vocab_size=128),
    "llama-gqa": llama_config(hidden_size=H, num_attention_heads=A, num_kv_heads=2, num_layers=2,
                              vocab_size=128),
    "gpt-alibi (math attention)": gpt_config(hidden_size=H, num_attention_heads=A, num_layers=2,
                                             vocab_size=128, position_embedding="alibi"),
}


def _measure(tp, cases):
    from minimegatron.layers import ParallelTransformer, RotaryEmbedding
    from minimegatron.mpu import initialize_model_parallel

    out = []
    for name, sp, recompute in cases:
        cfg = CONFIGS[name]
        state = initialize_model_parallel(tp, 1, sequence_parallel=sp)
        torch.manual_seed(0)
        model = ParallelTransformer(cfg, state, recompute=recompute)
        x = torch.randn(S // tp if sp else S, B, H, requires_grad=True)
        rotary = None
        if cfg.position_embedding == "rope":
            rotary = RotaryEmbedding(cfg.head_dim)(torch.arange(S).expand(B, S))
        with SavedActivationCounter(model) as acts:
            y = model(x, rotary)
        y.sum().backward()  # what was saved is usable: backward runs
        out.append(acts.per_layer())
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_saved_bytes_per_layer_match_the_derived_formula(tp):
    cases = [(name, sp, rec) for name in CONFIGS for sp in ((False, True) if tp > 1 else (False,))
             for rec in ("none", "selective", "full")
             if not (name == "llama-gqa" and tp > CONFIGS[name].num_kv_heads)]
    measured = launch(_measure, tp, tp, cases, timeout=120)[0]
    for (name, sp, rec), per_layer in zip(cases, measured):
        expected = layer_activation_bytes(CONFIGS[name], S, B, tp, sp, rec)
        # layer 1: layer 0 also keeps RoPE's cos/sin, shared by all layers
        got = per_layer["layers.1"]
        assert abs(got - expected) <= 0.10 * expected, (
            f"{name} tp={tp} sp={sp} recompute={rec}: measured {got} B, formula {expected:.0f} B")
        assert per_layer["layers.0"] >= got


def test_gpt_layer_keeps_the_papers_16_activations_per_sbh():
    """fp32, no dropout, flash attention: 4·(16·sbh + (4 + a)·sb) bytes — the paper's 34 bytes = 16
    two-byte activations + 2 bytes of dropout masks, the a·s² matrix replaced by the logsumexp."""
    cfg = CONFIGS["gpt"]
    assert layer_activation_bytes(cfg, S, B) == 4 * (16 * S * B * H + (4 + A) * S * B)
    assert korthikanti_activation_bytes(S, B, H, A) == S * B * H * (34 + 5 * A * S / H)


def test_paper_formula_identities():
    s, b, h, a, t = 2048, 1, 6144, 48, 8
    plain = korthikanti_activation_bytes(s, b, h, a)
    assert korthikanti_activation_bytes(s, b, h, a, t, sequence_parallel=True) == pytest.approx(plain / t)
    assert korthikanti_activation_bytes(s, b, h, a, t, True, "selective") == pytest.approx(34 * s * b * h / t)
    assert korthikanti_activation_bytes(s, b, h, a, t) == pytest.approx(
        s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert korthikanti_activation_bytes(s, b, h, a, t, recompute="full") == 2 * s * b * h


def test_sequence_parallel_shrinks_every_term_by_t():
    """Like Megatron, the column layers keep the (s/t, b, h) shard of their input, not the gathered
    (s, b, h): every term of the TP+SP layer is the unsplit term over t, as the paper's sbh/t·(34 + …)."""
    for name in ("gpt", "llama"):
        plain = layer_activation_terms(CONFIGS[name], S, B)
        sp = layer_activation_terms(CONFIGS[name], S, B, tp=4, sequence_parallel=True)
        assert plain.keys() == sp.keys()
        assert {k: 4 * v for k, v in sp.items()} == plain, name
    gqa = layer_activation_terms(CONFIGS["llama-gqa"], S, B, tp=2, sequence_parallel=True)
    assert gqa["QKV input"] == S * B * H / 2  # query and key_value save the same shard: once


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="recompute='sometimes'"):
        layer_activation_bytes(CONFIGS["gpt"], S, B, recompute="sometimes")
    with pytest.raises(ValueError, match="dropout = 0"):
        layer_activation_bytes(CONFIGS["gpt"].replace(dropout=0.1), S, B)
    with pytest.raises(ValueError, match="num_kv_heads=2 < tp=4"):
        layer_activation_bytes(CONFIGS["llama-gqa"], S, B, tp=4)
    wide = CONFIGS["llama-gqa"].replace(head_dim=2 * CONFIGS["llama-gqa"].head_dim)
    with pytest.raises(ValueError, match="heads·head_dim = .* != hidden_size"):
        layer_activation_bytes(wide, S, B)


def test_parameters_and_shared_views_are_not_counted():
    lin = torch.nn.Linear(8, 24)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedActivationCounter(lin, layers={"lin": lin}) as acts:
        q, k, v = lin(x).chunk(3, dim=-1)  # three views of one (4, 24) storage
        y = (q * k * v).sum()
    # the linear keeps x (its weight is a parameter); q·k keeps the (4, 24) output once (q, k are
    # views of it); (q·k)·v keeps q·k, a new (4, 8), and v, the same (4, 24) again
    assert acts.total_bytes == 4 * 8 * 4 + 4 * 24 * 4 + 4 * 8 * 4
    assert acts.per_layer() == {"lin": 4 * 8 * 4, "other": 4 * 24 * 4 + 4 * 8 * 4}
    y.backward()
    assert "| lin | (4, 8) | float32 | 1 | 128 |" in acts.table()
