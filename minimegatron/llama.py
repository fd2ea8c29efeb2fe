"""LLaMAModel: LLaMA (Touvron et al. 2023) — the LanguageModel with LLaMA's porting points.

``llama_config`` sets every porting point (``minimegatron.config.PORTING_POINTS``) to its LLaMA value;
gpt.py is this file with GPT-2's values: ``diff minimegatron/gpt.py minimegatron/llama.py`` is the
porting list. Switch one field to study it alone, ``LLaMAModel(llama_config(norm="layernorm"))``;
``model.changes`` lists the fields that differ from LLaMA. Every layer lives in
:class:`~minimegatron.layers.language_model.LanguageModel`; Hugging Face's ``LlamaForCausalLM``
converts both ways (``minimegatron.checkpoint.hf``, which maps every weight name).

The Llama-3 family is this preset with sizes and three fields that default to "off" in both presets
(so they are not porting points): Llama-3.1 8B is ``llama_config(hidden_size=4096, num_layers=32,
num_attention_heads=32, num_kv_heads=8, ffn_hidden_size=14336, rope_theta=500000,
rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), ...)``; Llama-3.2 ties the embeddings
(``tie_embeddings=True``); Qwen2-style attention biases are ``attention_bias=True``; a head width
other than hidden/heads is ``head_dim``.
"""
from __future__ import annotations

from typing import Any

from minimegatron.config import ModelConfig, flavour_changes
from minimegatron.layers.attention import KVCache
from minimegatron.layers.language_model import LanguageModel, count_parameters
from minimegatron.mpu.state import ParallelState

__all__ = ["LLaMAModel", "llama_config", "KVCache", "count_parameters"]


def llama_config(**overrides: Any) -> ModelConfig:
    """LLaMA: its value of every porting point; ``overrides`` set the sizes or switch single fields."""
    return ModelConfig(**{
        "name": "llama",
        "norm": "rmsnorm",                  # x/sqrt(mean(x²) + eps)·γ: no centring, no β
        "activation": "swiglu",             # SwiGLU: silu(x·W_gate) ⊙ (x·W_up), three matrices
        "position_embedding": "rope",       # rotary: q and k rotated by position, no weights
        "bias": False,                      # in no linear layer or norm
        "tie_embeddings": False,            # the LM head has its own (V, h) matrix (LanguageModel.forward)
        "ffn_hidden_size": None,            # None: 8/3·h rounded up to a multiple of multiple_of
        "final_norm": True,                 # a norm before the LM head
        "num_kv_heads": None,               # None: one kv head per query head (MHA)
        **overrides})


class LLaMAModel(LanguageModel):
    """The LLaMA flavoured LanguageModel; ``config=None`` is ``llama_config()``."""

    def __init__(self, config: ModelConfig | None = None, state: ParallelState | None = None,
                 recompute: str = "none", init_seed: int | None = None) -> None:
        config = llama_config() if config is None else config
        super().__init__(config, state, recompute, init_seed)
        self.changes = flavour_changes(config, llama_config)  # {} for LLaMA itself

    def extra_repr(self) -> str:
        return f"LLaMA with changes {self.changes}, " + super().extra_repr()
