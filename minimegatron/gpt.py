"""GPTModel: GPT-2 (Radford et al. 2019) — the LanguageModel with GPT-2's porting points.

``gpt_config`` sets every porting point (``minimegatron.config.PORTING_POINTS``) to its GPT-2 value;
llama.py is this file with LLaMA's values: ``diff minimegatron/gpt.py minimegatron/llama.py`` is the
porting list. Switch one field to study it alone, ``GPTModel(gpt_config(norm="rmsnorm"))``;
``model.changes`` lists the fields that differ from GPT-2. Every layer lives in
:class:`~minimegatron.layers.language_model.LanguageModel`; Hugging Face's ``GPT2LMHeadModel``
converts both ways (``minimegatron.checkpoint.hf``, which maps every weight name).
"""
from __future__ import annotations

from typing import Any

from minimegatron.config import ModelConfig, flavour_changes
from minimegatron.layers.attention import KVCache
from minimegatron.layers.language_model import LanguageModel, count_parameters
from minimegatron.mpu.state import ParallelState

__all__ = ["GPTModel", "gpt_config", "KVCache", "count_parameters"]


def gpt_config(**overrides: Any) -> ModelConfig:
    """GPT-2: its value of every porting point; ``overrides`` set the sizes or switch single fields."""
    return ModelConfig(**{
        "name": "gpt",
        "norm": "layernorm",                # (x - mean)/sqrt(var + eps)·γ + β
        "activation": "gelu",               # GeLU, tanh approximation (Hugging Face's "gelu_new")
        "position_embedding": "learned",    # a (max_seq_len, h) table added to the token embeddings
        "bias": True,                       # in every linear layer and norm
        "tie_embeddings": True,             # the LM head reuses the word embeddings (LanguageModel.forward)
        "ffn_hidden_size": None,            # None: 4·h
        "final_norm": True,                 # a norm before the LM head
        "num_kv_heads": None,               # None: one kv head per query head (MHA)
        **overrides})


class GPTModel(LanguageModel):
    """The GPT-2 flavoured LanguageModel; ``config=None`` is ``gpt_config()``."""

    def __init__(self, config: ModelConfig | None = None, state: ParallelState | None = None,
                 recompute: str = "none", init_seed: int | None = None) -> None:
        config = gpt_config() if config is None else config
        super().__init__(config, state, recompute, init_seed)
        self.changes = flavour_changes(config, gpt_config)  # {} for GPT-2 itself

    def extra_repr(self) -> str:
        return f"GPT-2 with changes {self.changes}, " + super().extra_repr()
