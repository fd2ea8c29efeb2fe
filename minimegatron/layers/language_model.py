"""LanguageModel: token ids -> embedding -> ParallelTransformer -> final norm -> LM head -> logits/loss.

GPTModel and LLaMAModel are this class with different ModelConfig values. The data flow, with this
rank's shapes under tensor parallelism (tp) and sequence parallelism (SP)::

    input_ids (b, s)
      └─ word_embeddings (vocab-parallel, all-reduce) + position_embeddings (learned only)  (b, s, h)
      └─ transpose to Megatron's layout                                                  (s, b, h)
      └─ [SP: scatter along the sequence]                                                (s/tp, b, h)
      └─ layers 0 … L-1, final_norm                                                      (s[/tp], b, h)
      └─ lm_head (vocab-parallel, tied to word_embeddings unless untied)                 (s, b, V_pad/tp)
      └─ labels given: vocab-parallel cross-entropy, mean over labels != -100            ()
         labels None: all-gather the vocab, drop the padding, back to (b, s, V)          (b, s, V)

Subclassing ParallelTransformer (rather than holding one) keeps the state_dict names flat —
``embedding.*``, ``layers.{i}.*``, ``final_norm.*``, ``lm_head.weight`` — the names checkpoint
conversion and the pipeline model rely on. Weights are drawn embedding first, then the layers, then
the head, from torch's default generator: seeded alike, a TP=k model holds the shards of the TP=1 one.

Parameter count (:func:`parameter_counts`, closed form, unpadded vocab ``V``; ``d`` = head_dim, ``kv``
= num_kv_heads, ``f`` = ffn_hidden_size, ``[·]`` = 1 if the condition holds else 0)::

    embedding   V·h                      positions  [learned]·max_seq_len·h
    attention   L·(h·(h + 2·kv·d) + h·h + [bias]·(2h + 2·kv·d))
    mlp         L·((1 + [swiglu])·h·f + f·h + [bias]·((1 + [swiglu])·f + h))
    norms       (2L + [final_norm])·(1 + [layernorm and bias])·h
    lm_head     [untied]·V·h

``num_parameters()`` counts the real tensors and subtracts the zero padding rows the vocab-parallel
tables carry (``(V_pad - V)·h`` per table), so both agree for any TP size.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minimegatron.config import ModelConfig
from minimegatron.layers.attention import KVCache, model_parallel_rng
from minimegatron.layers.positions import LearnedPositionEmbedding, RotaryEmbedding
from minimegatron.layers.transformer import ParallelTransformer
from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from minimegatron.mpu.layers import ParallelLMHead, VocabParallelEmbedding, init_normal
from minimegatron.mpu.mappings import (gather_from_tensor_model_parallel_region,
                                       scatter_to_sequence_parallel_region)
from minimegatron.mpu.state import ParallelState


# The fields in which LLaMA differs from GPT-2 (ModelConfig names): each can be switched alone.
SWITCHES = ("norm", "activation", "position_embedding", "bias", "tie_embeddings", "final_norm",
            "ffn_hidden_size", "num_kv_heads")


def flavour_changes(config: ModelConfig, preset: Callable[..., ModelConfig]) -> dict[str, Any]:
    """The switch fields where ``config`` differs from ``preset`` of the same sizes: {field: value}."""
    keep = {k: v for k, v in config.to_dict().items()
            if k not in SWITCHES and k not in ("name", "gelu_approximate", "norm_eps")}
    reference = preset(**keep)
    return {k: getattr(config, k) for k in SWITCHES if getattr(config, k) != getattr(reference, k)}


class Embedding(nn.Module):
    """Word (+ learned position) embeddings: ids (b, s) -> (s, b, h), or (s/tp, b, h) under SP."""

    def __init__(self, config: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.state, self.dropout = state, config.dropout
        self.sequence_parallel = state.sequence_parallel and state.tp > 1
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, state=state, init_method=init_normal(config.init_std),
            make_vocab_size_divisible_by=config.make_vocab_size_divisible_by)  # (V_pad/tp, h)
        self.position_embeddings = (
            LearnedPositionEmbedding(config.max_seq_len, config.hidden_size, config.init_std)
            if config.position_embedding == "learned" else None)  # (max_seq_len, h), replicated

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # (b, s, h)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)  # (b, s, h)
        x = x.transpose(0, 1).contiguous()  # (s, b, h)
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.state)  # (s/tp, b, h)
        if self.training and self.dropout > 0:
            with model_parallel_rng(self.state) if self.sequence_parallel else nullcontext():
                x = F.dropout(x, self.dropout)
        return x


class LanguageModel(ParallelTransformer):
    """A decoder-only language model built from ``config`` on this rank's slice of ``state``."""

    def __init__(self, config: ModelConfig, state: ParallelState | None = None,
                 recompute: str = "none") -> None:
        state = state or ParallelState()
        config.validate_tp(state.tp)
        embedding = Embedding(config, state)  # drawn first
        super().__init__(config, state, recompute)  # the layers and the final norm
        self.embedding = embedding
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta)
                       if config.position_embedding == "rope" else None)
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, state=state,
            make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
            weight=embedding.word_embeddings.weight if config.tie_embeddings else None,
            sequence_parallel=state.sequence_parallel and state.tp > 1,
            init_method=init_normal(config.init_std))  # (V_pad/tp, h)
        for name in ("layers", "final_norm", "lm_head"):  # list modules in data-flow order
            if name in self._modules:
                self._modules[name] = self._modules.pop(name)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None
                ) -> torch.Tensor:
        """ids (b, s) -> logits (b, s, vocab_size), or the mean loss () when ``labels`` (b, s) given."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq) token ids, got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be integer token ids (torch.long), got dtype {input_ids.dtype}: "
                            "convert them with input_ids.long() (token ids index the embedding table)")
        b, s = input_ids.shape
        offset = 0 if kv_cache is None else kv_cache.offset
        limit = self.config.max_seq_len
        if offset + s > limit:  # every position kind: the learned table ends there, RoPE/ALiBi were
            what = ("the learned position table" if self.embedding.position_embeddings is not None
                    else f"the model's {self.config.position_embedding} positions")  # never checked past it
            raise ValueError(f"sequence length {offset + s} (cached {offset} + new {s}) exceeds {what}, "
                             f"max_seq_len={limit}: shorten the input or build the model with "
                             f"max_seq_len >= {offset + s}")
        if self.embedding.sequence_parallel and s % self.state.tp:
            raise ValueError(f"sequence parallelism splits the sequence over {self.state.tp} ranks: "
                             f"seq length {s} must be a multiple of {self.state.tp}")
        if position_ids is None:
            position_ids = torch.arange(offset, offset + s, device=input_ids.device).expand(b, s)
        elif position_ids.shape not in ((b, s), (1, s)):
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not match input_ids "
                             f"shape {(b, s)}: pass one position per token, (batch, seq) or (1, seq)")
        else:
            position_ids = position_ids.expand(b, s)  # (b, s)
        hidden = self.embedding(input_ids, position_ids)  # (s[/tp], b, h)
        rotary = None if self.rotary is None else self.rotary(position_ids, hidden.dtype)
        hidden = super().forward(hidden, rotary, kv_cache)  # (s[/tp], b, h)
        tied = self.embedding.word_embeddings.weight if self.config.tie_embeddings else None
        logits = self.lm_head(hidden, weight=tied)  # (s, b, V_pad/tp): the embedding's current weight
        if labels is None:
            logits = gather_from_tensor_model_parallel_region(logits, self.state)  # (s, b, V_pad)
            return logits[..., :self.config.vocab_size].transpose(0, 1).contiguous()  # (b, s, V)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {(b, s)}")
        labels = labels.t()  # (s, b)
        losses = vocab_parallel_cross_entropy(logits, labels, self.state,
                                              vocab_size=self.config.vocab_size)  # (s, b)
        return losses.sum() / (labels != -100).sum().clamp(min=1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, then re-tie: ``assign=True`` replaces the embedding's Parameter, and the
        head's borrowed reference must follow it (forward passes the current one anyway)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.config.tie_embeddings:
            object.__setattr__(self.lm_head, "weight", self.embedding.word_embeddings.weight)
        return result

    def num_parameters(self, include_padding: bool = False) -> int:
        """Parameters of the whole model (all TP ranks), without the vocab padding rows by default."""
        sharded = sum(p.numel() for p in self.parameters() if getattr(p, "tensor_model_parallel", False))
        replicated = sum(p.numel() for p in self.parameters()
                         if not getattr(p, "tensor_model_parallel", False))
        if self.state.tp > 1:
            total = torch.tensor([sharded], dtype=torch.int64)
            dist.all_reduce(total, group=self.state.tp_group)
            sharded = int(total.item())
        count = sharded + replicated
        if not include_padding:
            tables = 1 if self.config.tie_embeddings else 2
            padding_rows = self.lm_head.padded_vocab_size - self.config.vocab_size
            count -= tables * padding_rows * self.config.hidden_size
        return count

    def extra_repr(self) -> str:
        return f"{self.config.name}: recompute={self.recompute!r}, {self.state}"


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Closed-form parameter count per component (see the module docstring), plus ``total``."""
    h, L, V, d = config.hidden_size, config.num_layers, config.vocab_size, config.head_dim
    kv, f, bias = config.num_kv_heads, config.ffn_hidden_size, int(config.bias)
    gated = int(config.activation == "swiglu")
    norm_size = (2 if config.norm == "layernorm" and config.bias else 1) * h
    counts = {
        "embedding": V * h,
        "positions": config.max_seq_len * h if config.position_embedding == "learned" else 0,
        "attention": L * (h * (h + 2 * kv * d) + h * h + bias * (2 * h + 2 * kv * d)),
        "mlp": L * ((1 + gated) * h * f + f * h + bias * ((1 + gated) * f + h)),
        "norms": 2 * L * norm_size,
        "final_norm": norm_size if config.final_norm else 0,
        "lm_head": 0 if config.tie_embeddings else V * h,
    }
    counts["total"] = sum(counts.values())
    return counts


def count_parameters(config: ModelConfig) -> int:
    """Total parameters of a model built from ``config`` (unpadded vocab), in closed form."""
    return parameter_counts(config)["total"]
