"""ParallelMLP: ``h -> ffn -> h`` with the first matrix split by columns and the second by rows.

Megatron's MLP (Shoeybi et al. 2019, §3, Fig. 3a)::

    Y = act(X·A)·B,   A = [A_1 … A_p] (column-parallel),   B = [B_1; …; B_p] (row-parallel)
    rank r:  Y_r = act(X·A_r)·B_r      (act is element-wise: no communication in between)
    Y = Σ_r Y_r                         one all-reduce forward (g), one backward (f, on ∂L/∂X)

GPT: ``A`` is ``h×4h`` (``dense_h_to_4h``), ``act`` = GeLU, ``B`` is ``4h×h`` (``dense_4h_to_h``).

LLaMA (SwiGLU): ``Y = (silu(X·A_gate) ⊙ X·A_up)·B`` with ``ffn ≈ 8/3·h``. We fuse gate and up into one
column-parallel ``dense_h_to_4h`` of shape (2·ffn, h) = ``[W_gate; W_up]`` split with **stride 2**: rank
r holds ``[W_gate,r; W_up,r]``, i.e. the gate and up columns of the *same* ffn slice, so
``swiglu([gate_r | up_r])`` is local. (Two separate column layers would work too; the fused one is one
matmul and one ``f``, and mirrors GPT-2's fused QKV.) To load Hugging Face LLaMA weights:
``dense_h_to_4h.weight = cat([gate_proj.weight, up_proj.weight])``.

Under sequence parallelism the input is (s/tp, b, h): the column layer all-gathers it and the row layer
reduce-scatters the output back to (s/tp, b, h) — the same bytes as one all-reduce.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from minimegatron.config import ModelConfig
from minimegatron.layers.activations import apply_activation
from minimegatron.mpu.layers import ColumnParallelLinear, RowParallelLinear, init_normal
from minimegatron.mpu.state import ParallelState


class ParallelMLP(nn.Module):
    """(s[/tp], b, h) -> (s[/tp], b, h); this rank holds ffn/tp of the hidden units."""

    def __init__(self, config: ModelConfig, state: ParallelState | None = None) -> None:
        super().__init__()
        state = state or ParallelState()
        config.validate_tp_ffn(state.tp)  # ffn divisible by tp, else the fix (before any comm)
        self.activation, self.gelu_approximate = config.activation, config.gelu_approximate
        gated = config.activation == "swiglu"
        sp = state.sequence_parallel  # requested and tp > 1: decided once, by ParallelState
        ffn, h = config.ffn_hidden_size, config.hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(
            h, 2 * ffn if gated else ffn, state=state, bias=config.bias, gather_output=False,
            stride=2 if gated else 1, sequence_parallel=sp,
            init_method=init_normal(config.init_std))  # (ffn/tp or 2·ffn/tp, h)
        self.dense_4h_to_h = RowParallelLinear(
            ffn, h, state=state, bias=config.bias, input_is_parallel=True, sequence_parallel=sp,
            init_method=init_normal(config.init_std / math.sqrt(2 * config.num_layers)))  # (h, ffn/tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense_h_to_4h(x)  # (s, b, ffn/tp) — [gate_r | up_r] (s, b, 2·ffn/tp) for SwiGLU
        y = apply_activation(self.activation, y, self.gelu_approximate)  # (s, b, ffn/tp)
        return self.dense_4h_to_h(y)  # (s, b, h) all-reduced, or (s/tp, b, h) reduce-scattered
