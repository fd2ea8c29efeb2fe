"""kernels.py: the plain paths equal the textbook formulas; the fused paths are taken only for "hpu".

A stand-in ``habana_frameworks`` (tests/fake_habana.py) lets the dispatch run on CPU; the equality of
fused and plain on a real Gaudi is checked at the bottom, skipped where there is none.
"""
import math

import pytest
import torch

from tests import fake_habana
from minimegatron import device, kernels

torch.manual_seed(0)


def _pretend_hpu(monkeypatch):
    """Make the dispatchers see every tensor as living on a Gaudi (CPU tensors stand in)."""
    monkeypatch.setattr(kernels, "_device_type", lambda t: "hpu")


# ---- the plain paths against independent formulas --------------------------------------------------
def test_plain_rms_norm_is_the_rmsnorm_formula():
    x, w = torch.randn(5, 3, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rms = torch.sqrt((x ** 2).sum(-1, keepdim=True) / 16 + 1e-6)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), x / rms * w, rtol=1e-12, atol=1e-12)
    # bf16 activations, fp32 weight: statistics in fp32, result promoted to fp32 (as HF LLaMA)
    xb = x.to(torch.bfloat16)
    out = kernels.rms_norm(xb, w.float(), 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (xb.double() / torch.sqrt((xb.double() ** 2).mean(-1, keepdim=True)
                                                              + 1e-6)).to(torch.bfloat16).float() * w.float())


def _rope_angles(s, d, theta=10000.0):
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    return torch.arange(s, dtype=torch.float64)[:, None] * inv  # (s, d/2): m·θ_i


def test_plain_rotary_rotates_each_pair_by_m_theta():
    """RoPE as complex numbers: z_i = x_i + j·x_{i+d/2} multiplied by e^{j·m·θ_i} (no rotate_half)."""
    s, b, n, d = 6, 2, 3, 8
    q, k = torch.randn(s, b, n, d, dtype=torch.float64), torch.randn(s, b, 1, d, dtype=torch.float64)
    ang = _rope_angles(s, d)
    cos = torch.cat((ang, ang), -1).cos()[:, None, None, :]  # (s, 1, 1, d)
    sin = torch.cat((ang, ang), -1).sin()[:, None, None, :]
    q2, k2 = kernels.apply_rotary(q, k, cos, sin)

    def by_complex(x):
        z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(ang), ang)[:, None, None]
        return torch.cat((z.real, z.imag), -1)

    torch.testing.assert_close(q2, by_complex(q))
    torch.testing.assert_close(k2, by_complex(k))
    # per-sample angles (s, b, 1, d) give the same answer when every sample has the same positions
    torch.testing.assert_close(kernels.rotary(q, cos.expand(s, b, 1, d), sin.expand(s, b, 1, d)), q2)
    # the point of RoPE: <q'_m, k'_n> depends on m - n only
    qv, kv = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rq = kernels.rotary(qv.expand(s, 1, 1, d), cos, sin)[:, 0, 0]  # the same vector at every position
    rk = kernels.rotary(kv.expand(s, 1, 1, d), cos, sin)[:, 0, 0]
    torch.testing.assert_close(rq[3] @ rk[1], rq[5] @ rk[3])


def _attention_formula(q, k, v, causal, scale, offset=0):
    scores = q @ k.transpose(-1, -2) * scale  # (b, n, s_q, s_k)
    if causal:
        i = torch.arange(q.shape[-2])[:, None] + offset
        scores = scores.masked_fill(torch.arange(k.shape[-2])[None, :] > i, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_kv", [4, 2, 1])  # MHA, GQA, MQA
def test_plain_attention_is_softmax_qk_v(causal, n_kv):
    b, n, s, d = 2, 4, 5, 8
    q = torch.randn(b, n, s, d, dtype=torch.float64)
    k, v = torch.randn(b, n_kv, s, d, dtype=torch.float64), torch.randn(b, n_kv, s, d, dtype=torch.float64)
    ke, ve = (t.repeat_interleave(n // n_kv, dim=1) for t in (k, v))  # query head j reads kv head j // g
    torch.testing.assert_close(kernels.scaled_dot_product_attention(q, k, v, causal),
                               _attention_formula(q, ke, ve, causal, 1 / math.sqrt(d)))
    torch.testing.assert_close(kernels.scaled_dot_product_attention(q, k, v, causal, scale=0.3),
                               _attention_formula(q, ke, ve, causal, 0.3))


def test_additive_bias_takes_the_spelled_out_formula_with_the_same_mask_and_repeat():
    """ALiBi's path: softmax(q·kᵀ/√d + bias + causal mask)·v, kv heads repeated by the one repeat_kv."""
    b, n, n_kv, d = 2, 4, 2, 8
    q = torch.randn(b, n, 3, d)  # fp32: the bias path computes its scores in fp32
    k, v = (torch.randn(b, n_kv, 6, d) for _ in range(2))
    bias = torch.randn(n, 3, 6)  # (n, s_q, s_k), broadcast over the batch
    ke, ve = kernels.repeat_kv(k, n // n_kv), kernels.repeat_kv(v, n // n_kv)  # (b, n, s_k, d)
    assert torch.equal(ke[:, 3], k[:, 1]) and kernels.repeat_kv(k, 1) is k
    mask = kernels.causal_mask(3, 6, q.device)  # end-aligned: query i sits at position 3 + i
    assert torch.equal(mask, torch.arange(6)[None, :] <= torch.arange(3, 6)[:, None])
    scores = (q @ ke.transpose(-1, -2) / math.sqrt(d) + bias).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(kernels.scaled_dot_product_attention(q, k, v, True, bias=bias),
                               torch.softmax(scores, -1) @ ve)


def test_kv_cache_queries_see_everything_before_them():
    """3 new queries against 7 keys: the causal mask is aligned to the end, not the start."""
    b, n, d = 1, 2, 4
    q, k, v = (torch.randn(b, n, 7, d, dtype=torch.float64) for _ in range(3))
    full = kernels.scaled_dot_product_attention(q, k, v, causal=True)
    last3 = kernels.scaled_dot_product_attention(q[:, :, 4:], k, v, causal=True)
    torch.testing.assert_close(last3, full[:, :, 4:])
    torch.testing.assert_close(last3, _attention_formula(q[:, :, 4:], k, v, True, 0.5, offset=4))


# ---- the dispatch decision --------------------------------------------------------------------------
def test_decision_is_a_function_of_device_type_and_switch():
    assert kernels._want_fused("hpu") and kernels._want_fused("hpu", True)
    assert not kernels._want_fused("hpu", fused=False)
    for kind in ("cpu", "cuda", "meta"):
        assert not kernels._want_fused(kind)


def test_fused_kernel_needs_hpu_and_the_module(monkeypatch):
    for op in kernels.FUSED_KERNELS:
        assert kernels.fused_kernel(op, "hpu") is None  # no habana_frameworks on this machine
    fake_habana.install(monkeypatch)
    for op, (_, attr) in kernels.FUSED_KERNELS.items():
        assert type(kernels.fused_kernel(op, "hpu")).__name__ == "type"
        assert kernels.fused_kernel(op, "hpu").__name__ == attr
        assert kernels.fused_kernel(op, "cpu") is None and kernels.fused_kernel(op, "cuda") is None
        assert kernels.fused_kernel(op, "hpu", fused=False) is None
    assert kernels.kernel_report("hpu")["rms_norm"] == "fused: normalization.FusedRMSNorm"
    assert set(kernels.kernel_report("cpu").values()) == {"plain PyTorch"}
    with pytest.raises(ValueError, match="unknown op 'layer_norm'"):
        kernels.fused_kernel("layer_norm", "hpu")


def test_a_gaudi_without_hpex_falls_back_to_plain(monkeypatch):
    rec = fake_habana.install(monkeypatch, kernels=False)
    _pretend_hpu(monkeypatch)
    x, w = torch.randn(4, 2, 8), torch.randn(8)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), kernels.plain_rms_norm(x, w, 1e-5))
    assert rec.calls == []
    assert "did not import" in kernels.kernel_report("hpu")["scaled_dot_product_attention"]


def _inputs():
    s, b, n, n_kv, d = 6, 2, 4, 2, 8
    ang = _rope_angles(s, d).float()
    cos = torch.cat((ang, ang), -1).cos()[:, None, None, :].expand(s, b, 1, d)  # (s, b, 1, d)
    sin = torch.cat((ang, ang), -1).sin()[:, None, None, :].expand(s, b, 1, d)
    return dict(x=torch.randn(s, b, 32), w=torch.randn(32), q=torch.randn(s, b, n, d),
                k=torch.randn(s, b, n_kv, d), cos=cos, sin=sin,
                qa=torch.randn(b, n, s, d), ka=torch.randn(b, n_kv, s, d), va=torch.randn(b, n_kv, s, d))


def _run_all(t, fused=True):
    return (kernels.rms_norm(t["x"], t["w"], 1e-5, fused=fused),
            *kernels.apply_rotary(t["q"], t["k"], t["cos"], t["sin"], fused=fused),
            kernels.scaled_dot_product_attention(t["qa"], t["ka"], t["va"], True, fused=fused))


def test_cpu_tensors_never_take_the_fused_path(monkeypatch):
    rec = fake_habana.install(monkeypatch)
    t = _inputs()
    _run_all(t)
    assert rec.calls == []


def test_on_hpu_the_kernels_get_the_documented_arguments(monkeypatch):
    t = _inputs()
    plain = _run_all(t, fused=False)
    rec = fake_habana.install(monkeypatch)
    _pretend_hpu(monkeypatch)
    fused = _run_all(t)
    for got, expected in zip(fused, plain):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert rec.names() == ["FusedRMSNorm", "RotaryPosEmbeddingHelperV1", "RotaryPosEmbeddingHelperV1",
                           "FusedSDPA"]
    assert rec.calls[0][1] == ((6, 2, 32), torch.float32, torch.float32, 1e-5)
    assert rec.calls[1][1] == ((12, 1, 4, 8), (12, 1, 1, 8), 0)  # (s·b, 1, n, d) against (s·b, 1, 1, d)
    assert rec.calls[2][1] == ((12, 1, 2, 8), (12, 1, 1, 8), 0)
    assert rec.calls[3][1] == ((2, 4, 6, 8), (2, 4, 6, 8), None, 0.0, True, 1 / math.sqrt(8))
    # the switch turns every kernel off, and a KV-cache step (s_q < s_k) keeps the plain path
    rec.calls.clear()
    _run_all(t, fused=False)
    kernels.scaled_dot_product_attention(t["qa"][:, :, -1:], t["ka"], t["va"], True)
    assert rec.calls == []


def test_fused_rms_norm_gets_3d_input_of_the_weight_dtype(monkeypatch):
    rec = fake_habana.install(monkeypatch)
    _pretend_hpu(monkeypatch)
    x, w = torch.randn(10, 16, dtype=torch.bfloat16), torch.randn(16)  # 2-D bf16 input, fp32 weight
    out = kernels.rms_norm(x, w, 1e-5)
    assert rec.calls[0][1][:3] == ((10, 1, 16), torch.float32, torch.float32)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, kernels.plain_rms_norm(x, w, 1e-5), rtol=2e-2, atol=2e-2)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="last dim 8 but weight has 16"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(16), 1e-5)
    with pytest.raises(ValueError, match=r"must be \(4, 2 or 1, 1, 8\)"):
        kernels.rotary(torch.randn(4, 2, 3, 8), torch.ones(5, 1, 1, 8), torch.ones(5, 1, 1, 8))
    with pytest.raises(ValueError, match="n_kv=3 must divide n_q=4"):
        kernels.scaled_dot_product_attention(torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8),
                                             torch.randn(1, 3, 5, 8))


# ---- on a real Gaudi --------------------------------------------------------------------------------
@pytest.mark.skipif(device.device_count("hpu") == 0, reason="needs an Intel Gaudi (habana_frameworks)")
def test_fused_equals_plain_on_a_real_gaudi(monkeypatch):
    monkeypatch.setenv("MINIMEGATRON_DEVICE", "hpu")  # conftest pins cpu for the rest of the suite
    t = {name: v.to("hpu") for name, v in _inputs().items()}
    for op in kernels.FUSED_KERNELS:
        assert kernels.fused_kernel(op, "hpu") is not None, f"{op}: Habana's kernel did not import"
    for name in ("x", "q", "k", "qa"):
        t[name].requires_grad_(True)
    results = {}
    for fused in (True, False):
        outs = _run_all(t, fused=fused)
        loss = sum((o.float() * torch.linspace(0, 1, o.shape[-1], device="hpu")).sum() for o in outs)
        grads = torch.autograd.grad(loss, [t["x"], t["q"], t["qa"]])
        device.mark_step()
        results[fused] = [o.detach().cpu() for o in (*outs, *grads)]
    for got, expected in zip(results[True], results[False]):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
