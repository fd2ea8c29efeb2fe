"""GPTModel: GPT-2 (Radford et al. 2019) on tensor-parallel ranks.

GPT-2 is a pre-norm decoder: LayerNorm, GeLU (tanh approximation), learned absolute positions, biases
in every linear layer and norm, the LM head tied to the word embeddings, a ``4h`` MLP, a final
LayerNorm (``ln_f``). All of it lives in :class:`~minimegatron.layers.language_model.LanguageModel`;
this class only picks the defaults (:func:`~minimegatron.config.gpt_config`). Switch any field to its
LLaMA value to study that one change: ``GPTModel(gpt_config(norm="rmsnorm"))``; ``model.changes``
lists the switches that differ from GPT-2.

Hugging Face ``GPT2LMHeadModel`` maps onto it as ``wte -> embedding.word_embeddings``,
``wpe -> embedding.position_embeddings``, ``h.{i}.ln_1/ln_2 -> layers.{i}.input_norm/post_attention_norm``,
``attn.c_attn -> attention.query_key_value`` ([Q; K; V]), ``attn.c_proj -> attention.dense``,
``mlp.c_fc/c_proj -> mlp.dense_h_to_4h/dense_4h_to_h``, ``ln_f -> final_norm`` (Conv1D weights are
stored (in, out): transpose them).
"""
from __future__ import annotations

from minimegatron.config import ModelConfig, gpt_config
from minimegatron.layers.attention import KVCache
from minimegatron.layers.language_model import LanguageModel, count_parameters, flavour_changes
from minimegatron.mpu.state import ParallelState

__all__ = ["GPTModel", "KVCache", "count_parameters", "gpt_config"]


class GPTModel(LanguageModel):
    """GPT-2 flavoured LanguageModel; ``config=None`` is ``gpt_config()``."""

    def __init__(self, config: ModelConfig | None = None, state: ParallelState | None = None,
                 recompute: str = "none") -> None:
        config = gpt_config() if config is None else config
        if config.name == "llama":
            raise ValueError("GPTModel got a config named 'llama' (llama_config()): build it with "
                             "minimegatron.llama.LLaMAModel, or switch single fields with gpt_config(...)")
        super().__init__(config, state, recompute)
        self.changes = flavour_changes(config, gpt_config)  # {} for plain GPT-2

    def extra_repr(self) -> str:
        return f"GPT-2 with LLaMA switches {self.changes}, " + super().extra_repr()
