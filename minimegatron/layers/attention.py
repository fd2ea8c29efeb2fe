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
  **replicated** (``mpu.layers.ReplicatedLinear``: full weight on every rank,
  ``tensor_model_parallel = False``). Each rank uses only the kv head its queries read, so its weight
  gradient is partial: the weight enters the matmul through ``f`` (identity forward, all-reduce
  backward), which sums the partial gradients.
  In general ``num_kv_heads`` and ``tp`` must divide one another.

Widths: the heads span ``a = heads·head_dim``, which is ``h`` unless ``config.head_dim`` is set
(some Llama-3-family models): ``W_Q`` is (a, h), ``dense`` (h, a); below, read ``h`` in a
projection's head side as ``a``. Biases (``config.has_attention_bias``: ``bias``, or
``attention_bias``, which puts them on q, k, v and o_proj as HF LLaMA's does) are split like their
weights: a column layer's bias with its output rows (stride and all), the row layer's added once,
after the all-reduce.

Which of the three is the ``layout`` attribute (``"fused"``, ``"split"``, ``"replicated-kv"``),
decided once in ``__init__``.

Sequence parallelism: the input is this rank's (s/tp, b, h) slice; the column layers all-gather it
(every head needs the whole sequence) and ``dense`` reduce-scatters the output back to (s/tp, b, h).

Cross-attention (``attention_type="cross"``): queries from ``x`` (s, b, h), keys/values from an
encoder output (s_enc, b, h), given whole on every rank; no causal mask, no positions.

KV cache: :class:`KVCache` keeps each layer's keys/values (after RoPE) so decoding runs the prompt once
(prefill) and then one token at a time; new queries sit at the *last* positions, so the causal mask
is ``j ≤ i + (s_k - s_q)``. A left-padded batch (prompts of different lengths) has the cache carry
its ``key_mask`` (b, s_k): query i of row r sees key j iff it is causal and ``key_mask[r, j]`` (or
j is i's own key), in the prefill and in every cached step.

Context parallelism (``state.cp > 1``): the input holds this CP rank's zig-zag piece of the sequence,
(s/cp, b, h) (and (s/(cp·tp), b, h) under SP); the projections and RoPE (at the tokens' global
positions) are local, and only the core needs the rest of the sequence: ring attention or
all-to-all, ``mpu/context_parallel.py``, by ``state.cp_comm``.

The core ``softmax(QKᵀ/√d)V`` is ``kernels.scaled_dot_product_attention`` (fused kernels where the
backend has them), which also holds the one GQA repeat and the one causal mask; ALiBi passes its
per-head bias there (the explicit formula). Dropout on the probabilities runs under the
model-parallel RNG, ``state.rng_tracker`` (different heads, different masks). ``recompute_core=True``
recomputes this core in backward (selective recompute, ``layers/recompute.py``).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from minimegatron.config import ModelConfig
from minimegatron import kernels
from minimegatron.layers.positions import alibi_bias, alibi_slopes
from minimegatron.layers.recompute import recompute
from minimegatron.mpu.context_parallel import context_parallel_attention
from minimegatron.mpu.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, init_normal
from minimegatron.mpu.random import model_parallel_rng
from minimegatron.mpu.state import ParallelState


@dataclass
class KVCache:
    """Per-layer keys/values ``(s_cached, b, kv/tp, d)`` and ``offset`` = tokens cached so far.

    ``ParallelTransformer`` advances ``offset`` after each forward; position ids start there.
    ``key_mask`` (b, offset + s) bool, True = a real token: a left-padded batch. Its owner (the decoding
    loop) sets it to cover the cached *and* the new tokens before each forward; every layer's attention
    then hides the pad keys. None (no padding): attention runs unmasked, as fast as before.
    """

    num_layers: int
    offset: int = 0
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    key_mask: torch.Tensor | None = None

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
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, batch_indices.to(self.key_mask.device))


class ParallelAttention(nn.Module):
    """Self- or cross-attention over this rank's ``heads/tp`` query heads; (s[/tp], b, h) -> same."""

    def __init__(self, config: ModelConfig, state: ParallelState | None = None, layer_number: int = 0,
                 attention_type: str = "self", recompute_core: bool = False) -> None:
        super().__init__()
        state = state or ParallelState()
        if attention_type not in ("self", "cross"):
            raise ValueError(f"attention_type={attention_type!r}: use 'self' or 'cross'")
        tp, h, d = state.tp, config.hidden_size, config.head_dim
        heads, kv_heads = config.num_attention_heads, config.num_kv_heads
        config.validate_tp_heads(tp)  # whole heads per rank; kv heads and tp divide one another
        config.validate_cp(state.cp, state.cp_comm, tp)
        if state.cp > 1 and attention_type == "cross":
            raise ValueError("cross-attention under context parallelism is not supported (the encoder "
                             "output is not split over CP ranks); use cp 1")
        self.state, self.config, self.layer_number = state, config, layer_number
        self.attention_type, self.head_dim = attention_type, d
        self.sequence_parallel = state.sequence_parallel
        self.layout = ("fused" if attention_type == "self" and kv_heads == heads else
                       "replicated-kv" if kv_heads < tp else "split")  # see the module docstring
        self.heads_per_rank = heads // tp
        self.kv_heads_per_rank = 1 if self.kv_replicated else kv_heads // tp
        self.first_kv_head = state.tp_rank * self.heads_per_rank // (heads // kv_heads)  # replicated case
        self.dropout = config.dropout
        self.recompute_core = recompute_core  # selective recompute of softmax(QKᵀ/√d)·V
        init = init_normal(config.init_std)
        out_init = init_normal(config.init_std / math.sqrt(2 * config.num_layers))  # GPT-2/Megatron
        bias, a = config.has_attention_bias, config.attention_width  # a = heads·d (= h unless head_dim set)
        col = dict(state=state, bias=bias, gather_output=False,
                   sequence_parallel=self.sequence_parallel, init_method=init)
        kv_sp = self.sequence_parallel and attention_type == "self"  # an encoder output comes whole
        if self.layout == "fused":
            self.query_key_value = ColumnParallelLinear(h, 3 * a, stride=3, **col)  # (3a/tp, h)
        else:
            self.query = ColumnParallelLinear(h, a, **col)  # (a/tp, h)
            kv_size = 2 * kv_heads * d
            if self.layout == "replicated-kv":
                self.key_value = ReplicatedLinear(h, kv_size, state=state, bias=bias,
                                                  sequence_parallel=kv_sp, init_method=init)  # (2·kv·d, h)
            else:
                self.key_value = ColumnParallelLinear(h, kv_size, stride=2, **{
                    **col, "sequence_parallel": kv_sp})  # (2·kv·d/tp, h)
        self.dense = RowParallelLinear(a, h, state=state, bias=bias, input_is_parallel=True,
                                       sequence_parallel=self.sequence_parallel, init_method=out_init)
        if config.position_embedding == "alibi" and attention_type == "self":
            r0 = state.tp_rank * self.heads_per_rank  # this rank's heads take their own slopes
            slopes = alibi_slopes(heads)[r0: r0 + self.heads_per_rank]  # (n/tp,)
            self.register_buffer("alibi_slopes", slopes, persistent=False)
        else:
            self.alibi_slopes = None

    @property
    def kv_replicated(self) -> bool:
        """Fewer kv heads than TP ranks: ``key_value`` is whole on every rank."""
        return self.layout == "replicated-kv"

    # ---- projections ------------------------------------------------------------------------------
    def _project(self, hidden: torch.Tensor, encoder_output: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, nkv, d = self.heads_per_rank, self.kv_heads_per_rank, self.head_dim
        if self.layout == "fused":
            qkv = self.query_key_value(hidden)  # (s, b, 3a/tp) = [q_r | k_r | v_r], a = heads·d
            q, k, v = qkv.chunk(3, dim=-1)  # (s, b, a/tp) each
        else:
            q = self.query(hidden)  # (s, b, a/tp)
            kv = self.key_value(hidden if self.attention_type == "self" else encoder_output)
            if self.layout == "replicated-kv":  # (s_k, b, 2·kv·d): all kv heads; keep the one we read
                k, v = kv.unflatten(-1, (2, -1, d)).unbind(-3)  # (s_k, b, kv, d) each
                k, v = (t[:, :, self.first_kv_head:self.first_kv_head + 1].flatten(2) for t in (k, v))
            else:
                k, v = kv.chunk(2, dim=-1)  # (s_k, b, kv·d/tp) each = [k_r | v_r]
        q = q.unflatten(-1, (n, d))  # (s, b, n/tp, d)
        k, v = k.unflatten(-1, (nkv, d)), v.unflatten(-1, (nkv, d))  # (s_k, b, kv/tp, d)
        return q, k, v

    # ---- softmax(QKᵀ/√d)V ------------------------------------------------------------------------
    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (sq, b, n/tp, d), k/v (sk, b, kv/tp, d) -> context (sq, b, n/tp·d).

        ``key_mask`` (b, sk): a left-padded batch's real keys (``KVCache.key_mask``).
        Under context parallelism sq = sk = s/cp, this rank's piece; the rest of the sequence comes
        by ring or all-to-all (``context_parallel_attention``)."""
        if self.state.cp > 1:
            return context_parallel_attention(q, k, v, self.state,
                                              fused=self.config.use_fused_kernels).flatten(2)
        sq, sk = q.size(0), k.size(0)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (b, n/tp | kv/tp, s, d)
        bias = None
        if self.alibi_slopes is not None:
            bias = alibi_bias(self.alibi_slopes.float(), sq, sk)  # (n/tp, sq, sk), fp32
        dropout_p = self.dropout if self.training else 0.0
        with model_parallel_rng(self.state) if dropout_p > 0 else nullcontext():
            # GQA repeat and (after a KV cache, end-aligned: query i at i + sk - sq) causal mask inside
            out = kernels.scaled_dot_product_attention(
                q, k, v, causal=self.attention_type == "self", dropout_p=dropout_p, bias=bias,
                key_mask=key_mask, fused=self.config.use_fused_kernels)  # (b, n/tp, sq, d)
        return out.permute(2, 0, 1, 3).flatten(2)  # (b,n/tp,sq,d) -> (sq, b, n/tp·d)

    def forward(self, hidden: torch.Tensor, *, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                encoder_output: torch.Tensor | None = None, kv_cache: KVCache | None = None
                ) -> torch.Tensor:
        """hidden (s, b, h) — (s/tp, b, h) under sequence parallelism — -> same shape."""
        if self.attention_type == "cross" and encoder_output is None:
            raise ValueError("cross-attention needs encoder_output (s_enc, b, h) for its keys/values")
        if kv_cache is not None and (self.attention_type == "cross" or self.sequence_parallel
                                     or self.state.cp > 1):
            raise ValueError("the KV cache is for causal self-attention without sequence or context "
                             "parallelism (decoding one token cannot be split over the sequence)")
        q, k, v = self._project(hidden, encoder_output)  # (s, b, n/tp, d), (s_k, b, kv/tp, d) ×2
        if rotary is not None and self.attention_type == "self":
            cos, sin = rotary  # (s, b, 1, d): angles of the new tokens' positions
            q, k = kernels.apply_rotary(q, k, cos, sin, fused=self.config.use_fused_kernels)
        key_mask = None
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_number, k, v)  # (offset + s, b, kv/tp, d)
            key_mask = kv_cache.key_mask  # (b, offset + s) or None
            if key_mask is not None and key_mask.shape != (k.size(1), k.size(0)):
                raise ValueError(f"KVCache.key_mask shape {tuple(key_mask.shape)} != (batch, cached + new "
                                 f"tokens) = {(k.size(1), k.size(0))}: extend it by the new tokens first")
        if self.recompute_core and torch.is_grad_enabled():
            context = recompute(self.core_attention, q, k, v, key_mask, state=self.state)  # selective
        else:
            context = self.core_attention(q, k, v, key_mask)  # (s, b, a/tp), a = heads·d
        return self.dense(context)  # (s, b, h) all-reduced, or (s/tp, b, h) reduce-scattered

    def extra_repr(self) -> str:
        kind = ("MHA" if self.config.num_kv_heads == self.config.num_attention_heads else
                "MQA" if self.config.num_kv_heads == 1 else "GQA")
        return (f"{self.attention_type}, {kind}, layout={self.layout}: {self.heads_per_rank} heads/rank, "
                f"{self.kv_heads_per_rank} kv heads/rank, alibi={self.alibi_slopes is not None}")
