"""Tensor-model-parallel core, with Megatron's names: groups, mappings, parallel layers, cross-entropy."""
from minimegatron.mpu.state import ParallelState, initialize_model_parallel
from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region,
                                       gather_from_sequence_parallel_region,
                                       gather_from_tensor_model_parallel_region,
                                       reduce_from_tensor_model_parallel_region,
                                       reduce_scatter_to_sequence_parallel_region,
                                       scatter_to_sequence_parallel_region,
                                       scatter_to_tensor_model_parallel_region)
from minimegatron.mpu.layers import (ColumnParallelLinear, ReplicatedLinear, RowParallelLinear,
                                     gather_weight, shard_weight)
from minimegatron.mpu.embedding import ParallelLMHead, VocabParallelEmbedding, validate_token_ids
from minimegatron.mpu.cross_entropy import validate_targets, vocab_parallel_cross_entropy
from minimegatron.mpu.random import RNGStatesTracker, model_parallel_rng, model_parallel_seed
from minimegatron.mpu.expert_parallel import AllToAllDispatcher, all_to_all

__all__ = ["ParallelState", "initialize_model_parallel",
           "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
           "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
           "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
           "reduce_scatter_to_sequence_parallel_region",
           "ColumnParallelLinear", "RowParallelLinear", "ReplicatedLinear", "VocabParallelEmbedding",
           "ParallelLMHead", "shard_weight", "gather_weight", "vocab_parallel_cross_entropy",
           "validate_token_ids", "validate_targets",
           "RNGStatesTracker", "model_parallel_seed", "model_parallel_rng"]
__all__ += ["AllToAllDispatcher", "all_to_all"]
