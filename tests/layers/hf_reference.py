"""Hugging Face transformers as the independent reference: tiny random models, a tiny weight mapping.

Nothing is downloaded: the HF models are built from LlamaConfig / GPT2Config with random weights
(every parameter, biases and norm gains included, is perturbed so that a missed mapping shows), then
copied into our names. The real checkpoint converter lives elsewhere; this is only the test's own map.
"""
from __future__ import annotations

import torch

from minimegatron.config import ModelConfig, gpt_config, llama_config
from minimegatron.mpu.layers import gather_weight, shard_weight

VOCAB = 100  # deliberately not a multiple of make_vocab_size_divisible_by: padding is exercised


def tiny_llama(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, max_seq_len=64,
                multiple_of=32, make_vocab_size_divisible_by=8)
    return llama_config(**{**base, **kw})


def tiny_gpt(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, max_seq_len=64,
                make_vocab_size_divisible_by=8)
    return gpt_config(**{**base, **kw})


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_llama(config: ModelConfig, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=False, attention_bias=False,
        attn_implementation="eager")
    torch.manual_seed(seed)
    return _perturb(LlamaForCausalLM(hf_config), seed)


def hf_gpt2(config: ModelConfig, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.hidden_size,
        n_layer=config.num_layers, n_head=config.num_attention_heads, activation_function="gelu_new",
        layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager")
    torch.manual_seed(seed)
    return _perturb(GPT2LMHeadModel(hf_config), seed)


def llama_from_hf(hf) -> dict[str, torch.Tensor]:
    """Our full (unpadded) state dict from LlamaForCausalLM."""
    sd, out = hf.state_dict(), {}
    out["embedding.word_embeddings.weight"] = sd["model.embed_tokens.weight"]
    for i in range(hf.config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        qkv = [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]
        if hf.config.num_key_value_heads == hf.config.num_attention_heads:
            out[q + "attention.query_key_value.weight"] = torch.cat(qkv)  # [Q; K; V]
        else:
            out[q + "attention.query.weight"] = qkv[0]
            out[q + "attention.key_value.weight"] = torch.cat(qkv[1:])  # [K; V]
        out[q + "attention.dense.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "input_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "post_attention_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "mlp.dense_h_to_4h.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"],
                                                         sd[p + "mlp.up_proj.weight"]])  # [gate; up]
        out[q + "mlp.dense_4h_to_h.weight"] = sd[p + "mlp.down_proj.weight"]
    out["final_norm.weight"] = sd["model.norm.weight"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def gpt2_from_hf(hf) -> dict[str, torch.Tensor]:
    """Our full state dict from GPT2LMHeadModel (Conv1D stores (in, out): transpose)."""
    sd, out = hf.state_dict(), {}
    out["embedding.word_embeddings.weight"] = sd["transformer.wte.weight"]
    out["embedding.position_embeddings.weight"] = sd["transformer.wpe.weight"]
    names = {"ln_1": "input_norm", "ln_2": "post_attention_norm",
             "attn.c_attn": "attention.query_key_value",
             "attn.c_proj": "attention.dense", "mlp.c_fc": "mlp.dense_h_to_4h",
             "mlp.c_proj": "mlp.dense_4h_to_h"}
    for i in range(hf.config.n_layer):
        for theirs, ours in names.items():
            w = sd[f"transformer.h.{i}.{theirs}.weight"]
            out[f"layers.{i}.{ours}.weight"] = w if theirs.startswith("ln") else w.t()
            out[f"layers.{i}.{ours}.bias"] = sd[f"transformer.h.{i}.{theirs}.bias"]
    out["final_norm.weight"] = sd["transformer.ln_f.weight"]
    out["final_norm.bias"] = sd["transformer.ln_f.bias"]
    return out


def load_full(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full (unpadded) weights into this rank's shards: pad the vocab rows, then shard."""
    tp, rank = model.state.tp, model.state.tp_rank
    params = dict(model.named_parameters())
    missing = set(params) - set(full)
    assert not missing, f"no reference weight for {sorted(missing)}"
    with torch.no_grad():
        for name, p in params.items():
            w = full[name]
            if getattr(p, "tensor_model_parallel", False):
                rows = p.shape[0] * tp if p.partition_dim == 0 else w.shape[0]
                if rows > w.shape[0]:  # vocab padding: zero rows
                    w = torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])
                w = shard_weight(w, p.partition_dim, rank, tp, p.partition_stride)
            p.copy_(w)


def full_grads(model: torch.nn.Module, vocab_size: int = VOCAB) -> dict[str, torch.Tensor]:
    """Every parameter's gradient gathered over TP, vocab padding rows dropped."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if getattr(p, "tensor_model_parallel", False):
            g = gather_weight(g, p.partition_dim, model.state, p.partition_stride)
        if "word_embeddings" in name or "lm_head" in name:
            g = g[:vocab_size]
        out[name] = g
    return out


def reference_run(config: ModelConfig, hf_builder, from_hf, model_cls, ids: torch.Tensor,
                  labels: torch.Tensor) -> dict:
    """HF model + its logits, and our TP=1 model with the same weights after one backward."""
    hf = hf_builder(config)
    full = from_hf(hf)
    with torch.no_grad():
        hf_logits = hf(ids).logits
    model = model_cls(config)
    load_full(model, full)
    model(ids, labels).backward()
    return dict(config=config, hf=hf, full=full, ids=ids, labels=labels, hf_logits=hf_logits,
                model=model, grads=full_grads(model))


def context_parallel_run(model_cls, config: ModelConfig, full: dict[str, torch.Tensor], ids: torch.Tensor,
                         labels: torch.Tensor, tp: int, cp: int, cp_comm: str,
                         sequence_parallel: bool = False) -> tuple:
    """On a rank of tp·cp: our model with ``full``'s weights on this CP rank's zig-zag piece.

    Returns (logits of whole sequences, loss, full gradients). The gradients are averaged over the CP
    group, as the engine's data-parallel averaging over dp·cp does.
    """
    import torch.distributed as dist
    from minimegatron.mpu import initialize_model_parallel
    from minimegatron.mpu.context_parallel import gather_from_context_parallel, split_for_context_parallel

    state = initialize_model_parallel(tp, sequence_parallel=sequence_parallel, context_parallel_size=cp,
                                      cp_comm=cp_comm)
    model = model_cls(config, state)
    load_full(model, full)
    local_ids, local_labels = (split_for_context_parallel(t, state) for t in (ids, labels))
    loss = model(local_ids, local_labels)
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=state.cp_group)
        p.grad /= cp
    with torch.no_grad():
        logits = gather_from_context_parallel(model(local_ids), state)  # (b, s, V)
    return logits, loss.detach(), full_grads(model)
