"""Tiny Hugging Face reference models for the checkpoint and generation tests.

Random weights, built locally: nothing is downloaded. Imported as ``tests.checkpoint.hf_models``.
"""
from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm gains around 1, biases non-zero), so each one's mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(noise + (1.0 if ("ln" in name or "norm" in name) and name.endswith("weight") else 0))
    return model.eval()


def hf_gpt2(vocab: int = 100, layers: int = 2, seed: int = 0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = dict(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=layers, n_head=4, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
               layer_norm_epsilon=1e-5)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomize_(GPT2LMHeadModel(GPT2Config(**cfg)), seed)


def hf_llama(kv_heads: int = 4, vocab: int = 100, layers: int = 2, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
               rope_theta=500.0, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(LlamaConfig(**cfg)), seed)


def token_ids(vocab: int = 100, batch: int = 2, seq: int = 11, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_mixtral(kv_heads: int = 2, vocab: int = 100, layers: int = 2, experts: int = 4, top_k: int = 2,
               seed: int = 0, **kw):
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
               num_local_experts=experts, num_experts_per_tok=top_k, rope_theta=500.0,
               rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomize_(MixtralForCausalLM(MixtralConfig(**cfg)), seed)
