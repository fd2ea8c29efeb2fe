"""Normalisation layers: LayerNorm (GPT) and RMSNorm (LLaMA).

Both act on the last dimension ``h`` and are *replicated*: every tensor-parallel rank holds the same
``h`` weights and applies them to its own activations. Nothing is split, so nothing is communicated.

LayerNorm (Ba et al. 2016) centres and scales, then applies a gain ``γ`` and a bias ``β``::

    y = (x - mean(x)) / sqrt(var(x) + eps) · γ + β           2h parameters (h without bias)

RMSNorm (Zhang & Sennrich 2019) drops the centring and the bias — one reduction instead of two::

    y = x / sqrt(mean(x²) + eps) · γ                          h parameters

Sequence parallelism (Korthikanti et al. 2022, §4.2.2) runs norms on a ``(s/tp, b, h)`` slice of the
sequence. Each rank then sees different tokens, so its ``γ``/``β`` gradient is only a *partial* sum
over the sequence: the parameters are marked ``param.sequence_parallel = True`` and the training step
all-reduces their gradients over the TP group
(``minimegatron.mpu.mappings.allreduce_sequence_parallel_gradients``), as Megatron does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimegatron import kernels


def _mark_sequence_parallel(module: nn.Module, sequence_parallel: bool) -> None:
    for p in module.parameters():
        p.sequence_parallel = sequence_parallel  # grads are partial sums under SP: all-reduce them


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) · weight + bias`` over the last dim; ``bias=False`` drops β."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True,
                 sequence_parallel: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device)) if bias else None
        _mark_sequence_parallel(self, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (s or s/tp, b, h) -> same
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dim, computed in fp32 (as LLaMA does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 fused: bool = True) -> None:
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        _mark_sequence_parallel(self, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (s or s/tp, b, h) -> same
        # the formula is kernels.plain_rms_norm; on Gaudi ("hpu" tensors) its fused kernel
        return kernels.rms_norm(x, self.weight, self.eps, fused=self.fused)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(kind: str, hidden_size: int, eps: float = 1e-5, bias: bool = True,
               sequence_parallel: bool = False, fused: bool = True) -> nn.Module:
    """``"layernorm"`` -> LayerNorm (with β iff ``bias``), ``"rmsnorm"`` -> RMSNorm (never a bias)."""
    if kind == "layernorm":
        return LayerNorm(hidden_size, eps, bias=bias, sequence_parallel=sequence_parallel)
    if kind == "rmsnorm":
        return RMSNorm(hidden_size, eps, sequence_parallel=sequence_parallel, fused=fused)
    raise ValueError(f"unknown norm {kind!r}: use 'layernorm' (GPT) or 'rmsnorm' (LLaMA)")
