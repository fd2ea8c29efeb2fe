"""ParallelTransformerLayer and ParallelTransformer: pre-norm blocks, with activation recomputation.

One pre-norm layer (GPT-2, LLaMA)::

    x = x + dropout(Attention(norm_1(x)))          norm_1 = input_norm
    x = x + dropout(MLP(norm_2(x)))                norm_2 = post_attention_norm

Communication per layer under tensor parallelism: 2 all-reduces forward (after attention's ``dense``
and the MLP's ``dense_4h_to_h``) and 2 backward (``f`` before ``query_key_value`` and
``dense_h_to_4h``). Under sequence parallelism each becomes a reduce-scatter + all-gather pair, and
the norms, residual adds and dropouts run on a (s/tp, b, h) slice of the sequence; the replicated
weights applied to that slice (the norms' γ and β, the row-parallel biases) enter through ``f``, so
backward all-reduces their gradients over TP (``norms.py``).

``recompute`` trades compute for activation memory (Korthikanti et al. 2022, §5); each layer owns its
mode, given at construction (``ParallelTransformerLayer(..., recompute=...)``):

* ``"none"``: keep every activation for backward.
* ``"selective"``: recompute only the core attention ``softmax(QKᵀ/√d)·V`` — its ``b·n·s²`` tensors
  (scores, probabilities, dropout mask) are the biggest activations and the cheapest FLOPs
  (the paper's ``5as/h`` term disappears): ``ParallelAttention(recompute_core=True)``.
* ``"full"``: keep only the layer's input and rerun the whole layer in backward
  (:func:`~minimegatron.layers.recompute.recompute`, dropout masks replayed).
All three give the same loss and gradients; only memory and time differ.

:class:`ParallelTransformer` is the stack alone — layers 0 … L-1 and the final norm — on hidden states
(s[/tp], b, h); :class:`~minimegatron.layers.language_model.LanguageModel` puts the embedding before it
and the LM head after it. Layer ``i``'s weights come from ``init_rng(seed, i + 1)`` (``init_seed.py``):
the same as layer ``i`` of the language model and of the pipeline built with that seed.

Mixture of experts: layer ``i``'s MLP is :class:`~minimegatron.layers.moe.MoEMLP` where
``config.is_moe_layer(i)`` (``num_experts > 0`` and ``i % moe_every == 0``), the dense one elsewhere.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from minimegatron.config import ModelConfig
from minimegatron.layers.attention import KVCache, ParallelAttention
from minimegatron.layers.init_seed import init_rng, model_seed
from minimegatron.layers.mlp import ParallelMLP
from minimegatron.layers.moe import MoEMLP
from minimegatron.layers.norms import build_norm
from minimegatron.layers.recompute import recompute
from minimegatron.mpu.random import model_parallel_rng
from minimegatron.mpu.state import ParallelState

__all__ = ["RECOMPUTE_MODES", "ParallelTransformerLayer", "ParallelTransformer", "build_layers",
           "build_final_norm", "check_recompute"]

RECOMPUTE_MODES = ("none", "selective", "full")
Rotary = tuple[torch.Tensor, torch.Tensor]


def check_recompute(mode: str) -> str:
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={mode!r}: use one of {RECOMPUTE_MODES}")
    return mode


class ParallelTransformerLayer(nn.Module):
    """One pre-norm block: (s[/tp], b, h) -> (s[/tp], b, h), recomputing as ``recompute`` says."""

    def __init__(self, config: ModelConfig, state: ParallelState | None = None,
                 layer_number: int = 0, recompute: str = "none") -> None:
        super().__init__()
        state = state or ParallelState()
        self.state, self.layer_number = state, layer_number
        self.sequence_parallel = state.sequence_parallel
        norm = dict(eps=config.norm_eps, bias=config.bias, sequence_parallel=self.sequence_parallel,
                    state=state, fused=config.use_fused_kernels)  # SP: f sums γ, β grads over TP
        self.input_norm = build_norm(config.norm, config.hidden_size, **norm)
        self.attention = ParallelAttention(config, state, layer_number,
                                           recompute_core=check_recompute(recompute) == "selective")
        self.post_attention_norm = build_norm(config.norm, config.hidden_size, **norm)
        # MoE where config.is_moe_layer(i) (num_experts > 0, every moe_every-th layer), else dense
        self.mlp = MoEMLP(config, state) if config.is_moe_layer(layer_number) else ParallelMLP(config, state)
        self.hidden_dropout = config.dropout
        self.recompute = recompute

    @property
    def recompute(self) -> str:
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        self._recompute = check_recompute(mode)
        self.attention.recompute_core = mode == "selective"

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated (s, b, h): the same mask on all TP ranks (default RNG). Under SP each rank holds
        different tokens, so it draws its own mask from the model-parallel RNG."""
        if not self.training or self.hidden_dropout == 0:
            return x
        with model_parallel_rng(self.state) if self.sequence_parallel else nullcontext():
            return F.dropout(x, self.hidden_dropout)

    def block(self, hidden: torch.Tensor, rotary: Rotary | None = None,
              kv_cache: KVCache | None = None) -> torch.Tensor:
        """The pre-norm block itself (no recompute decision): (s[/tp], b, h) -> (s[/tp], b, h)."""
        attn = self.attention(self.input_norm(hidden), rotary=rotary, kv_cache=kv_cache)
        hidden = hidden + self._dropout(attn)  # (s[/tp], b, h)
        mlp = self.mlp(self.post_attention_norm(hidden))
        return hidden + self._dropout(mlp)  # (s[/tp], b, h)

    def forward(self, hidden: torch.Tensor, rotary: Rotary | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled() and kv_cache is None:
            return recompute(self.block, hidden, rotary, state=self.state)  # keeps only the input
        return self.block(hidden, rotary, kv_cache)  # (s[/tp], b, h)


def build_layers(config: ModelConfig, state: ParallelState, recompute: str, seed: int) -> nn.ModuleList:
    """Layers 0 … L-1, layer ``i`` drawn from ``init_rng(seed, i + 1)`` (index 0 is the embedding's)."""
    layers = nn.ModuleList()
    for i in range(config.num_layers):
        with init_rng(seed, i + 1):
            layers.append(ParallelTransformerLayer(config, state, i, recompute))
    return layers


def build_final_norm(config: ModelConfig, state: ParallelState) -> nn.Module | None:
    """The norm before the LM head (GPT-2's ``ln_f``, LLaMA's RMSNorm); None if ``final_norm=False``."""
    if not config.final_norm:
        return None
    return build_norm(config.norm, config.hidden_size, eps=config.norm_eps, bias=config.bias,
                      sequence_parallel=state.sequence_parallel, state=state, fused=config.use_fused_kernels)


class RecomputeSwitch:
    """``model.recompute``: read from the first layer, set on every layer (each layer owns its mode).
    For modules holding their transformer layers in ``self.layers``."""

    @property
    def recompute(self) -> str:
        return self.layers[0].recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        for layer in self.layers:  # each layer owns its mode; this sets them all
            layer.recompute = check_recompute(mode)


class ParallelTransformer(RecomputeSwitch, nn.Module):
    """``num_layers`` blocks and the final norm (if ``config.final_norm``): (s[/tp], b, h) -> same."""

    def __init__(self, config: ModelConfig, state: ParallelState | None = None,
                 recompute: str = "none", init_seed: int | None = None) -> None:
        super().__init__()
        state = state or ParallelState()
        self.config, self.state = config, state
        self.layers = build_layers(config, state, check_recompute(recompute), model_seed(init_seed))
        self.final_norm = build_final_norm(config, state)

    def forward(self, hidden: torch.Tensor, rotary: Rotary | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden, rotary, kv_cache)  # (s[/tp], b, h)
        if kv_cache is not None:
            kv_cache.offset += hidden.size(0)  # these tokens are cached now
        return hidden if self.final_norm is None else self.final_norm(hidden)
