"""Exercise 04's grader internals: the usual wrong RMSNorms and RoPEs, each as the output it gives on
the grader's inputs, and its message (``ex04._check_with_grads`` names the first one a wrong output
matches). Nothing here is the exercise (``ex04_gpt_to_llama.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_mistakes(eps: float) -> list:
    def ms(x):
        return x.float().pow(2).mean(-1, keepdim=True)

    return [
        (lambda x, w: F.layer_norm(x, x.shape[-1:], w, None, eps),
         "this is LayerNorm (you subtracted the mean): RMSNorm divides by sqrt(mean(x²) + eps) without centring"),
        (lambda x, w: w * x / (ms(x).sqrt() + eps), "eps is outside the square root: sqrt(mean(x²) + eps)"),
        (lambda x, w: w * x / ms(x).sqrt(), "eps is missing: sqrt(mean(x²) + eps)"),
        (lambda x, w: x * torch.rsqrt(ms(x) + eps), "the weight is missing: y = x / sqrt(mean(x²) + eps) · weight"),
        (lambda x, w: w * x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps),
         "the SUM of x² instead of its mean: divide by sqrt(mean(x², last dim) + eps)"),
        (lambda x, w: w * x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps),
         "the mean over the wrong dim (the first): RMSNorm normalises each vector over the LAST dim (hidden)"),
        (lambda x, w: w * x * torch.rsqrt(x.var(-1, keepdim=True) + eps),
         "the variance (mean subtracted) instead of mean(x²): RMSNorm does not centre"),
    ]


def rope(x, position_ids, theta, *, exponent=2.0, sign=1.0, swap=False, positions=None, interleaved=False):
    """RoPE on x (s, b, n, d) with the usual mistakes as switches."""
    d = x.size(-1)
    inv_freq = 1.0 / (theta ** (exponent * torch.arange(d // 2, dtype=torch.float32) / d))
    pos = position_ids if positions is None else positions(x)
    angles = (pos.t().float()[..., None] * inv_freq)[:, :, None, :]  # (s, b, 1, d/2)
    cos, sin = angles.cos(), angles.sin()
    if swap:
        cos, sin = sin, cos
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin], -1).flatten(-2)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin], -1)


def from_zero(x):
    return torch.arange(x.size(0)).expand(x.size(1), -1)


def rope_mistakes(position_ids, theta) -> list:
    return [
        (lambda x: rope(x, position_ids, theta, interleaved=True),
         "you rotated interleaved pairs (2i, 2i+1) — Meta's original layout; this package (and Hugging Face) "
         "pair i with i + d/2"),
        (lambda x: rope(x, position_ids, theta, positions=from_zero),
         "the position_ids were ignored (positions 0 … s-1): a token's angle is position_ids[b, s]·θ_i — after a "
         "KV cache the positions do not start at 0"),
        (lambda x: rope(x, position_ids, theta, sign=-1.0),
         "rotated the wrong way: y_i = x_i·cos − x_{i+d/2}·sin and y_{i+d/2} = x_{i+d/2}·cos + x_i·sin"),
        (lambda x: rope(x, position_ids, theta, exponent=1.0), "the frequencies are theta^(-i/d): θ_i = "
                                                               "theta^(-2i/d), i = 0 … d/2-1"),
        (lambda x: rope(x, position_ids, theta, swap=True), "cos and sin swapped: x·cos(angle) + rotate_half(x)"
                                                            "·sin(angle)"),
    ]
