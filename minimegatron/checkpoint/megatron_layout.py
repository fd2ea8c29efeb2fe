"""Megatron-LM's checkpoint layout in memory: key names, the fused QKV order, TP shards, PP stages, args.

The weights of one (tp_rank, pp_rank) in a Megatron-LM (legacy) / Megatron-DeepSpeed checkpoint, as the
nested dict ``state_dict["model"]`` (flattened with dots; ``i`` is the layer index *within the stage*)::

    minimegatron (full)                   Megatron-LM                                        TP split
    embedding.word_embeddings   (V, h)    language_model.embedding.word_embeddings.weight     rows (V_pad/tp)
    embedding.position_embeddings         language_model.embedding.position_embeddings.weight replicated
    layers.j.input_norm                   language_model.encoder.layers.i.input_layernorm     replicated
    layers.j.attention.query_key_value    ....self_attention.query_key_value  (see below)     rows
      (or .query + .key_value: GQA)
    layers.j.attention.dense              ....self_attention.dense                            columns
    layers.j.post_attention_norm          ....post_attention_layernorm                        replicated
    layers.j.mlp.dense_h_to_4h            ....mlp.dense_h_to_4h        (SwiGLU: per rank [gate_r; up_r])
    layers.j.mlp.dense_4h_to_h            ....mlp.dense_4h_to_h                               columns
    final_norm                            language_model.encoder.final_layernorm              replicated
    lm_head.weight  (untied, LLaMA)       language_model.output_layer.weight                  rows (V_pad/tp)
    (tied, GPT, pp > 1)                   word_embeddings_for_head.weight  (the last stage's copy)

Row-parallel biases (``dense``, ``dense_4h_to_h``) are replicated. Stage 0 holds the embedding, the last
stage the final norm and the output layer; each stage ``s`` holds layers ``j = s·L/pp + i`` (Megatron's
even split, ``L % pp == 0``).

QKV, ``checkpoint_version`` >= 2.0 (Megatron-LM's ``ParallelAttention`` views the projection's output
as ``(ng, (np/ng + 2)·d)`` and splits each group into its query heads, one key head and one value head)::

    rows = [q_{g,0} … q_{g,np/ng-1}, k_g, v_g  for g in 0 … ng-1]        each block d rows

so MHA (ng = np) is ``[q_0 k_0 v_0, q_1 k_1 v_1, …]`` — the order HF's ``fix_query_key_value_ordering``
undoes for version >= 2.0. TP then splits the rows in ``tp`` contiguous pieces (whole groups per rank),
which is why Megatron needs ``ng % tp == 0``. Ours is ``[Q; K; V]`` (or ``query`` and ``[K; V]``) with
TP strides 3 / 2; :func:`qkv_to_megatron` and :func:`qkv_from_megatron` map one to the other, on full
tensors. SwiGLU: Megatron chunks each rank's ``dense_h_to_4h`` output in two (``silu(x_0)·x_1``), so
rank r holds ``[gate_r; up_r]`` — exactly our stride-2 shard, so ``shard_weight(stride=2)`` cuts it.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from minimegatron.checkpoint.reshape import CheckpointError
from minimegatron.config import ModelConfig
from minimegatron.mpu.layers import shard_weight

__all__ = ["CHECKPOINT_VERSION", "megatron_args", "config_from_args", "to_megatron", "from_megatron",
           "qkv_to_megatron", "qkv_from_megatron", "shard_stage", "join_shards", "stage_layers",
           "LM", "ENC"]

Tensors = dict[str, torch.Tensor]
CHECKPOINT_VERSION = 3.0
LM, ENC = "language_model.", "language_model.encoder."
WORD, POS = LM + "embedding.word_embeddings.weight", LM + "embedding.position_embeddings.weight"
OUTPUT, HEAD_COPY = LM + "output_layer.weight", "word_embeddings_for_head.weight"
# per layer: ours -> Megatron's (a weight or a bias suffix follows)
_LAYER = {"input_norm": "input_layernorm", "attention.dense": "self_attention.dense",
          "post_attention_norm": "post_attention_layernorm", "mlp.dense_h_to_4h": "mlp.dense_h_to_4h",
          "mlp.dense_4h_to_h": "mlp.dense_4h_to_h"}
_LAYER_BACK = {v: k for k, v in _LAYER.items()} | {"input_norm": "input_norm",  # newer Megatron-LM
                                                   "post_attention_norm": "post_attention_norm"}


# ---- args: the namespace Megatron's loaders and HF's converter read --------------------------------

def megatron_args(config: ModelConfig, tp: int, pp: int, dtype: torch.dtype, iteration: int,
                  **overrides: Any) -> argparse.Namespace:
    """Megatron-LM's training arguments for this model (the fields its checkpoint loaders read)."""
    llama = config.position_embedding == "rope"
    gqa = config.num_kv_heads != config.num_attention_heads
    fields = dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, kv_channels=config.head_dim,
        group_query_attention=gqa, num_query_groups=config.num_kv_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len, seq_length=config.max_seq_len,
        position_embedding_type="rope" if llama else "learned_absolute",
        use_rotary_position_embeddings=llama, rotary_base=config.rope_theta, rotary_percent=1.0,
        normalization="RMSNorm" if config.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=config.norm_eps, norm_epsilon=config.norm_eps, apply_layernorm_1p=False,
        swiglu=config.activation == "swiglu", openai_gelu=config.gelu_approximate == "tanh",
        bias_gelu_fusion=False, add_bias_linear=config.bias, add_qkv_bias=config.bias,
        untie_embeddings_and_output_weights=not config.tie_embeddings,
        vocab_size=config.vocab_size, orig_vocab_size=config.vocab_size,
        padded_vocab_size=config.padded_vocab_size(tp),
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, params_dtype=dtype,
        fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, apply_query_key_layer_scaling=False,
        hidden_dropout=config.dropout, attention_dropout=config.dropout, init_method_std=config.init_std,
        tokenizer_type="Llama2Tokenizer" if llama else "GPT2BPETokenizer",
        iteration=iteration, consumed_train_samples=0, num_experts=None)
    return argparse.Namespace(**(fields | overrides))


def config_from_args(args: Any, where: str) -> ModelConfig:
    """The ModelConfig of a Megatron checkpoint from its ``args``; what we cannot build is refused."""
    def get(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    refuse = []
    if get("num_experts"):
        refuse.append(f"num_experts={get('num_experts')} (MoE)")
    if get("apply_layernorm_1p"):
        refuse.append("apply_layernorm_1p=True")
    if get("rotary_percent", 1.0) != 1.0:
        refuse.append(f"rotary_percent={get('rotary_percent')}")
    rope = get("position_embedding_type", "rope" if get("use_rotary_position_embeddings") else
               "learned_absolute")
    if rope not in ("rope", "learned_absolute"):
        refuse.append(f"position_embedding_type={rope!r}")
    bias = get("add_bias_linear", True)
    if get("add_qkv_bias", bias) != bias:
        refuse.append(f"add_qkv_bias={get('add_qkv_bias')} with add_bias_linear={bias}")
    if refuse:
        raise CheckpointError(f"{where}: Megatron args {', '.join(refuse)}: minimegatron cannot build this "
                              "model; convert a checkpoint of a plain GPT/LLaMA (dense, learned or full "
                              "RoPE)")
    heads = get("num_attention_heads")
    kv = get("num_query_groups") if get("group_query_attention") else heads
    swiglu = bool(get("swiglu", False))
    return ModelConfig(
        vocab_size=get("vocab_size") or get("orig_vocab_size") or get("padded_vocab_size"),
        hidden_size=get("hidden_size"),
        num_layers=get("num_layers"), num_attention_heads=heads, num_kv_heads=kv,
        max_seq_len=get("max_position_embeddings"), ffn_hidden_size=get("ffn_hidden_size"),
        norm="rmsnorm" if get("normalization", "LayerNorm") == "RMSNorm" else "layernorm",
        norm_eps=get("norm_epsilon", get("layernorm_epsilon", 1e-5)),
        activation="swiglu" if swiglu else "gelu",
        gelu_approximate="tanh" if get("openai_gelu") or get("bias_gelu_fusion") else "none",
        position_embedding="rope" if rope == "rope" else "learned", rope_theta=get("rotary_base", 10000.0),
        bias=bias, tie_embeddings=not get("untie_embeddings_and_output_weights", False),
        make_vocab_size_divisible_by=get("make_vocab_size_divisible_by", 128),
        init_std=get("init_method_std", 0.02), name="llama" if rope == "rope" else "gpt")


# ---- QKV order, on full tensors --------------------------------------------------------------------

def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """``q`` (np·d, …), ``k``, ``v`` (ng·d, …) -> Megatron's (ng·(np/ng + 2)·d, …), group by
    group."""
    rest = q.shape[1:]
    d = k.shape[0] // groups
    q = q.reshape(groups, -1, d, *rest)  # (ng, np/ng, d, …)
    k, v = k.reshape(groups, 1, d, *rest), v.reshape(groups, 1, d, *rest)  # (ng, 1, d, …)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # (ng·(np/ng + 2)·d, …)


def qkv_from_megatron(qkv: torch.Tensor, heads: int, groups: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_to_megatron`: Megatron's fused rows -> full q (np·d, …), k, v (ng·d, …)."""
    rest, per = qkv.shape[1:], heads // groups
    x = qkv.reshape(groups, per + 2, -1, *rest)  # (ng, np/ng + 2, d, …)
    q, k, v = x.split([per, 1, 1], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


# ---- full state dict: ours <-> Megatron's (TP-independent, unpadded, global layer numbers) ----------

def to_megatron(full: Tensors, config: ModelConfig) -> Tensors:
    """Our full state dict -> Megatron's names and QKV order (global layer index ``layers.j``)."""
    out: Tensors = {WORD: full["embedding.word_embeddings.weight"]}
    if config.position_embedding == "learned":
        out[POS] = full["embedding.position_embeddings.weight"]
    kv, h = config.num_kv_heads, config.hidden_size
    for j in range(config.num_layers):
        ours, meg = f"layers.{j}.", f"{ENC}layers.{j}."
        for a, b in _LAYER.items():  # Megatron's order: norm, QKV, dense, norm, MLP
            for part in ("weight", "bias"):
                if f"{ours}{a}.{part}" in full:
                    out[f"{meg}{b}.{part}"] = full[f"{ours}{a}.{part}"]
            if a != "input_norm":
                continue
            att = ours + "attention."
            for part in ("weight", "bias"):
                if f"{att}query_key_value.{part}" in full:  # MHA: [Q; K; V]
                    q, k, v = full[f"{att}query_key_value.{part}"].split([h, h, h])
                elif f"{att}query.{part}" in full:  # GQA/MQA: query, [K; V]
                    q = full[f"{att}query.{part}"]
                    k, v = full[f"{att}key_value.{part}"].chunk(2)
                else:
                    continue
                out[f"{meg}self_attention.query_key_value.{part}"] = qkv_to_megatron(q, k, v, kv)
    for part in ("weight", "bias"):
        if f"final_norm.{part}" in full:
            out[f"{ENC}final_layernorm.{part}"] = full[f"final_norm.{part}"]
    if not config.tie_embeddings:
        out[OUTPUT] = full["lm_head.weight"]
    return out


def from_megatron(meg: Tensors, config: ModelConfig) -> Tensors:
    """Inverse of :func:`to_megatron`; vocab rows beyond ``config.vocab_size`` (padding) are dropped."""
    out: Tensors = {"embedding.word_embeddings.weight": meg[WORD][:config.vocab_size]}
    if POS in meg:
        out["embedding.position_embeddings.weight"] = meg[POS]
    heads, kv = config.num_attention_heads, config.num_kv_heads
    for j in range(config.num_layers):
        ours, meg_prefix = f"layers.{j}.", f"{ENC}layers.{j}."
        for name, t in meg.items():
            if not name.startswith(meg_prefix):
                continue
            module, part = name[len(meg_prefix):].rsplit(".", 1)
            if module == "self_attention.query_key_value":
                q, k, v = qkv_from_megatron(t, heads, kv)
                if kv == heads:
                    out[f"{ours}attention.query_key_value.{part}"] = torch.cat([q, k, v])
                else:
                    out[f"{ours}attention.query.{part}"] = q
                    out[f"{ours}attention.key_value.{part}"] = torch.cat([k, v])
            elif module in _LAYER_BACK:
                out[f"{ours}{_LAYER_BACK[module]}.{part}"] = t
            else:
                raise CheckpointError(f"Megatron tensor '{name}' has no minimegatron counterpart: the "
                                      "checkpoint is of a model this package cannot build")
    for part in ("weight", "bias"):
        for key in (f"{ENC}final_layernorm.{part}", f"{ENC}final_norm.{part}"):
            if key in meg:
                out[f"final_norm.{part}"] = meg[key]
    if OUTPUT in meg:
        out["lm_head.weight"] = meg[OUTPUT][:config.vocab_size]
    return out


# ---- TP shards and PP stages of Megatron's full tensors --------------------------------------------

def _split(name: str, swiglu: bool) -> tuple[int | None, int]:
    """(TP-split dim or None = replicated, stride) of a Megatron tensor."""
    if name in (WORD, OUTPUT, HEAD_COPY) or name.endswith(("query_key_value.weight", "query_key_value.bias")):
        return 0, 1
    if name.endswith("mlp.dense_h_to_4h.weight") or name.endswith("mlp.dense_h_to_4h.bias"):
        return 0, 2 if swiglu else 1
    if name.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")):
        return 1, 1
    return None, 1


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    """Global indices of the layers of stage ``pp_rank`` (Megatron's even split)."""
    n = num_layers // pp
    return range(pp_rank * n, (pp_rank + 1) * n)


def shard_stage(meg: Tensors, config: ModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int) -> Tensors:
    """The tensors of rank (tp_rank, pp_rank): this stage's layers renumbered from 0, vocab padded for
    ``tp``, each TP-split tensor cut by ``shard_weight``."""
    layers = stage_layers(config.num_layers, pp, pp_rank)
    first, last = pp_rank == 0, pp_rank == pp - 1
    rows = config.padded_vocab_size(tp)
    picked: Tensors = {}
    for name, t in meg.items():
        if name.startswith(ENC + "layers."):
            j, rest = name[len(ENC + "layers."):].split(".", 1)
            if int(j) in layers:
                picked[f"{ENC}layers.{int(j) - layers.start}.{rest}"] = t
        elif name.startswith(LM + "embedding."):
            if first:
                picked[name] = t
            if name == WORD and last and not first and config.tie_embeddings:
                picked[HEAD_COPY] = t  # Megatron keeps the tied LM head's copy on the last stage
        elif last:  # final norm, output layer
            picked[name] = t
    out = {}
    for name, t in picked.items():
        if name in (WORD, OUTPUT, HEAD_COPY):
            t = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])  # (V, h) -> (V_pad, h)
        dim, stride = _split(name, config.activation == "swiglu")
        out[name] = (t if dim is None else shard_weight(t, dim, tp_rank, tp, stride)).clone()
    return out


def join_shards(shards: list[Tensors], config: ModelConfig, where: str) -> Tensors:
    """Inverse of the TP cut of :func:`shard_stage`: one stage's ``tp`` shard dicts -> full tensors."""
    names = shards[0].keys()
    for r, s in enumerate(shards[1:], 1):
        if s.keys() != names:
            raise CheckpointError(f"{where}: tensor-parallel rank {r} holds other tensors than rank 0 "
                                  f"({sorted(set(s) ^ set(names))[:4]}): the checkpoint is damaged")
    out = {}
    for name in names:
        parts = [s[name] for s in shards]
        dim, stride = _split(name, config.activation == "swiglu")
        if dim is None:
            out[name] = parts[0]
            continue
        x = [p.movedim(dim, 0) for p in parts]  # tp × (n/tp, …)
        blocks = [p.chunk(stride) for p in x]  # undo the stride: block b of every rank, then b + 1
        out[name] = torch.cat([blocks[r][b] for b in range(stride) for r in range(len(x))]).movedim(0, dim)
    return out
