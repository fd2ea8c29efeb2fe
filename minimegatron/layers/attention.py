"""ParallelAttention: multi-head, grouped-query and multi-query attention, split over TP ranks by heads.

For a query head ``i`` that reads key/value head ``g(i)``::

    Attention(Q_i, K, V) = softmax(Q_i K_g(i)ᵀ / √d + M) V_g(i)        M: causal mask (+ ALiBi bias)

Heads are independent, so tensor parallelism (Shoeybi et al. 2019, §3) gives each of the ``tp`` ranks
``heads/tp`` whole heads: the projections into heads are **column-parallel** and the output projection
``dense`` is **row-parallel**, one all-reduce forward (``g`` in ``dense``) and one backward (``f`` in
the column layer) per attention block::

    x (s,b,h) ─f─▶ [Q_r K_r V_r] = x·W_qkv,r ─▶ softmax(Q_r K_rᵀ/√d)·V_r (s,b,h/tp)
              ─▶ ·W_dense,r ─g─▶ Σ_r (s,b,h)

The weights and their split:

* ``num_kv_heads == heads`` (MHA, self-attention): one fused ``query_key_value`` of shape (3h, h) =
  ``[W_Q; W_K; W_V]``, column-parallel with **stride 3**, so rank r holds ``[W_Q,r; W_K,r; W_V,r]`` —
  matching q, k and v slices of the same heads (GPT-2's ``c_attn`` has exactly this layout).
* otherwise (GQA/MQA, or cross-attention): ``query`` (h, h) and ``key_value`` (2·kv·d, h) =
  ``[W_K; W_V]`` column-parallel with **stride 2**. Query head ``i`` reads kv head
  ``i // (heads/kv)`` (Hugging Face's ``repeat_kv`` order). Two column layers mean two ``f``'s, so
  GQA pays one extra backward all-reduce per layer (under SP: one extra all-gather forward and
  reduce-scatter backward); Megatron-core avoids it with a fused, per-group interleaved QKV layout,
  which we skip for readability.
* ``num_kv_heads < tp`` (e.g. MQA on 2 ranks): kv heads cannot be split, so ``key_value`` is
  **replicated** (full weight on every rank, ``tensor_model_parallel = False``). Each rank uses only
  the kv head its queries read, so its weight gradient is partial: the weight enters the matmul
  through ``f`` (identity forward, all-reduce backward), which sums the partial gradients.
  In general ``num_kv_heads`` and ``tp`` must divide one another.

Sequence parallelism: the input is this rank's (s/tp, b, h) slice; the column layers all-gather it
(every head needs the whole sequence) and ``dense`` reduce-scatters the output back to (s/tp, b, h).

Cross-attention (``attention_type="cross"``): queries from ``x`` (s, b, h), keys/values from an
encoder output (s_enc, b, h), given whole on every rank; no causal mask, no positions.

KV cache: :class:`KVCache` keeps each layer's keys/values (after RoPE) so decoding runs the prompt once
(prefill) and then one token at a time; new queries sit at the *last* positions, so the causal mask
is ``j ≤ i + (s_k - s_q)``.

The core ``softmax(QKᵀ/√d)V`` uses ``F.scaled_dot_product_attention`` (fused kernels where the backend
has them); ALiBi adds a bias per head, computed by the explicit formula (``_math_attention``).
Dropout on the probabilities runs under the model-parallel RNG (different heads, different masks).
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from minimegatron.config import ModelConfig
from minimegatron import kernels
from minimegatron.layers.positions import alibi_bias, alibi_slopes
from minimegatron.mpu.layers import (ColumnParallelLinear, RowParallelLinear, init_normal,
                                     linear_with_sequence_parallel_gather)
from minimegatron.mpu.mappings import copy_to_tensor_model_parallel_region
from minimegatron.mpu.random import get_rng_tracker
from minimegatron.mpu.state import ParallelState


@dataclass
class KVCache:
    """Per-layer keys/values ``(s_cached, b, kv/tp, d)`` and ``offset`` = tokens cached so far.

    ``ParallelTransformer`` advances ``offset`` after each forward; position ids start there.
    """

    num_layers: int
    offset: int = 0
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = self.keys or [None] * self.num_layers
        self.values = self.values or [None] * self.num_layers

    def update(self, layer_number: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's ``k, v (s, b, kv/tp, d)``; return all of them ``(offset + s, b, kv/tp, d)``."""
        if self.keys[layer_number] is not None:
            k = torch.cat([self.keys[layer_number], k], dim=0)
            v = torch.cat([self.values[layer_number], v], dim=0)
        self.keys[layer_number], self.values[layer_number] = k, v
        return k, v

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Keep/reorder batch rows (beam search): cache[:, b] <- cache[:, batch_indices[b]]."""
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(1, batch_indices.to(t.device))


def checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    """``torch.utils.checkpoint`` (non-reentrant) that also replays the model-parallel RNG.

    Used for selective recompute here and for full recompute in ``transformer.py``.

    checkpoint restores torch's default generator for the recomputation; the TP tracker's generator
    (attention dropout) is restored here, so recomputed dropout masks equal the original ones.
    """
    tracker = get_rng_tracker()
    saved = tracker.get_states()

    @contextmanager
    def replay_tracker():
        current = tracker.get_states()
        tracker.set_states(saved)
        try:
            yield
        finally:
            tracker.set_states(current)

    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                             context_fn=lambda: (nullcontext(), replay_tracker()))


def model_parallel_rng(state: ParallelState):
    """Context for dropout inside a TP region: the tracker's per-rank stream (nothing at tp = 1)."""
    return get_rng_tracker().fork() if state.tp > 1 else nullcontext()


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                    dropout_p: float) -> torch.Tensor:
    """softmax(QKᵀ/√d + bias)·V spelled out: q (b, n, sq, d), k/v (b, n, sk, d), bias (…, sq, sk)."""
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1)) + bias  # (b, n/tp, sq, sk) fp32
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    probs = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    return probs @ v  # (b, n/tp, sq, d)


class ParallelAttention(nn.Module):
    """Self- or cross-attention over this rank's ``heads/tp`` query heads; (s[/tp], b, h) -> same."""

    def __init__(self, config: ModelConfig, state: ParallelState | None = None, layer_number: int = 0,
                 attention_type: str = "self") -> None:
        super().__init__()
        state = state or ParallelState()
        if attention_type not in ("self", "cross"):
            raise ValueError(f"attention_type={attention_type!r}: use 'self' or 'cross'")
        tp, h, d = state.tp, config.hidden_size, config.head_dim
        heads, kv_heads = config.num_attention_heads, config.num_kv_heads
        if heads % tp:
            raise ValueError(f"num_attention_heads={heads} is not divisible by tensor-parallel size {tp}:"
                             f" each TP rank must own whole heads; choose tp dividing the head count")
        if kv_heads % tp and tp % kv_heads:
            raise ValueError(f"num_kv_heads={kv_heads} and tensor-parallel size {tp}: one must divide "
                             "the other (kv heads split over ranks, or replicated when fewer than ranks)")
        self.state, self.config, self.layer_number = state, config, layer_number
        self.attention_type, self.head_dim = attention_type, d
        self.sequence_parallel = state.sequence_parallel and tp > 1
        self.heads_per_rank = heads // tp
        self.kv_replicated = kv_heads < tp
        self.kv_heads_per_rank = 1 if self.kv_replicated else kv_heads // tp
        self.first_kv_head = state.tp_rank * self.heads_per_rank // (heads // kv_heads)  # replicated case
        self.dropout = config.dropout
        self.checkpoint_core = False  # selective recompute: set by ParallelTransformer
        init = init_normal(config.init_std)
        out_init = init_normal(config.init_std / math.sqrt(2 * config.num_layers))  # GPT-2/Megatron
        col = dict(state=state, bias=config.bias, gather_output=False,
                   sequence_parallel=self.sequence_parallel, init_method=init)
        if attention_type == "self" and kv_heads == heads:
            self.query_key_value = ColumnParallelLinear(h, 3 * h, stride=3, **col)  # (3h/tp, h)
        else:
            self.query = ColumnParallelLinear(h, h, **col)  # (h/tp, h)
            kv_size = 2 * kv_heads * d
            if self.kv_replicated:
                self.key_value = ColumnParallelLinear(h, kv_size, state=ParallelState(),
                                                      bias=config.bias, init_method=init)  # full
                for p in self.key_value.parameters():
                    p.tensor_model_parallel, p.partition_dim = False, -1
            else:
                col["sequence_parallel"] &= attention_type == "self"  # encoder output comes whole
                self.key_value = ColumnParallelLinear(h, kv_size, stride=2, **col)  # (2·kv·d/tp, h)
        self.dense = RowParallelLinear(h, h, state=state, bias=config.bias, input_is_parallel=True,
                                       sequence_parallel=self.sequence_parallel, init_method=out_init)
        if config.position_embedding == "alibi" and attention_type == "self":
            r0 = state.tp_rank * self.heads_per_rank  # this rank's heads take their own slopes
            slopes = alibi_slopes(heads)[r0: r0 + self.heads_per_rank]  # (n/tp,)
            self.register_buffer("alibi_slopes", slopes, persistent=False)
        else:
            self.alibi_slopes = None

    # ---- projections ------------------------------------------------------------------------------
    def _replicated_key_value(self, source: torch.Tensor) -> torch.Tensor:
        """All kv heads from the full weight on every rank; ``f`` on the weight sums its gradients."""
        weight = copy_to_tensor_model_parallel_region(self.key_value.weight, self.state)
        bias = self.key_value.bias
        bias = None if bias is None else copy_to_tensor_model_parallel_region(bias, self.state)
        if self.sequence_parallel and self.attention_type == "self":
            # all-gather (s/tp, b, h) -> (s, b, h); like the column layers, backward keeps the shard only
            kv = linear_with_sequence_parallel_gather(source, weight, bias, self.state)  # (s,b,2·kv·d)
        else:
            source = copy_to_tensor_model_parallel_region(source, self.state)  # (s, b, h)
            kv = F.linear(source, weight, bias)  # (s, b, 2·kv·d)
        k, v = kv.unflatten(-1, (2, -1, self.head_dim)).unbind(-3)  # (s, b, kv, d) each
        keep = slice(self.first_kv_head, self.first_kv_head + 1)  # the one kv head this rank reads
        return torch.cat([k[:, :, keep], v[:, :, keep]], dim=2).flatten(2)  # (s, b, 2·1·d)

    def _project(self, hidden: torch.Tensor, encoder_output: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, nkv, d = self.heads_per_rank, self.kv_heads_per_rank, self.head_dim
        if hasattr(self, "query_key_value"):
            qkv = self.query_key_value(hidden)  # (s, b, 3h/tp) = [q_r | k_r | v_r]
            q, k, v = qkv.chunk(3, dim=-1)  # (s, b, h/tp) each
        else:
            q = self.query(hidden)  # (s, b, h/tp)
            source = hidden if self.attention_type == "self" else encoder_output
            if self.kv_replicated:
                kv = self._replicated_key_value(source)  # (s_k, b, 2·d)
            else:
                kv = self.key_value(source)  # (s_k, b, 2·kv·d/tp) = [k_r | v_r]
            k, v = kv.chunk(2, dim=-1)  # (s_k, b, kv·d/tp) each
        q = q.unflatten(-1, (n, d))  # (s, b, n/tp, d)
        k, v = k.unflatten(-1, (nkv, d)), v.unflatten(-1, (nkv, d))  # (s_k, b, kv/tp, d)
        return q, k, v

    # ---- softmax(QKᵀ/√d)V ------------------------------------------------------------------------
    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (sq, b, n/tp, d), k/v (sk, b, kv/tp, d) -> context (sq, b, n/tp·d)."""
        sq, b, n, d = q.shape
        sk, group = k.size(0), n // k.size(2)
        if group > 1:  # GQA/MQA: query head i reads kv head i // group
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)  # (sk,b,n/tp,d)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (b, n/tp, s, d)
        causal = self.attention_type == "self"
        dropout_p = self.dropout if self.training else 0.0
        with model_parallel_rng(self.state) if dropout_p > 0 else nullcontext():
            if self.alibi_slopes is not None:
                bias = alibi_bias(self.alibi_slopes.float(), sq, sk)  # (n/tp, sq, sk), fp32
                future = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
                bias = bias.masked_fill(future, float("-inf"))  # keys after the query: never seen
                out = _math_attention(q, k, v, bias, dropout_p)
            else:  # SDPA; after a KV cache (sk > sq) query i sits at position i + sk - sq
                out = kernels.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout_p,
                                                           fused=self.config.use_fused_kernels)
        return out.permute(2, 0, 1, 3).flatten(2)  # (b,n/tp,sq,d) -> (sq, b, n/tp·d)

    def forward(self, hidden: torch.Tensor, *, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                encoder_output: torch.Tensor | None = None, kv_cache: KVCache | None = None
                ) -> torch.Tensor:
        """hidden (s, b, h) — (s/tp, b, h) under sequence parallelism — -> same shape."""
        if self.attention_type == "cross" and encoder_output is None:
            raise ValueError("cross-attention needs encoder_output (s_enc, b, h) for its keys/values")
        if kv_cache is not None and (self.attention_type == "cross" or self.sequence_parallel):
            raise ValueError("the KV cache is for causal self-attention without sequence parallelism "
                             "(decoding one token cannot be split over the sequence)")
        q, k, v = self._project(hidden, encoder_output)  # (s, b, n/tp, d), (s_k, b, kv/tp, d) ×2
        if rotary is not None and self.attention_type == "self":
            cos, sin = rotary  # (s, b, 1, d): angles of the new tokens' positions
            q, k = kernels.apply_rotary(q, k, cos, sin, fused=self.config.use_fused_kernels)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_number, k, v)  # (offset + s, b, kv/tp, d)
        if self.checkpoint_core and torch.is_grad_enabled():
            context = checkpoint(self.core_attention, q, k, v)  # selective recompute
        else:
            context = self.core_attention(q, k, v)  # (s, b, h/tp)
        return self.dense(context)  # (s, b, h) all-reduced, or (s/tp, b, h) reduce-scattered

    def extra_repr(self) -> str:
        kind = ("MHA" if self.config.num_kv_heads == self.config.num_attention_heads else
                "MQA" if self.config.num_kv_heads == 1 else "GQA")
        return (f"{self.attention_type}, {kind}: {self.heads_per_rank} heads/rank, "
                f"{self.kv_heads_per_rank} kv heads/rank{' (replicated)' if self.kv_replicated else ''}"
                f", alibi={self.alibi_slopes is not None}")
