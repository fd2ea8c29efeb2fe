"""ParallelTransformerLayer is the pre-norm block; recompute modes keep fewer activations, same math."""
import pytest
import torch

from minimegatron.config import gpt_config, llama_config
from minimegatron.layers.transformer import ParallelTransformer, ParallelTransformerLayer

S, B, H = 16, 2, 32


def _config(**kw):
    return llama_config(hidden_size=H, num_attention_heads=4, multiple_of=16, **kw)


def test_layer_is_pre_norm_residual_attention_then_mlp():
    torch.manual_seed(0)
    layer = ParallelTransformerLayer(gpt_config(hidden_size=H, num_attention_heads=4))
    x = torch.randn(S, B, H)
    h = x + layer.attention(layer.input_norm(x))
    expected = h + layer.mlp(layer.post_attention_norm(h))
    torch.testing.assert_close(layer(x), expected)


def _saved_bytes(model, x):
    """Bytes autograd keeps for backward during one forward (saved-tensor hooks)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, total


def test_recompute_modes_save_less_and_compute_the_same():
    torch.manual_seed(0)
    model = ParallelTransformer(_config(num_layers=2))
    x = torch.randn(S, B, H, requires_grad=True)
    results = {}
    for mode in ("none", "selective", "full"):
        model.recompute = mode
        x.grad = None
        model.zero_grad()
        out, saved = _saved_bytes(model, x)
        out.square().sum().backward()
        results[mode] = (saved, out.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()])
    assert results["none"][0] > results["selective"][0] > results["full"][0]
    for mode in ("selective", "full"):
        torch.testing.assert_close(results[mode][1], results["none"][1], rtol=0, atol=0)
        torch.testing.assert_close(results[mode][2], results["none"][2])
        for g, ref in zip(results[mode][3], results["none"][3]):
            torch.testing.assert_close(g, ref)


def test_recompute_setting_reaches_every_attention_and_is_checked():
    model = ParallelTransformer(_config(num_layers=3), recompute="selective")
    assert all(layer.attention.recompute_core for layer in model.layers)
    model.recompute = "full"
    assert not any(layer.attention.recompute_core for layer in model.layers)
    with pytest.raises(ValueError, match="recompute='all'"):
        ParallelTransformer(_config(), recompute="all")


def test_final_norm_switch():
    assert ParallelTransformer(_config(final_norm=False)).final_norm is None
    assert ParallelTransformer(_config()).final_norm is not None
