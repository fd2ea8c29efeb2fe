"""Tensor-model-parallel core, with Megatron's names: groups, mappings, parallel layers, cross-entropy."""
from minimegatron.mpu.state import (ParallelState, destroy_model_parallel, get_parallel_state,
                                    initialize_model_parallel)
from minimegatron.mpu.mappings import (allreduce_sequence_parallel_gradients,
                                       copy_to_tensor_model_parallel_region,
                                       gather_from_sequence_parallel_region,
                                       gather_from_tensor_model_parallel_region,
                                       reduce_from_tensor_model_parallel_region,
                                       reduce_scatter_to_sequence_parallel_region,
                                       scatter_to_sequence_parallel_region,
                                       scatter_to_tensor_model_parallel_region)
from minimegatron.mpu.layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                     VocabParallelEmbedding, gather_weight, shard_weight)
from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from minimegatron.mpu.random import RNGStatesTracker, get_rng_tracker, model_parallel_seed

__all__ = ["ParallelState", "initialize_model_parallel", "get_parallel_state", "destroy_model_parallel",
           "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
           "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
           "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
           "reduce_scatter_to_sequence_parallel_region", "allreduce_sequence_parallel_gradients",
           "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "ParallelLMHead",
           "shard_weight", "gather_weight", "vocab_parallel_cross_entropy",
           "RNGStatesTracker", "get_rng_tracker", "model_parallel_seed"]
