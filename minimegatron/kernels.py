"""Gaudi's fused kernels where they exist, plain PyTorch everywhere else — behind one switch.

Outside the matmuls, three ops of a LLaMA layer are worth a fused kernel on Gaudi. Each dispatcher
below uses Habana's kernel only when the tensor lives on ``"hpu"`` *and* the kernel imports; on CPU,
CUDA (where ``F.scaled_dot_product_attention`` already picks flash attention by itself) or a Gaudi
without the kernel, it runs the plain PyTorch formula. Both paths compute the same function:

``rms_norm(x, w, eps)``
    plain: ``w · x / sqrt(mean(x²) + eps)``, statistics in fp32
    Gaudi: ``hpex.normalization.FusedRMSNorm.apply(x, w, eps)``
``apply_rotary(q, k, cos, sin)``
    plain: ``x·cos + rotate_half(x)·sin`` for x in (q, k)
    Gaudi: ``hpex.kernels.RotaryPosEmbeddingHelperV1.apply(x, cos, sin, 0)``
``scaled_dot_product_attention(q, k, v, causal, scale, bias)``
    plain: ``F.scaled_dot_product_attention`` = ``softmax(q·kᵀ·scale + causal mask) · v``; with an
           additive ``bias`` (ALiBi) the formula spelled out, scores and softmax in fp32; a
           ``key_mask`` (left-padded batch) adds its mask to either
    Gaudi: ``hpex.kernels.FusedSDPA.apply(q, k, v, None, dropout_p, causal, scale)`` (no bias)

**The switch** is the keyword ``fused: bool = True`` of every dispatcher; model code passes its
``ModelConfig.use_fused_kernels`` (nothing here reads a global or an environment variable).
``fused=False`` forces the plain path everywhere, e.g. to measure what the kernels buy.

**Layouts** (Megatron's, sequence first):

* ``rms_norm``: ``x (..., h)`` — usually ``(s, b, h)`` or ``(s/tp, b, h)`` under sequence parallelism.
* ``apply_rotary``: ``q (s, b, n_q, d)``, ``k (s, b, n_kv, d)``, ``cos``/``sin`` ``(s, b, 1, d)`` or
  ``(s, 1, 1, d)`` with ``cos = cos(m·θ)`` repeated over both halves (Hugging Face's rotate_half
  convention: dim ``i`` pairs with ``i + d/2``). For the Gaudi kernel, ``(s, b)`` is flattened into one
  row axis, ``(s·b, 1, n, d)`` against ``(s·b, 1, 1, d)``: every row has its own angle, which is all
  that "position" means to an elementwise rotation.
* ``scaled_dot_product_attention``: ``q (b, n_q, s_q, d)``, ``k``/``v`` ``(b, n_kv, s_k, d)`` — the
  layout of ``F.scaled_dot_product_attention`` and of ``FusedSDPA``. Grouped-query attention
  (``n_kv`` dividing ``n_q``) repeats each kv head for its ``n_q/n_kv`` query heads (query head ``j``
  reads kv head ``j // (n_q/n_kv)``: :func:`repeat_kv`). With a KV cache (``s_q < s_k``) the causal
  mask is aligned to the *end*: query ``i`` sits at position ``s_k - s_q + i`` (:func:`causal_mask`);
  that case always takes the plain path. These two are the only GQA repeat and causal mask of the
  package: attention calls this dispatcher with its unrepeated keys and values.
"""
from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.nn.functional as F

# op -> (module, attribute) in Habana's software stack
FUSED_KERNELS = {
    "rms_norm": ("habana_frameworks.torch.hpex.normalization", "FusedRMSNorm"),
    "apply_rotary": ("habana_frameworks.torch.hpex.kernels", "RotaryPosEmbeddingHelperV1"),
    "scaled_dot_product_attention": ("habana_frameworks.torch.hpex.kernels", "FusedSDPA"),
}


def _want_fused(device_type: str, fused: bool = True) -> bool:
    """The whole decision, before any import: the switch is on and the tensor is on a Gaudi."""
    return fused and device_type == "hpu"


def fused_kernel(op: str, device_type: str, fused: bool = True) -> Any | None:
    """Habana's kernel for ``op`` if it should and can be used for tensors on ``device_type``."""
    if op not in FUSED_KERNELS:
        raise ValueError(f"unknown op {op!r}; the fused ops are {sorted(FUSED_KERNELS)}")
    if not _want_fused(device_type, fused):
        return None
    module, attr = FUSED_KERNELS[op]
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def kernel_report(device_type: str, fused: bool = True) -> dict[str, str]:
    """Which implementation each op would use for tensors on ``device_type``: for notebooks and logs."""
    report = {}
    for op, (module, attr) in FUSED_KERNELS.items():
        if fused_kernel(op, device_type, fused) is not None:
            report[op] = f"fused: {module.rsplit('.', 1)[-1]}.{attr}"
        elif _want_fused(device_type, fused):
            report[op] = f"plain PyTorch ({module}.{attr} did not import)"
        else:
            report[op] = "plain PyTorch"
    return report


def _device_type(t: torch.Tensor) -> str:
    return t.device.type  # one indirection, so that tests can pretend a CPU tensor is on "hpu"


# ---- RMSNorm -------------------------------------------------------------------------------------
def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · x / sqrt(mean(x²) + eps)`` over the last dim, statistics in fp32 (LLaMA/HF)."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays fp64
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, fused: bool = True) -> torch.Tensor:
    """RMSNorm of ``x (..., h)`` with gain ``weight (h,)``; see the module docstring."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has last dim {x.shape[-1]} but weight has {weight.shape[-1]} "
                         "entries; the norm acts on the hidden (last) dimension")
    kernel = fused_kernel("rms_norm", _device_type(x), fused)
    if kernel is None:
        return plain_rms_norm(x, weight, eps)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)  # what the plain formula returns
    x3 = x if x.dim() == 3 else x.reshape(-1, 1, x.shape[-1])  # (tokens, 1, h): the kernel wants 3-D
    y = kernel.apply(x3.to(weight.dtype), weight, eps)  # input and weight must share a dtype
    return y.reshape(x.shape).to(out_dtype)


# ---- rotary position embedding ---------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1 | x2] -> [-x2 | x1]`` on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def plain_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` (cos/sin cast to x's dtype, as Hugging Face does)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def _check_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if cos.shape != sin.shape:
        raise ValueError(f"rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    if x.dim() != 4 or cos.dim() != 4:
        raise ValueError(f"rotary: expected x (s, b, n, d) and cos/sin (s, b|1, 1, d), got x "
                         f"{tuple(x.shape)} and cos {tuple(cos.shape)}")
    s, b, _, d = x.shape
    if d % 2 or cos.shape[-1] != d or cos.shape[0] != s or cos.shape[1] not in (1, b) or cos.shape[2] != 1:
        raise ValueError(f"rotary: cos/sin {tuple(cos.shape)} do not fit x {tuple(x.shape)}: they must be "
                         f"({s}, {b} or 1, 1, {d}) with an even head_dim (d = head_dim, cat(freqs, freqs))")


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
    """Rotate one tensor ``x (s, b, n, d)`` by ``cos``/``sin (s, b|1, 1, d)``."""
    _check_rotary(x, cos, sin)
    kernel = fused_kernel("apply_rotary", _device_type(x), fused)
    if kernel is None:
        return plain_rotary(x, cos, sin)
    s, b, n, d = x.shape
    rows = x.reshape(s * b, 1, n, d)  # (s·b, 1, n, d): every (position, sample) is one row
    cos = cos.expand(s, b, 1, d).reshape(s * b, 1, 1, d).to(x.dtype)  # (s·b, 1, 1, d)
    sin = sin.expand(s, b, 1, d).reshape(s * b, 1, 1, d).to(x.dtype)
    return kernel.apply(rows, cos, sin, 0).reshape(s, b, n, d)  # offset 0: angles already per row


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                 fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on queries ``(s, b, n_q, d)`` and keys ``(s, b, n_kv, d)``; returns ``(q', k')``."""
    return rotary(q, cos, sin, fused=fused), rotary(k, cos, sin, fused=fused)


# ---- attention -------------------------------------------------------------------------------------
def causal_mask(s_q: int, s_k: int, device: torch.device) -> torch.Tensor:
    """True where query ``i`` (at position ``s_k - s_q + i``) may see key ``j``: (s_q, s_k)."""
    return torch.ones(s_q, s_k, dtype=torch.bool, device=device).tril(diagonal=s_k - s_q)


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """GQA/MQA: ``(b, n_kv, s, d) -> (b, n_kv·group, s, d)``, query head ``j`` reads kv head ``j // group``."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _attention_with_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         causal: bool, scale: float | None, dropout_p: float) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + bias [+ causal mask])·v`` spelled out, scores in fp32; bias (…, s_q, s_k)."""
    scores = (q @ k.transpose(-2, -1)).float()  # (b, n, s_q, s_k) fp32
    scores = scores / math.sqrt(q.size(-1)) if scale is None else scores * scale
    if causal:  # keys after the query: never seen
        bias = bias.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    probs = torch.softmax(scores + bias, dim=-1).to(q.dtype)
    probs = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    return probs @ v  # (b, n, s_q, d)


def padded_attention_mask(key_mask: torch.Tensor, s_q: int, causal: bool = True) -> torch.Tensor:
    """Which keys each query sees in a left-padded batch: (b, 1, s_q, s_k) bool, from ``key_mask``
    (b, s_k), True = a real token. Causal (end-aligned) AND a real key — OR the query's own key, so
    that a pad query (whose every earlier key is a pad) still has one key and gives a finite, unused
    output instead of softmax over nothing (NaN, which would leak into its neighbours as 0·NaN)."""
    b, s_k = key_mask.shape
    own = torch.arange(s_k, device=key_mask.device) == (
        torch.arange(s_q, device=key_mask.device)[:, None] + s_k - s_q)  # (s_q, s_k): the diagonal
    seen = causal_mask(s_q, s_k, key_mask.device) if causal else torch.ones_like(own)
    return (seen & key_mask.bool()[:, None, None, :]) | own  # (b, 1, s_q, s_k)


def plain_scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                       causal: bool = True, scale: float | None = None,
                                       dropout_p: float = 0.0, bias: torch.Tensor | None = None,
                                       key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the end-aligned causal mask when ``s_q != s_k``, or the
    spelled-out formula with an additive ``bias``; q, k, v share their head count here. ``key_mask``
    (b, s_k): a padded batch, masked by :func:`padded_attention_mask`."""
    s_q, s_k = q.shape[-2], k.shape[-2]
    if key_mask is not None:
        allowed = padded_attention_mask(key_mask, s_q, causal)  # (b, 1, s_q, s_k), causal included
        if bias is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p,
                                                  scale=scale)
        bias = bias.masked_fill(~allowed, float("-inf"))  # (b, n, s_q, s_k)
        return _attention_with_bias(q, k, v, bias, False, scale, dropout_p)
    if bias is not None:
        return _attention_with_bias(q, k, v, bias, causal, scale, dropout_p)
    if causal and s_q != s_k:
        mask = causal_mask(s_q, s_k, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 causal: bool = True, scale: float | None = None, *,
                                 dropout_p: float = 0.0, bias: torch.Tensor | None = None,
                                 key_mask: torch.Tensor | None = None, fused: bool = True) -> torch.Tensor:
    """``softmax(q·kᵀ·scale [+ bias] [+ causal mask]) · v``: ``(b, n_q, s_q, d)``; ``scale`` None = 1/sqrt(d).

    ``bias`` (broadcast to ``(b, n_q, s_q, s_k)``, e.g. ALiBi's ``(n_q, s_q, s_k)``) takes the plain path,
    and so does ``key_mask`` (b, s_k) bool, True = a real key: a left-padded batch, whose pad keys no
    query sees (:func:`padded_attention_mask`). Without them nothing changes.
    ``dropout_p`` applies to the attention probabilities: pass 0 in eval, and run the call under the
    model-parallel RNG tracker when heads are split over TP ranks.
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention: expected q (b, n_q, s_q, d) and k, v (b, n_kv, s_k, d), got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    n_q, n_kv = q.shape[1], k.shape[1]
    if n_q % n_kv or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} do not fit: batch and "
                         f"head_dim must match and n_kv={n_kv} must divide n_q={n_q} (GQA groups)")
    k, v = repeat_kv(k, n_q // n_kv), repeat_kv(v, n_q // n_kv)  # (b, n_q, s_k, d)
    kernel = fused_kernel("scaled_dot_product_attention", _device_type(q), fused)
    plain = bias is not None or key_mask is not None or (causal and q.shape[-2] != k.shape[-2])
    if kernel is None or plain:
        return plain_scaled_dot_product_attention(q, k, v, causal, scale, dropout_p, bias, key_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return kernel.apply(q, k, v, None, dropout_p, causal, scale)  # (q, k, v, mask, p, causal, scale)
