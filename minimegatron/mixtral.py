"""Mixtral (Jiang et al. 2024): LLaMA with one more porting point, a mixture-of-experts MLP.

``mixtral_config`` is :func:`~minimegatron.llama.llama_config` with the MoE fields
(``minimegatron.config.MOE_PORTING_POINTS``) set: 8 SwiGLU experts per layer, 2 per token, every
layer MoE, no token dropped, the k = 2 weights renormalised (``layers/router.py``). The model is
``LLaMAModel`` itself — the MLP it builds is :class:`~minimegatron.layers.moe.MoEMLP` where
``config.is_moe_layer(i)`` — so ``LLaMAModel(mixtral_config()).changes == {"num_experts": 8}``.
Hugging Face's ``MixtralForCausalLM`` converts both ways (``minimegatron.checkpoint.hf``).
"""
from __future__ import annotations

from typing import Any

from minimegatron.config import ModelConfig
from minimegatron.llama import llama_config

__all__ = ["mixtral_config"]


def mixtral_config(**overrides: Any) -> ModelConfig:
    """Mixtral: LLaMA's porting points plus the MoE MLP; ``overrides`` set sizes or single fields."""
    return llama_config(**{
        "name": "mixtral",
        "num_experts": 8,                   # eight SwiGLU experts in every MoE layer
        "moe_top_k": 2,                     # each token uses two, weights renormalised to sum 1
        "moe_every": 1,                     # every layer is MoE
        "moe_capacity_factor": None,        # no token dropped
        "moe_aux_loss_coeff": 0.02,         # load-balancing loss (Mixtral's training used one)
        **overrides})
