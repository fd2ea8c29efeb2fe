"""Normalisation layers: LayerNorm (GPT) and RMSNorm (LLaMA).

Both act on the last dimension ``h`` and are *replicated*: every tensor-parallel rank holds the same
``h`` weights and applies them to its own activations. Nothing is split.

LayerNorm (Ba et al. 2016) centres and scales, then applies a gain ``γ`` and a bias ``β``::

    y = (x - mean(x)) / sqrt(var(x) + eps) · γ + β           2h parameters (h without bias)

RMSNorm (Zhang & Sennrich 2019) drops the centring and the bias — one reduction instead of two::

    y = x / sqrt(mean(x²) + eps) · γ                          h parameters

**Sequence parallelism** (Korthikanti et al. 2022, §4.2.2) runs the norms on rank r's ``(s/tp, b, h)``
slice of the sequence. The output is still exact (each token is normalised by itself), but the weight
gradient is a sum over tokens, ``∂L/∂γ = Σ_{tokens} ∂L/∂y ⊙ x̂``, and rank r sees only its own tokens:
``∂L/∂γ = Σ_r ∂L/∂γ|_r``, a sum over the TP group. So under SP (``sequence_parallel=True``, with the
``state``) the norm uses its weights through ``f`` (``copy_to_tensor_model_parallel_region``)::

    forward:   y = norm(x; f(γ), f(β))        f: identity                     no communication
    backward:  ∂L/∂γ = all-reduce(∂L/∂γ|_r)   f's backward, over the TP group  one all-reduce of h
                                              per weight vector, per forward

— the same ``f`` that opens each TP block, and the way ``mpu.layers.ReplicatedLinear`` enters its
weight and ``RowParallelLinear`` its bias (added after the reduce-scatter) under SP. Autograd then sums
the gradient wherever backward runs — DeepSpeed's plain and pipeline engines, any ZeRO stage, a
hand-written loop — per micro-batch; nothing runs after backward. The weights keep Megatron's mark
``param.sequence_parallel = True``. Megatron-LM instead all-reduces the marked gradients after
backward (``finalize_model_grads``), one flat buffer per step: it owns its data-parallel reduction,
whereas DeepSpeed's ZeRO-2/3 reduce gradients *inside* backward, leaving no later point every engine
shares. Cost: ``measure.comm.tp_layer_comm`` counts the small all-reduces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimegatron import kernels
from minimegatron.mpu.mappings import copy_to_tensor_model_parallel_region
from minimegatron.mpu.state import ParallelState


def _mark_sequence_parallel(module: nn.Module, sequence_parallel: bool,
                            state: ParallelState | None) -> bool:
    """Check that SP comes with a state (its TP group sums the gradients); mark the weights."""
    if sequence_parallel and state is None:
        raise ValueError(f"{type(module).__name__}(sequence_parallel=True) needs the ParallelState "
                         "(state=...): its weight gradients are summed over that state's TP group")
    for p in module.parameters():
        p.sequence_parallel = sequence_parallel  # Megatron's mark: saw s/tp tokens, grad summed by f
    return sequence_parallel


def _enter(weight: torch.Tensor | None, module: nn.Module) -> torch.Tensor | None:
    """``f(weight)`` under SP (identity forward, all-reduce of ∂L/∂weight backward), else ``weight``."""
    if weight is None or not module.sequence_parallel:
        return weight
    return copy_to_tensor_model_parallel_region(weight, module.state)


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) · weight + bias`` over the last dim; ``bias=False`` drops β."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True,
                 sequence_parallel: bool = False, state: ParallelState | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device)) if bias else None
        self.state, self.sequence_parallel = state, _mark_sequence_parallel(self, sequence_parallel, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (s or s/tp, b, h) -> same
        weight, bias = _enter(self.weight, self), _enter(self.bias, self)  # f(γ), f(β) under SP
        return F.layer_norm(x, self.weight.shape, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dim, computed in fp32 (as LLaMA does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 state: ParallelState | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, fused: bool = True) -> None:
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.state, self.sequence_parallel = state, _mark_sequence_parallel(self, sequence_parallel, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (s or s/tp, b, h) -> same
        # the formula is kernels.plain_rms_norm; on Gaudi ("hpu" tensors) its fused kernel
        return kernels.rms_norm(x, _enter(self.weight, self), self.eps, fused=self.fused)  # f(γ) under SP

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, sequence_parallel={self.sequence_parallel}"


def build_norm(kind: str, hidden_size: int, eps: float = 1e-5, bias: bool = True,
               sequence_parallel: bool = False, state: ParallelState | None = None,
               fused: bool = True) -> nn.Module:
    """``"layernorm"`` -> LayerNorm (with β iff ``bias``), ``"rmsnorm"`` -> RMSNorm (never a bias).

    ``sequence_parallel=True`` (the input is the (s/tp, b, h) slice) needs ``state``: its TP group
    sums the weight gradients (f, see the module docstring)."""
    sp = dict(sequence_parallel=sequence_parallel, state=state)
    if kind == "layernorm":
        return LayerNorm(hidden_size, eps, bias=bias, **sp)
    if kind == "rmsnorm":
        return RMSNorm(hidden_size, eps, **sp, fused=fused)
    raise ValueError(f"unknown norm {kind!r}: use 'layernorm' (GPT) or 'rmsnorm' (LLaMA)")
