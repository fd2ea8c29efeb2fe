"""LanguageModel: token ids -> embedding -> transformer layers -> final norm -> LM head -> logits/loss.

GPTModel and LLaMAModel are this class with different ModelConfig values (``gpt.py``, ``llama.py``).
The data flow, with this rank's shapes under tensor parallelism (tp) and sequence parallelism (SP)::

    input_ids (b, s)
      └─ embedding: word_embeddings (vocab-parallel, all-reduce) + position_embeddings (learned)  (b, s, h)
         transposed to Megatron's layout, [SP: scattered along the sequence]               (s[/tp], b, h)
      └─ layers 0 … L-1 (RoPE's angles from ``rotary``)                                    (s[/tp], b, h)
      └─ final_norm                                                                        (s[/tp], b, h)
      └─ lm_head (vocab-parallel; GPT: multiplies by the word embeddings' table)           (s, b, V_pad/tp)
      └─ labels given: lm_loss, vocab-parallel cross-entropy, mean over labels != -100      ()
         labels None: all-gather the vocab, drop the padding, back to (b, s, V)             (b, s, V)

With labels and ``config.fused_lm_loss`` (the default) the last two are one: the head sums the loss
``lm_loss_chunk`` tokens at a time, gradients in the same pass, the (s, b, V_pad/tp) logits never whole
(``mpu/fused_cross_entropy.py``), and ``layers/loss.py`` takes the same mean. The pipeline keeps the pair.

MoE: the loss adds ``moe_aux_loss_coeff·Σ aux + moe_z_loss_coeff·Σ z`` over MoE layers (``router.py``).

Context parallelism (``state.cp > 1``): ``input_ids`` and ``labels`` are this CP rank's zig-zag piece
of the sequences, (b, s/cp) (``mpu.context_parallel.split_for_context_parallel``); positions default to
those tokens' global positions (:func:`default_position_ids`); only attention talks across CP ranks;
the loss is the mean over the *whole* sequences (:func:`lm_loss`) and the logits are this rank's
tokens' (``gather_from_context_parallel`` puts whole sequences together).

The children are declared in that order, so the state_dict names are flat — ``embedding.*``,
``layers.{i}.*``, ``final_norm.*``, ``lm_head.weight`` (untied only) — the names checkpoints and the
Hugging Face conversion use. **The tie** (GPT, ``tie_embeddings``): the head has no weight of its own
(``lm_head.weight is None``); ``forward`` hands it the word embeddings' current table,
``self.lm_head(hidden, weight=head_weight)`` (Megatron's ``output_layer(hidden, weight=...)``), and that
table's gradient collects both uses.

The pipeline (``minimegatron.pipe``) is this model cut into stages, built from the same pieces: the
builders below (:func:`build_rotary`, :func:`build_lm_head`, :func:`lm_loss`,
:func:`check_sequence_parallel`) and ``transformer.py``'s (``build_layers``, ``build_final_norm``).
Weights are drawn per layer index (``init_seed.py``), so a model built with a seed holds the same
weights as a TP=k model's shards and as every pipeline stage built with it.

Parameter count (:func:`parameter_counts`, closed form, unpadded vocab ``V``; ``d`` = head_dim, ``kv``
= num_kv_heads, ``f`` = ffn_hidden_size, ``M`` MoE layers of ``E`` experts + an (E, h) gate, ``[·]`` = 1
if the condition holds else 0; ``attn_bias`` = bias or attention_bias)::

    embedding   V·h                      positions  [learned]·max_seq_len·h
    attention   L·(h·(a + 2·kv·d) + a·h + [attn_bias]·(a + 2·kv·d + h))      a = heads·d (= h)
    mlp         (L − M)·m + M·E·(m + h)        m = (1 + [swiglu])·h·f + f·h + [bias]·((1 + [swiglu])·f + h)
    norms       (2L + [final_norm])·(1 + [layernorm and bias])·h
    lm_head     [untied]·V·h

``num_parameters()`` counts the real tensors and subtracts the zero padding rows the vocab-parallel
tables carry (``(V_pad - V)·h`` per table), so both agree for any TP size.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minimegatron.config import ModelConfig
from minimegatron.layers.attention import KVCache
from minimegatron.layers.init_seed import init_rng, model_seed
from minimegatron.layers.loss import lm_loss, mean_over_labels
from minimegatron.layers.moe import expert_parameter_count, router_losses
from minimegatron.layers.positions import LearnedPositionEmbedding, RotaryEmbedding
from minimegatron.layers.transformer import (RecomputeSwitch, build_final_norm, build_layers,
                                            check_recompute)
from minimegatron.mpu.context_parallel import context_parallel_index
from minimegatron.mpu.embedding import ParallelLMHead, VocabParallelEmbedding
from minimegatron.mpu.layers import init_normal
from minimegatron.mpu.mappings import (gather_from_tensor_model_parallel_region,
                                       scatter_to_sequence_parallel_region)
from minimegatron.mpu.random import model_parallel_rng
from minimegatron.mpu.state import ParallelState
from minimegatron.sizes import divide

__all__ = ["LanguageModel", "Embedding", "build_rotary", "build_lm_head", "lm_head_kwargs", "lm_loss",
           "mean_over_labels",
           "check_sequence_parallel", "sequence_parallel_split", "default_position_ids",
           "parameter_counts", "count_parameters"]


# ---- the builders the plain model and the pipeline share ------------------------------------------
def build_rotary(config: ModelConfig) -> RotaryEmbedding | None:
    """RoPE's angles (no weights) when ``position_embedding="rope"``, else None."""
    return (RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
            if config.position_embedding == "rope" else None)


def lm_head_kwargs(config: ModelConfig, state: ParallelState) -> dict[str, Any]:
    """``ParallelLMHead``'s arguments for this model (the pipeline's heads take the same)."""
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, state=state,
                make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
                tied=config.tie_embeddings, sequence_parallel=state.sequence_parallel,
                init_method=init_normal(config.init_std), loss_chunk=config.lm_loss_chunk)


def build_lm_head(config: ModelConfig, state: ParallelState) -> ParallelLMHead:
    """The vocab-parallel head, (s[/tp], b, h) -> logits shard (s, b, V_pad/tp).

    Untied (LLaMA): its own (V_pad/tp, h) weight, drawn N(0, init_std²). Tied (GPT): no weight at all
    (``head.weight is None``, nothing in the state_dict); its caller hands it the word embeddings'
    table, ``head(hidden, weight=word_embeddings.weight)`` — ``LanguageModel.forward`` and the
    pipeline's ``tied_lm_head``.
    """
    return ParallelLMHead(**lm_head_kwargs(config, state))


def check_sequence_parallel(seq_len: int, state: ParallelState) -> None:
    """Under SP every TP rank holds s/tp tokens: ``seq_len`` (this rank's, s/cp under CP) must split
    evenly; under CP the local piece is two zig-zag chunks, so even (raise before any comm)."""
    if state.sequence_parallel:
        sequence_parallel_split(seq_len, state.tp)
    if state.cp > 1 and seq_len % 2:
        raise ValueError(f"context parallelism: this rank's piece of {seq_len} tokens is not two zig-zag "
                         f"chunks; give each CP rank split_for_context_parallel(...) of sequences whose "
                         f"length is a multiple of 2·cp = {2 * state.cp}")


def default_position_ids(batch: int, local_len: int, state: ParallelState, device=None, offset: int = 0
                         ) -> torch.Tensor:
    """(b, s) positions of this rank's tokens: ``offset … offset+s-1``, or under context parallelism
    the global positions of its zig-zag piece (``context_parallel_index``)."""
    if state.cp > 1:
        pos = context_parallel_index(local_len * state.cp, state.cp_rank, state.cp, device=device)
    else:
        pos = torch.arange(offset, offset + local_len, device=device)
    return pos.expand(batch, local_len)


def sequence_parallel_split(seq_len: int, tp: int) -> int:
    """``seq_len / tp``, the tokens each TP rank holds under SP, or the ValueError that says so
    (:func:`~minimegatron.sizes.divide`; ``training.args.validate`` asks it of a TrainConfig)."""
    return divide(seq_len, tp, "seq_len", fix=f"sequence parallelism splits each sequence over the "
                                              f"{tp} TP ranks; seq_len must be a multiple of {tp}")


class Embedding(nn.Module):
    """Word (+ learned position) embeddings: ids (b, s) -> (s, b, h), or (s/tp, b, h) under SP."""

    def __init__(self, config: ModelConfig, state: ParallelState) -> None:
        super().__init__()
        self.state, self.dropout = state, config.dropout
        self.sequence_parallel = state.sequence_parallel
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


class LanguageModel(RecomputeSwitch, nn.Module):
    """A decoder-only language model built from ``config`` on this rank's slice of ``state``.

    ``recompute``: ``"none"``, ``"selective"`` or ``"full"`` (``transformer.py``), every layer alike.
    ``init_seed``: the weights of layer index i come from ``init_rng(model_seed(init_seed), i)``;
    None takes the seed from torch's default generator (so ``torch.manual_seed(s)`` first is the same).
    """

    def __init__(self, config: ModelConfig, state: ParallelState | None = None,
                 recompute: str = "none", init_seed: int | None = None) -> None:
        super().__init__()
        state = state or ParallelState()
        config.validate_tp(state.tp)
        config.validate_cp(state.cp, state.cp_comm, state.tp)
        self.config, self.state = config, state
        seed, L = model_seed(init_seed), config.num_layers
        with init_rng(seed, 0):
            self.embedding = Embedding(config, state)  # index 0
        self.rotary = build_rotary(config)  # no weights
        self.layers = build_layers(config, state, check_recompute(recompute), seed)  # indices 1 … L
        self.final_norm = build_final_norm(config, state)  # index L+1: ones (and zeros), nothing drawn
        with init_rng(seed, L + 2):
            self.lm_head = build_lm_head(config, state)  # index L+2 (tied: no weight, nothing drawn)

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
        limit, total = self.config.max_seq_len, s * self.state.cp  # under CP: s/cp tokens here
        if offset + total > limit:  # every position kind: the learned table ends there, RoPE/ALiBi were
            what = ("the learned position table" if self.embedding.position_embeddings is not None
                    else f"the model's {self.config.position_embedding} positions")  # never checked past it
            raise ValueError(f"sequence length {offset + total} (cached {offset} + new {total}) exceeds "
                             f"{what}, max_seq_len={limit}: shorten the input or build the model with "
                             f"max_seq_len >= {offset + total}")
        check_sequence_parallel(s, self.state)
        if position_ids is None:
            position_ids = default_position_ids(b, s, self.state, input_ids.device, offset)
        elif position_ids.shape not in ((b, s), (1, s)):
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not match input_ids "
                             f"shape {(b, s)}: pass one position per token, (batch, seq) or (1, seq)")
        else:
            position_ids = position_ids.expand(b, s)  # (b, s)
        hidden = self.embedding(input_ids, position_ids)  # (s[/tp], b, h)
        rotary = None if self.rotary is None else self.rotary(position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, rotary, kv_cache)  # (s[/tp], b, h)
        if kv_cache is not None:
            kv_cache.offset += s  # these tokens are cached now
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)  # (s[/tp], b, h)
        # THE TIE (GPT): the head has no weight of its own and multiplies by the word embeddings' table
        head_weight = self.embedding.word_embeddings.weight if self.config.tie_embeddings else None
        if labels is None:
            logits = self.lm_head(hidden, weight=head_weight)  # (s, b, V_pad/tp)
            logits = gather_from_tensor_model_parallel_region(logits, self.state)  # (s, b, V_pad)
            return logits[..., :self.config.vocab_size].transpose(0, 1).contiguous()  # (b, s, V)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {(b, s)}")
        if self.config.fused_lm_loss:  # Σ ℓ, logits never whole; then the same mean as lm_loss
            labels = labels.t()  # (s, b), the hidden states' layout
            loss = mean_over_labels(self.lm_head(hidden, weight=head_weight, labels=labels), labels, self.state)
        else:
            logits = self.lm_head(hidden, weight=head_weight)  # (s, b, V_pad/tp)
            loss = lm_loss(logits, labels, self.state, self.config.vocab_size)
        if not self.config.num_experts:
            return loss
        aux, z = router_losses(self.layers)  # MoE: + the router losses of its MoE layers
        return loss + self.config.moe_aux_loss_coeff * aux + self.config.moe_z_loss_coeff * z

    def num_parameters(self, include_padding: bool = False) -> int:
        """Parameters of the whole model (all TP ranks), without the vocab padding rows by default."""
        dense = [p for p in self.parameters() if not getattr(p, "expert_parallel", False)]
        sharded = sum(p.numel() for p in dense if getattr(p, "tensor_model_parallel", False))
        replicated = sum(p.numel() for p in dense if not getattr(p, "tensor_model_parallel", False))
        if self.state.tp > 1:
            total = torch.tensor([sharded], dtype=torch.int64)
            dist.all_reduce(total, group=self.state.tp_group)
            sharded = int(total.item())
        count = sharded + replicated + expert_parameter_count(self, self.state)  # experts: over TP, EP
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
    a, attn_bias = config.attention_width, int(config.has_attention_bias)  # a = heads·d (= h by default)
    gated = int(config.activation == "swiglu")
    norm_size = (2 if config.norm == "layernorm" and config.bias else 1) * h
    mlp = (1 + gated) * h * f + f * h + bias * ((1 + gated) * f + h)  # one (dense or expert) MLP
    moe, E = config.num_moe_layers, config.num_experts
    counts = {
        "embedding": V * h,
        "positions": config.max_seq_len * h if config.position_embedding == "learned" else 0,
        "attention": L * (h * (a + 2 * kv * d) + a * h + attn_bias * (a + 2 * kv * d + h)),
        "mlp": (L - moe) * mlp + moe * (E * mlp + E * h),  # MoE layer: E experts + the (E, h) gate
        "norms": 2 * L * norm_size,
        "final_norm": norm_size if config.final_norm else 0,
        "lm_head": 0 if config.tie_embeddings else V * h,
    }
    counts["total"] = sum(counts.values())
    return counts


def count_parameters(config: ModelConfig) -> int:
    """Total parameters of a model built from ``config`` (unpadded vocab), in closed form."""
    return parameter_counts(config)["total"]
