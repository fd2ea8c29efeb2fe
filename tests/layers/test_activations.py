"""GeLU (exact and tanh) and SwiGLU against their formulas and Hugging Face's activations."""
import math

import pytest
import torch

from minimegatron.layers.activations import apply_activation, gelu, swiglu

X = torch.linspace(-6, 6, 241)


def test_gelu_exact_and_tanh_are_the_formulas():
    exact = X * 0.5 * (1 + torch.erf(X / math.sqrt(2)))
    tanh = X * 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (X + 0.044715 * X ** 3)))
    torch.testing.assert_close(gelu(X), exact)
    torch.testing.assert_close(gelu(X, "tanh"), tanh)
    assert (gelu(X) - gelu(X, "tanh")).abs().max() < 1e-3  # close, not equal


def test_gelu_tanh_is_gpt2s_gelu_new():
    from transformers.activations import ACT2FN
    torch.testing.assert_close(apply_activation("gelu", X, "tanh"), ACT2FN["gelu_new"](X))


def test_swiglu_gates_the_second_half_with_silu_of_the_first():
    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    expected = gate * torch.sigmoid(gate) * up
    torch.testing.assert_close(swiglu(torch.cat([gate, up], -1)), expected)
    torch.testing.assert_close(apply_activation("swiglu", torch.cat([gate, up], -1)), expected)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="odd size 5"):
        swiglu(torch.randn(2, 5))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        apply_activation("relu", X)
