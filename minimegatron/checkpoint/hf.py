"""Hugging Face transformers <-> minimegatron, both ways, into any TP size.

Conversion goes through the TP-independent *full state dict* (:mod:`.reshape`): HF tensors are renamed
and re-laid-out into full minimegatron tensors, then every rank keeps its shard; the way back gathers
the shards and undoes the layout. Weight by weight (``i`` = layer)::

    minimegatron (full)                         GPT2LMHeadModel               LlamaForCausalLM
    embedding.word_embeddings.weight  (V, h)    wte                           model.embed_tokens
    embedding.position_embeddings.weight        wpe                           —  (RoPE: no weights)
    layers.i.input_norm                         h.i.ln_1                      model.layers.i.input_layernorm
    layers.i.attention.query_key_value (3h, h)  h.i.attn.c_attn  (ᵀ)          [q_proj; k_proj; v_proj] (MHA)
    layers.i.attention.query / .key_value       —                             q_proj / [k_proj; v_proj]
    layers.i.attention.dense                    h.i.attn.c_proj  (ᵀ)          self_attn.o_proj
    layers.i.attention.*.bias                   h.i.attn.*.bias               [q; k; v]_proj.bias, o_proj.bias
    layers.i.post_attention_norm                h.i.ln_2                      post_attention_layernorm
    layers.i.mlp.dense_h_to_4h                  h.i.mlp.c_fc     (ᵀ)          [mlp.gate_proj; mlp.up_proj]
    layers.i.mlp.dense_4h_to_h                  h.i.mlp.c_proj   (ᵀ)          mlp.down_proj
    final_norm                                  ln_f                          model.norm
    lm_head.weight                              (tied to wte)                 lm_head

MixtralForCausalLM is the LLaMA table where ``config.num_experts > 0``, its MLP rows replaced by::

    layers.i.mlp.router.weight  (E, h)                           model.layers.i.mlp.gate.weight
    layers.i.mlp.experts.e.dense_h_to_4h.weight  (2f, h)         model.layers.i.mlp.experts.gate_up_proj[e]
    layers.i.mlp.experts.e.dense_4h_to_h.weight  (h, f)          model.layers.i.mlp.experts.down_proj[e]

transformers 5 stores the experts fused, as 3-D (E, 2f, h) / (E, h, f) tensors; ``gate_up_proj[e]`` is
``[W_gate; W_up]`` (its forward chunks the output in two), exactly our fused ``dense_h_to_4h``. Older
checkpoints (the Hub's) name each expert ``block_sparse_moe.experts.e.w1 / w3 / w2`` (gate / up /
down) and the gate ``block_sparse_moe.gate``: read as well (``_legacy_mixtral``).

(ᵀ) GPT-2 uses ``Conv1D``, which stores weights as (in, out) — the transpose of ``nn.Linear``'s
(out, in). Its fused ``c_attn`` output is ``[q | k | v]``, exactly our ``[W_Q; W_K; W_V]`` once
transposed. HF LLaMA's q/k projections already use the rotate-half RoPE layout we use: no permutation.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from minimegatron.checkpoint.hf_config import config_from_hf, config_to_hf, hf_family
from minimegatron.checkpoint.reshape import (CheckpointError, barrier, full_state_dict, is_writer,
                                             load_full_state_dict, model_config, parallel_state_of)
from minimegatron.config import ModelConfig
from minimegatron.models import model_class
from minimegatron.mpu.state import ParallelState

__all__ = ["from_hf", "to_hf", "state_dict_from_hf", "state_dict_to_hf", "load_hf_directory"]

Tensors = dict[str, torch.Tensor]
_T: Callable[[torch.Tensor], torch.Tensor] = lambda w: w.t().contiguous()  # noqa: E731  Conv1D <-> Linear
_ID: Callable[[torch.Tensor], torch.Tensor] = lambda w: w  # noqa: E731
# HF entries that carry no weights of the model (attention-mask / RoPE buffers of older versions)
_IGNORABLE = re.compile(r"(\.attn\.(bias|masked_bias)|rotary_emb\.inv_freq)$")

# (ours, HF, transform HF -> ours); the transforms here are their own inverses
_GPT_GLOBAL = [("embedding.word_embeddings.weight", "wte.weight", _ID),
               ("embedding.position_embeddings.weight", "wpe.weight", _ID),
               ("final_norm.weight", "ln_f.weight", _ID), ("final_norm.bias", "ln_f.bias", _ID)]
_GPT_LAYER = [("input_norm.weight", "ln_1.weight", _ID), ("input_norm.bias", "ln_1.bias", _ID),
              ("attention.query_key_value.weight", "attn.c_attn.weight", _T),
              ("attention.query_key_value.bias", "attn.c_attn.bias", _ID),
              ("attention.dense.weight", "attn.c_proj.weight", _T),
              ("attention.dense.bias", "attn.c_proj.bias", _ID),
              ("post_attention_norm.weight", "ln_2.weight", _ID),
              ("post_attention_norm.bias", "ln_2.bias", _ID),
              ("mlp.dense_h_to_4h.weight", "mlp.c_fc.weight", _T),
              ("mlp.dense_h_to_4h.bias", "mlp.c_fc.bias", _ID),
              ("mlp.dense_4h_to_h.weight", "mlp.c_proj.weight", _T),
              ("mlp.dense_4h_to_h.bias", "mlp.c_proj.bias", _ID)]
_LLAMA_GLOBAL = [("embedding.word_embeddings.weight", "model.embed_tokens.weight", _ID),
                 ("final_norm.weight", "model.norm.weight", _ID)]
_LLAMA_LAYER = [("input_norm.weight", "input_layernorm.weight", _ID),
                ("attention.dense.weight", "self_attn.o_proj.weight", _ID),
                ("post_attention_norm.weight", "post_attention_layernorm.weight", _ID),
                ("mlp.dense_4h_to_h.weight", "mlp.down_proj.weight", _ID)]
# fused in minimegatron, separate in HF LLaMA: ours = cat(HF parts, dim 0)
_LLAMA_FUSED_MHA = [("attention.query_key_value.weight",
                     ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"])]
_LLAMA_FUSED_GQA = [("attention.query.weight", ["self_attn.q_proj.weight"]),
                    ("attention.key_value.weight", ["self_attn.k_proj.weight", "self_attn.v_proj.weight"])]
_LLAMA_FUSED_MLP = [("mlp.dense_h_to_4h.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"])]
# attention_bias=True: the same tables for the biases, fused alike ([b_q; b_k; b_v]), plus o_proj's
_LLAMA_BIAS = [("attention.dense.bias", "self_attn.o_proj.bias", _ID)]


def _biases(fused: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    return [(ours.replace(".weight", ".bias"), [h.replace(".weight", ".bias") for h in hfs])
            for ours, hfs in fused]
_MIXTRAL_LAYER = [p for p in _LLAMA_LAYER if not p[0].startswith("mlp.")] + [
    ("mlp.router.weight", "mlp.gate.weight", _ID)]
# stacked in HF Mixtral, one tensor per expert here: ours(e) = HF[e]
_MIXTRAL_EXPERTS = [("mlp.experts.{e}.dense_h_to_4h.weight", "mlp.experts.gate_up_proj"),
                    ("mlp.experts.{e}.dense_4h_to_h.weight", "mlp.experts.down_proj")]
_LEGACY_EXPERT = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\."
                            r"(gate\.weight|experts\.(\d+)\.(w[123])\.weight)$")


def _tables(config: ModelConfig):
    """(one-to-one name pairs, fused pairs, stacked experts) of the whole model, layers expanded."""
    bias: list = []  # LLaMA with attention_bias: o_proj.bias here (the q/k/v biases are fused)
    if config.position_embedding == "learned":
        glob, layer, fused, prefix = _GPT_GLOBAL, _GPT_LAYER, [], "h.{i}."
    else:
        glob, layer, prefix = _LLAMA_GLOBAL, _LLAMA_LAYER, "model.layers.{i}."
        mha = config.num_kv_heads == config.num_attention_heads
        attention = _LLAMA_FUSED_MHA if mha else _LLAMA_FUSED_GQA
        fused = attention + _LLAMA_FUSED_MLP
        if config.attention_bias:
            fused, bias = fused + _biases(attention), _LLAMA_BIAS
    pairs = list(glob)
    fused_pairs, stacked = [], []  # stacked: ([ours of expert 0 … E-1], HF 3-D name)
    for i in range(config.num_layers):
        p, moe = prefix.format(i=i), config.is_moe_layer(i)
        one_to_one = (_MIXTRAL_LAYER if moe else layer) + bias
        pairs += [(f"layers.{i}.{ours}", p + hf, fn) for ours, hf, fn in one_to_one]
        fused_pairs += [(f"layers.{i}.{ours}", [p + h for h in hfs]) for ours, hfs in fused
                        if not (moe and ours.startswith("mlp."))]
        stacked += [([f"layers.{i}." + ours.format(e=e) for e in range(config.num_experts)], p + hf)
                    for ours, hf in (_MIXTRAL_EXPERTS if moe else [])]
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", _ID))
    return pairs, fused_pairs, stacked


def _legacy_mixtral(sd: Tensors) -> Tensors:
    """The Hub's per-expert Mixtral names (``block_sparse_moe.experts.e.w1/w3/w2``) -> the fused 3-D
    ``mlp.experts.gate_up_proj`` (= [w1; w3] per expert) and ``down_proj`` (w2); others unchanged."""
    out, experts = {}, {}
    for name, t in sd.items():
        m = _LEGACY_EXPERT.match(name)
        if m is None:
            out[name] = t
        elif m.group(3) is None:
            out[m.group(1) + "mlp.gate.weight"] = t
        else:
            experts.setdefault(m.group(1), {})[(int(m.group(3)), m.group(4))] = t
    for prefix, w in experts.items():
        E = 1 + max(e for e, _ in w)
        out[prefix + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w[e, "w1"], w[e, "w3"]]) for e in range(E)])  # (E, 2f, h)
        out[prefix + "mlp.experts.down_proj"] = torch.stack([w[e, "w2"] for e in range(E)])  # (E, h, f)
    return out


def state_dict_from_hf(hf_state_dict: Tensors, config: ModelConfig) -> Tensors:
    """HF names/layouts -> the full minimegatron state dict (TP-independent, unpadded vocab)."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict.items()}  # GPT2LMHeadModel/GPT2Model
    if config.num_experts:
        sd = _legacy_mixtral(sd)
    pairs, fused, stacked = _tables(config)
    used = {hf for _, hf, _ in pairs} | {h for _, hfs in fused for h in hfs} | {hf for _, hf in stacked}
    missing = sorted(n for n in used if n not in sd)
    if missing:
        more = " …" if len(missing) > 6 else ""
        raise CheckpointError(f"the Hugging Face state dict lacks {missing[:6]}{more} ({len(missing)} tensors)"
                              f" for a {config.num_layers}-layer "
                              f"{'GPT-2' if config.position_embedding == 'learned' else 'LLaMA'}: pass "
                              "the *ForCausalLM / *LMHeadModel weights and their own config")
    if config.tie_embeddings:
        used.add("lm_head.weight")  # tied: the same tensor as the embedding (when present at all)
    extra = sorted(k for k in sd if k not in used and not _IGNORABLE.search(k))
    if extra:
        raise CheckpointError(f"the Hugging Face state dict has tensors no minimegatron weight maps "
                              f"to: {extra[:6]} — is the config (num_layers, tie_word_embeddings, "
                              "biases) the one these weights were saved with?")
    out = {ours: fn(sd[hf]) for ours, hf, fn in pairs}
    out.update({ours: torch.cat([sd[h] for h in hfs], dim=0) for ours, hfs in fused})  # (Σ out, h)
    for ours, hf in stacked:
        if sd[hf].size(0) != len(ours):
            raise CheckpointError(f"{hf} holds {sd[hf].size(0)} experts, the config {len(ours)}: pass "
                                  "the weights with their own config (num_local_experts)")
        out.update(zip(ours, sd[hf].unbind(0)))  # (E, …) -> E tensors
    return out


def state_dict_to_hf(full: Tensors, config: ModelConfig) -> Tensors:
    """The full minimegatron state dict -> HF names/layouts (inverse of :func:`state_dict_from_hf`)."""
    pairs, fused, stacked = _tables(config)
    gpt = config.position_embedding == "learned"
    out = {("transformer." + hf if gpt and hf != "lm_head.weight" else hf): fn(full[ours])
           for ours, hf, fn in pairs}
    for ours, hfs in fused:
        sizes = [config.attention_width if "q_proj" in h else
                 config.num_kv_heads * config.head_dim if ("k_proj" in h or "v_proj" in h) else
                 config.ffn_hidden_size for h in hfs]
        out.update(zip(hfs, full[ours].split(sizes, dim=0)))  # (Σ out, h) -> parts
    out.update({hf: torch.stack([full[name] for name in ours]) for ours, hf in stacked})  # (E, …)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight" if gpt else "model.embed_tokens.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _model_class(config: ModelConfig) -> type[nn.Module]:
    """GPTModel for learned positions (GPT-2), else LLaMAModel (the registry: minimegatron.models)."""
    return model_class("gpt" if config.position_embedding == "learned" else "llama")


def _refuse_expert_parallel(state: ParallelState) -> None:
    if getattr(state, "ep", 1) > 1:
        raise CheckpointError(f"expert parallelism ep={state.ep}: each rank holds E/ep experts; convert "
                              "Hugging Face weights with ep=1 (every expert on each rank)")


def load_hf_directory(directory: str | os.PathLike) -> tuple[Tensors, dict[str, Any]]:
    """(state dict, config dict) of a ``save_pretrained`` directory — safetensors only, no pickle."""
    path = Path(directory)
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise CheckpointError(f"{path} is not a Hugging Face model directory with safetensors weights "
                              "(config.json + *.safetensors); .bin (pickle) checkpoints are not read — "
                              "re-save them with save_pretrained(..., safe_serialization=True)")
    from minimegatron.checkpoint.files import open_safetensors, read_json

    config = read_json(path / "config.json")  # a damaged file is named, not "Expecting value"
    sd: Tensors = {}
    for f in files:
        with open_safetensors(f) as fh:  # header checked first: a truncated file or a pickle is named
            sd.update({k: fh.get_tensor(k) for k in fh.keys()})
    return sd, config


def from_hf(hf_model_or_state_dict: Any, hf_config: Any = None, state: ParallelState | None = None,
            dtype: torch.dtype | None = None) -> nn.Module:
    """A GPTModel / LLaMAModel holding a Hugging Face model's weights, split for ``state``'s TP size
    (``MixtralForCausalLM``: a LLaMAModel with MoE layers, every expert on this rank — ep = 1).

    ``hf_model_or_state_dict``: a ``GPT2LMHeadModel`` / ``LlamaForCausalLM``, its ``state_dict()``
    (then ``hf_config`` is required: the HF config object or its config.json dict), or the path of a
    ``save_pretrained`` directory. Call it on every TP rank (each keeps its own shard).
    """
    if isinstance(hf_model_or_state_dict, (str, os.PathLike)):
        sd, file_config = load_hf_directory(hf_model_or_state_dict)
        hf_config = hf_config if hf_config is not None else file_config
    elif isinstance(hf_model_or_state_dict, nn.Module):
        sd = hf_model_or_state_dict.state_dict()
        hf_config = hf_config if hf_config is not None else hf_model_or_state_dict.config
    elif isinstance(hf_model_or_state_dict, dict):
        sd = hf_model_or_state_dict
        if hf_config is None:
            raise ValueError("from_hf(state_dict) needs hf_config= (the HF config or its config.json "
                             "dict): a state dict alone does not say eps, rope_theta or tying")
    else:
        raise TypeError(f"from_hf takes an HF model, its state_dict or a directory, got "
                        f"{type(hf_model_or_state_dict).__name__}")
    hf_family(hf_config)
    config = config_from_hf(hf_config)
    state = state or ParallelState()
    config.validate_tp(state.tp)
    _refuse_expert_parallel(state)
    model = _model_class(config)(config, state)
    load_full_state_dict(model, state_dict_from_hf(sd, config))
    return model.to(dtype) if dtype is not None else model


def to_hf(model: nn.Module, save_directory: str | os.PathLike | None = None,
          dtype: torch.dtype | None = None, **hf_config_overrides: Any) -> nn.Module:
    """A ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` with ``model``'s weights (on every rank).

    Collective (every rank calls it; shards are all-gathered over TP). With ``save_directory``, global
    rank 0 also writes it with ``save_pretrained`` (safetensors), loadable by
    ``AutoModelForCausalLM.from_pretrained``.
    ``hf_config_overrides`` go to the HF config (e.g. ``eos_token_id=...``).
    """
    config = model_config(model)
    _refuse_expert_parallel(parallel_state_of(model))  # refuses pipeline stages and ep > 1
    hf_config = config_to_hf(config, **hf_config_overrides)  # raises early if no HF architecture fits
    full = full_state_dict(model)  # collective over TP
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM
    cls = (GPT2LMHeadModel if config.position_embedding == "learned" else
           MixtralForCausalLM if config.num_experts else LlamaForCausalLM)
    hf_model = cls(hf_config).eval()
    result = hf_model.load_state_dict(state_dict_to_hf(full, config), strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not _IGNORABLE.search(k)]
    if missing or unexpected:  # a bug in the tables, not a user error
        raise CheckpointError(f"internal: HF model missing {missing}, unexpected {unexpected}")
    if dtype is not None:
        hf_model = hf_model.to(dtype)
    if save_directory is not None:
        if is_writer():
            hf_model.save_pretrained(str(save_directory))
        barrier()
    return hf_model
