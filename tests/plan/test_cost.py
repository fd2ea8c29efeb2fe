"""FLOPs against Narayanan et al. 2021's closed form (eq. 3), recomputation's extra forward."""
import pytest

from minimegatron.config import gpt_config
from minimegatron.plan.cost import model_flops


def test_gpt_flops_are_narayanans_formula():
    h, L, s, V, B = 512, 6, 256, 1000, 8
    config = gpt_config(hidden_size=h, num_layers=L, num_attention_heads=8, vocab_size=V, max_seq_len=s)
    paper = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * h * L))
    flops = model_flops(config, s, B * s)
    assert flops["model"] == pytest.approx(paper) and flops["hardware"] == flops["model"]
    full = model_flops(config, s, B * s, "full")
    assert full["model"] == flops["model"]  # MFU counts the model, not the recomputation
    layers_forward = 2 * L * 12 * h * h * B * s + 4 * L * s * h * B * s
    assert full["hardware"] - full["model"] == pytest.approx(layers_forward)
    assert model_flops(config, s, B * s, "selective")["hardware"] - flops["model"] == pytest.approx(
        4 * L * s * h * B * s)
