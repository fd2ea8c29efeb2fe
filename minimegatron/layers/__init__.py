"""Building blocks shared by GPT and LLaMA: norms, activations, positions, attention, MLP (dense and MoE), transformer."""
from minimegatron.layers.activations import apply_activation, gelu, swiglu
from minimegatron.layers.attention import KVCache, ParallelAttention
from minimegatron.layers.language_model import (Embedding, LanguageModel, count_parameters,
                                                parameter_counts)
from minimegatron.layers.mlp import ParallelMLP
from minimegatron.layers.moe import LocalDispatcher, MoEMLP
from minimegatron.layers.norms import LayerNorm, RMSNorm, build_norm
from minimegatron.layers.positions import (LearnedPositionEmbedding, RotaryEmbedding, alibi_bias,
                                           alibi_slopes, apply_rotary, rotate_half)
from minimegatron.layers.router import TopKRouter
from minimegatron.layers.transformer import ParallelTransformer, ParallelTransformerLayer

__all__ = ["LayerNorm", "RMSNorm", "build_norm", "gelu", "swiglu", "apply_activation",
           "LearnedPositionEmbedding", "RotaryEmbedding", "apply_rotary", "rotate_half", "alibi_slopes",
           "alibi_bias", "KVCache", "ParallelAttention", "ParallelMLP", "MoEMLP",
           "TopKRouter", "LocalDispatcher", "ParallelTransformerLayer",
           "ParallelTransformer", "Embedding", "LanguageModel", "count_parameters", "parameter_counts"]
