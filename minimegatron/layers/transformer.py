"""ParallelTransformerLayer and ParallelTransformer: pre-norm blocks, with activation recomputation.

One pre-norm layer (GPT-2, LLaMA)::

    x = x + dropout(Attention(norm_1(x)))          norm_1 = input_norm
    x = x + dropout(MLP(norm_2(x)))                norm_2 = post_attention_norm

Communication per layer under tensor parallelism: 2 all-reduces forward (after attention's ``dense``
and the MLP's ``dense_4h_to_h``) and 2 backward (``f`` before ``query_key_value`` and
``dense_h_to_4h``). Under sequence parallelism each becomes a reduce-scatter + all-gather pair, and
the norms, residual adds and dropouts run on a (s/tp, b, h) slice of the sequence.

``recompute`` trades compute for activation memory (Korthikanti et al. 2022, §5):

* ``"none"``: keep every activation for backward.
* ``"selective"``: recompute only the core attention ``softmax(QKᵀ/√d)·V`` — its ``b·n·s²`` tensors
  (scores, probabilities, dropout mask) are the biggest activations and the cheapest FLOPs
  (the paper's ``5as/h`` term disappears).
* ``"full"``: keep only each layer's input and rerun the whole layer in backward
  (``torch.utils.checkpoint``, ``use_reentrant=False``, dropout masks replayed).
All three give the same loss and gradients; only memory and time differ.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from minimegatron.config import ModelConfig
from minimegatron.layers.attention import KVCache, ParallelAttention, checkpoint, model_parallel_rng
from minimegatron.layers.mlp import ParallelMLP
from minimegatron.layers.norms import build_norm
from minimegatron.mpu.state import ParallelState

RECOMPUTE_MODES = ("none", "selective", "full")


class ParallelTransformerLayer(nn.Module):
    """One pre-norm block: (s[/tp], b, h) -> (s[/tp], b, h)."""

    def __init__(self, config: ModelConfig, state: ParallelState | None = None,
                 layer_number: int = 0) -> None:
        super().__init__()
        state = state or ParallelState()
        self.state, self.layer_number = state, layer_number
        self.sequence_parallel = state.sequence_parallel and state.tp > 1
        norm = dict(eps=config.norm_eps, bias=config.bias, sequence_parallel=self.sequence_parallel,
                    fused=config.use_fused_kernels)
        self.input_norm = build_norm(config.norm, config.hidden_size, **norm)
        self.attention = ParallelAttention(config, state, layer_number)
        self.post_attention_norm = build_norm(config.norm, config.hidden_size, **norm)
        self.mlp = ParallelMLP(config, state)
        self.hidden_dropout = config.dropout

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated (s, b, h): the same mask on all TP ranks (default RNG). Under SP each rank holds
        different tokens, so it draws its own mask from the model-parallel RNG."""
        if not self.training or self.hidden_dropout == 0:
            return x
        with model_parallel_rng(self.state) if self.sequence_parallel else nullcontext():
            return F.dropout(x, self.hidden_dropout)

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        attn = self.attention(self.input_norm(hidden), rotary=rotary, kv_cache=kv_cache)
        hidden = hidden + self._dropout(attn)  # (s[/tp], b, h)
        mlp = self.mlp(self.post_attention_norm(hidden))
        return hidden + self._dropout(mlp)  # (s[/tp], b, h)


class ParallelTransformer(nn.Module):
    """``num_layers`` blocks and the final norm (if ``config.final_norm``): (s[/tp], b, h) -> same."""

    def __init__(self, config: ModelConfig, state: ParallelState | None = None,
                 recompute: str = "none") -> None:
        super().__init__()
        state = state or ParallelState()
        self.config, self.state = config, state
        self.layers = nn.ModuleList(ParallelTransformerLayer(config, state, i)
                                    for i in range(config.num_layers))
        self.final_norm = (build_norm(config.norm, config.hidden_size, eps=config.norm_eps,
                                      bias=config.bias, fused=config.use_fused_kernels,
                                      sequence_parallel=state.sequence_parallel and state.tp > 1)
                           if config.final_norm else None)
        self.recompute = recompute

    @property
    def recompute(self) -> str:
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={mode!r}: use one of {RECOMPUTE_MODES}")
        self._recompute = mode
        for layer in self.layers:
            layer.attention.checkpoint_core = mode == "selective"

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        full = self.recompute == "full" and torch.is_grad_enabled() and kv_cache is None
        for layer in self.layers:
            if full:
                hidden = checkpoint(layer, hidden, rotary)  # keep only the layer input
            else:
                hidden = layer(hidden, rotary, kv_cache)  # (s[/tp], b, h)
        if kv_cache is not None:
            kv_cache.offset += hidden.size(0)  # these tokens are cached now
        return hidden if self.final_norm is None else self.final_norm(hidden)
