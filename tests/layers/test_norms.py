"""LayerNorm and RMSNorm against their formulas (and torch / Hugging Face LLaMA's RMSNorm)."""
import pytest
import torch

from minimegatron.layers.norms import LayerNorm, RMSNorm, build_norm


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_layernorm_is_the_formula():
    norm = LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = _x(6, 2, 32)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(x, (32,), norm.weight, norm.bias))


def test_layernorm_without_bias_has_h_parameters():
    assert sum(p.numel() for p in LayerNorm(32, bias=False).parameters()) == 32
    assert sum(p.numel() for p in LayerNorm(32).parameters()) == 64


def test_rmsnorm_is_the_formula_and_matches_hugging_face():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm, hf = RMSNorm(32, eps=1e-6), LlamaRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        hf.weight.copy_(norm.weight)
    x = _x(6, 2, 32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x), hf(x))
    assert sum(p.numel() for p in norm.parameters()) == 32
    assert abs(norm(x * 7.0) - norm(x)).max() < 1e-5  # scale invariant: no centring, no bias


def test_rmsnorm_in_low_precision_computes_in_fp32():
    norm = RMSNorm(32, dtype=torch.bfloat16)
    x = _x(4, 32, dtype=torch.bfloat16) * 300
    out = norm(x)
    assert out.dtype == torch.bfloat16
    reference = RMSNorm(32)(x.float())  # the fp32 computation, rounded once at the end
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)


def test_sequence_parallel_marks_the_weights_and_build_norm_checks_the_kind():
    assert all(p.sequence_parallel for p in build_norm("layernorm", 8, sequence_parallel=True).parameters())
    assert not any(p.sequence_parallel for p in build_norm("rmsnorm", 8).parameters())
    assert isinstance(build_norm("rmsnorm", 8, bias=True), RMSNorm)  # RMSNorm never has a bias
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        build_norm("batchnorm", 8)
