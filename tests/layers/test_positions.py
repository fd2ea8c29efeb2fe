"""RoPE against Hugging Face LLaMA (and its defining property), ALiBi slopes against the paper,
the learned table's limit."""
import math

import pytest
import torch

from minimegatron.layers.positions import (LearnedPositionEmbedding, RotaryEmbedding, alibi_bias,
                                           alibi_slopes, apply_rotary, rotate_half,
                                           validate_position_ids)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_hugging_face_llama(theta):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    b, s, n, d = 2, 12, 3, 16
    hf_rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=n * d, num_attention_heads=n, rope_theta=theta))
    position_ids = torch.arange(5, 5 + s).expand(b, s)
    q, k = torch.randn(b, n, s, d), torch.randn(b, n, s, d)  # HF layout (b, n, s, d)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, *hf_rope(q, position_ids))
    cos, sin = RotaryEmbedding(d, theta)(position_ids)  # (s, b, 1, d)
    ours = lambda t: apply_rotary(t.permute(2, 0, 1, 3), cos, sin).permute(1, 2, 0, 3)  # noqa: E731
    torch.testing.assert_close(ours(q), hf_q)
    torch.testing.assert_close(ours(k), hf_k)


def test_rope_scores_depend_only_on_relative_position():
    d = 8
    rope = RotaryEmbedding(d, 10000.0)
    q, k = torch.randn(d), torch.randn(d)

    def score(m, n):
        cos, sin = rope(torch.tensor([[m, n]]))  # (2, 1, 1, d)
        x = torch.stack([q, k])[:, None, None, :]  # (2, 1, 1, d)
        r = apply_rotary(x, cos, sin)
        return (r[0] * r[1]).sum()

    torch.testing.assert_close(score(3, 1), score(10, 8))
    torch.testing.assert_close(score(0, 0), q @ k)  # position 0: no rotation
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rotate_half_pairs_i_with_i_plus_half():
    torch.testing.assert_close(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])),
                               torch.tensor([-3.0, -4.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="head_dim=7 must be even"):
        RotaryEmbedding(7)


def test_alibi_slopes_follow_press_et_al():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2.0 ** (-2 * (i + 1)) for i in range(4)]))
    # not a power of two: the 4-head slopes, then every other slope of the 8-head sequence
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8,
                                                              2 ** -1, 2 ** -3]))


def test_alibi_bias_is_minus_slope_times_distance():
    slopes = torch.tensor([0.5, 0.25])
    bias = alibi_bias(slopes, q_len=2, k_len=4)  # queries at positions 2 and 3
    assert bias.shape == (2, 2, 4)
    torch.testing.assert_close(bias[0, 1], torch.tensor([-1.5, -1.0, -0.5, 0.0]))
    torch.testing.assert_close(bias[1, 0, :3], torch.tensor([-0.5, -0.25, 0.0]))


def test_learned_positions_stop_at_the_table():
    table = LearnedPositionEmbedding(8, 4, check_positions=True)  # the debugging switch (a host sync)
    assert table(torch.arange(8)[None]).shape == (1, 8, 4)
    assert math.isclose(table.weight.std().item(), 0.02, rel_tol=0.5)
    with pytest.raises(ValueError, match="position 8 is beyond the learned position table of max_seq_len=8"):
        table(torch.arange(9)[None])
    with pytest.raises(ValueError, match="position 8 is beyond the learned position table of max_seq_len=8"):
        validate_position_ids(torch.tensor([[3, 8]]), 8)  # the same check, where positions enter
    assert not LearnedPositionEmbedding(8, 4).check_positions  # off by default: no sync per forward


# ---- RoPE scaling (Llama-3.1's llama3, linear) against HF's own ROPE_INIT_FUNCTIONS ---------------
LLAMA31 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)


@pytest.mark.parametrize("d,theta,params", [
    (128, 500000.0, LLAMA31),                                                  # Llama-3.1 8B itself
    (16, 10000.0, dict(LLAMA31, original_max_position_embeddings=32)),          # the HF parity tests'
    (64, 500000.0, dict(LLAMA31, factor=32.0, original_max_position_embeddings=8192)),  # Llama-3.2 1B
    (16, 10000.0, dict(rope_type="linear", factor=4.0)),
], ids=["llama3.1", "llama3-tiny", "llama3.2", "linear"])
def test_scaled_inv_freq_matches_hugging_face(d, theta, params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from minimegatron.layers.positions import rope_inv_freq
    from minimegatron.rope_scaling import RopeScaling
    hf_config = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, rope_theta=theta,
                            rope_scaling=dict(params), max_position_embeddings=1 << 17)
    hf_inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, None)
    assert attention_factor == 1.0  # llama3/linear only change the frequencies
    scaling = RopeScaling(**params)
    ours = rope_inv_freq(d, theta, scaling)
    torch.testing.assert_close(ours, hf_inv_freq, rtol=1e-6, atol=0)
    # the scaling acts: compared with plain RoPE some frequencies are divided by the factor ...
    plain = rope_inv_freq(d, theta)
    slowed = torch.isclose(ours, plain / scaling.factor, rtol=1e-6)
    assert slowed.any() and not torch.equal(ours, plain)
    if params["rope_type"] == "llama3":  # ... the highest kept, and a smoothed band in between
        kept = torch.isclose(ours, plain, rtol=1e-6)
        assert kept[0] and (~slowed & ~kept).any(), "every band of llama3 scaling is exercised"
    # the rotary module uses it: angle = position · θ'_i
    cos, _ = RotaryEmbedding(d, theta, scaling)(torch.tensor([[3]]))
    torch.testing.assert_close(cos[0, 0, 0, : d // 2], torch.cos(3 * hf_inv_freq))
