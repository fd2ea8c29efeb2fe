"""LLaMAModel: LLaMA (Touvron et al. 2023) on tensor-parallel ranks.

LLaMA is GPT with seven changes, each a ModelConfig field: RMSNorm for LayerNorm, SwiGLU for GeLU,
rotary positions (``rope_theta``) for the learned table, no biases, input and output embeddings
untied, an RMSNorm before the LM head, and an ``≈ 8/3·h`` MLP (rounded up to ``multiple_of``);
``num_kv_heads < heads`` gives grouped-query attention (LLaMA-2 70B, LLaMA-3). All of it lives in
:class:`~minimegatron.layers.language_model.LanguageModel`; this class only picks the defaults
(:func:`~minimegatron.config.llama_config`); ``model.changes`` lists fields switched back to GPT-2's.

Hugging Face ``LlamaForCausalLM`` maps onto it as ``embed_tokens -> embedding.word_embeddings``,
``input_layernorm/post_attention_layernorm -> input_norm/post_attention_norm``,
``[q_proj; k_proj; v_proj] -> attention.query_key_value`` (MHA) or ``q_proj -> attention.query`` and
``[k_proj; v_proj] -> attention.key_value`` (GQA), ``o_proj -> attention.dense``,
``[gate_proj; up_proj] -> mlp.dense_h_to_4h``, ``down_proj -> mlp.dense_4h_to_h``,
``norm -> final_norm``, ``lm_head -> lm_head``. RoPE uses HF's rotate_half layout: no permutation.
"""
from __future__ import annotations

from minimegatron.config import ModelConfig, llama_config
from minimegatron.layers.attention import KVCache
from minimegatron.layers.language_model import LanguageModel, count_parameters, flavour_changes
from minimegatron.mpu.state import ParallelState

__all__ = ["LLaMAModel", "KVCache", "count_parameters", "llama_config"]


class LLaMAModel(LanguageModel):
    """LLaMA flavoured LanguageModel; ``config=None`` is ``llama_config()``."""

    def __init__(self, config: ModelConfig | None = None, state: ParallelState | None = None,
                 recompute: str = "none") -> None:
        config = llama_config() if config is None else config
        if config.name == "gpt":
            raise ValueError("LLaMAModel got a config named 'gpt' (gpt_config()): build it with "
                             "minimegatron.gpt.GPTModel, or switch single fields with llama_config(...)")
        super().__init__(config, state, recompute)
        self.changes = flavour_changes(config, llama_config)  # {} for plain LLaMA

    def extra_repr(self) -> str:
        return f"LLaMA with GPT-2 switches {self.changes}, " + super().extra_repr()
