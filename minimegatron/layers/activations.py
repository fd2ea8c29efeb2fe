"""MLP activations: GeLU (GPT) and SwiGLU (LLaMA).

GeLU (Hendrycks & Gimpel 2016) is ``x · Φ(x)`` with ``Φ`` the standard normal CDF. GPT-2 used the
tanh approximation (Hugging Face calls it ``gelu_new``)::

    gelu(x)      = x · ½ (1 + erf(x / √2))                                   approximate="none"
    gelu_tanh(x) = x · ½ (1 + tanh(√(2/π) · (x + 0.044715 x³)))               approximate="tanh"

SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer") is a *gated* unit: two projections of the
same input, one passed through SiLU and used to gate the other::

    swiglu(x) = silu(x·W_gate) ⊙ (x·W_up),    silu(z) = z · sigmoid(z)

It needs two ``h -> ffn`` matrices instead of one, which is why LLaMA shrinks ``ffn`` from ``4h`` to
``≈ 8/3·h``: three ``h×ffn`` matrices then cost what GPT's two ``h×4h`` ones do.

Tensor parallelism: both are element-wise, so they run on the column-parallel shard ``(..., ffn/tp)``
without communication. For SwiGLU the fused ``dense_h_to_4h`` weight is ``[W_gate; W_up]`` split with
stride 2 (see ``mlp.py``), so each rank's output is ``[gate_r | up_r]`` for the *same* ffn columns —
exactly what ``swiglu`` below splits in half.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GeLU, exact (``"none"``) or GPT-2's tanh approximation (``"tanh"``)."""
    return F.gelu(x, approximate=approximate)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) · up`` where ``x = [gate | up]`` along the last dim: (..., 2f) -> (..., f)."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu expects [gate | up] concatenated on the last dim, got odd size "
                         f"{x.shape[-1]}")
    gate, up = x.chunk(2, dim=-1)  # (..., f/tp) each: this rank's matching gate and up columns
    return F.silu(gate) * up


def apply_activation(kind: str, x: torch.Tensor, gelu_approximate: str = "none") -> torch.Tensor:
    """Dispatch on ``ModelConfig.activation``: ``"gelu"`` or ``"swiglu"``."""
    if kind == "gelu":
        return gelu(x, gelu_approximate)
    if kind == "swiglu":
        return swiglu(x)
    raise ValueError(f"unknown activation {kind!r}: use 'gelu' (GPT) or 'swiglu' (LLaMA)")
