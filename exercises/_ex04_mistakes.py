"""Exercise 04's battery: plausible wrong RMSNorms and RoPEs, each with the message its grader must give."""
from __future__ import annotations

import torch

from exercises._ex04_checks import from_zero, rope


def _ms(x):
    return x.float().pow(2).mean(-1, keepdim=True)


def layer_norm(x, weight, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, None, eps)


RMS_BATTERY = [
    ("LayerNorm", layer_norm, r"this is LayerNorm"),
    ("eps outside the root", lambda x, w, eps: w * x / (_ms(x).sqrt() + eps), r"eps is outside the square root"),
    ("no eps", lambda x, w, eps: w * x / _ms(x).sqrt(), r"eps is missing"),
    ("no weight", lambda x, w, eps: x * torch.rsqrt(_ms(x) + eps), r"the weight is missing"),
    ("sum of squares", lambda x, w, eps: w * x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps),
     r"the SUM of x²"),
    ("mean over dim 0", lambda x, w, eps: w * x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps),
     r"the mean over the wrong dim"),
    ("fp32 out for bf16 in", lambda x, w, eps: (w.float() * x.float() * torch.rsqrt(_ms(x) + eps)),
     r"bfloat16 input came back as torch.float32"),
]
ROPE_BATTERY = [
    ("interleaved pairs", lambda x, p, t: rope(x, p, t, interleaved=True), r"interleaved pairs \(2i, 2i\+1\)"),
    ("positions from 0", lambda x, p, t: rope(x, p, t, positions=from_zero), r"the position_ids were ignored"),
    ("the wrong way", lambda x, p, t: rope(x, p, t, sign=-1.0), r"rotated the wrong way"),
    ("theta^(-i/d)", lambda x, p, t: rope(x, p, t, exponent=1.0), r"the frequencies are theta\^\(-i/d\)"),
    ("cos and sin swapped", lambda x, p, t: rope(x, p, t, swap=True), r"cos and sin swapped"),
    ("detached", lambda x, p, t: rope(x, p, t).detach(), r"not connected to the autograd graph"),
]
