"""LayerNorm and RMSNorm against their formulas (and torch / Hugging Face LLaMA's RMSNorm)."""
import pytest
import torch

from minimegatron import launch
from minimegatron.layers.norms import LayerNorm, RMSNorm, build_norm
from minimegatron.mpu import ParallelState, initialize_model_parallel


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
    state = ParallelState(tp=2, sequence_parallel=True)  # constructing never communicates
    sp_norm = build_norm("layernorm", 8, sequence_parallel=True, state=state)
    assert all(p.sequence_parallel for p in sp_norm.parameters()) and sp_norm.state is state
    assert not any(p.sequence_parallel for p in build_norm("rmsnorm", 8).parameters())
    with pytest.raises(ValueError, match=r"RMSNorm\(sequence_parallel=True\) needs the ParallelState"):
        build_norm("rmsnorm", 8, sequence_parallel=True)  # no state: no TP group to sum the grads over
    assert isinstance(build_norm("rmsnorm", 8, bias=True), RMSNorm)  # RMSNorm never has a bias
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        build_norm("batchnorm", 8)


def _sequence_parallel_norm_grads(kind):
    """Rank r normalises its s/tp tokens; f(γ), f(β) make every rank's gradients the dense ones."""
    state = initialize_model_parallel(2, sequence_parallel=True)
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(8, 2, 6, generator=g), torch.randn(8, 2, 6, generator=g)  # (s, b, h)
    norm = build_norm(kind, 6, sequence_parallel=True, state=state, fused=False)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    rows = slice(state.tp_rank * 4, (state.tp_rank + 1) * 4)  # this rank's (s/tp, b, h) slice
    (norm(x[rows]) * c[rows]).sum().backward()
    return {n: p.grad for n, p in norm.named_parameters()}, {n: p.detach() for n, p in norm.named_parameters()}


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_sequence_parallel_norm_gradients_are_the_dense_ones_on_every_rank(kind):
    results = launch(_sequence_parallel_norm_grads, 2, kind, timeout=60)
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(8, 2, 6, generator=g), torch.randn(8, 2, 6, generator=g)
    dense = build_norm(kind, 6, fused=False)
    dense.load_state_dict(results[0][1])
    (dense(x) * c).sum().backward()
    for grads, _ in results:
        for name, p in dense.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
