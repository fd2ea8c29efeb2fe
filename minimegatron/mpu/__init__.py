"""Tensor-model-parallel core, with Megatron's names: groups, mappings, parallel layers, cross-entropy."""
from minimegatron.mpu.state import (ParallelState, destroy_model_parallel, get_parallel_state,
                                    initialize_model_parallel)

__all__ = ["ParallelState", "initialize_model_parallel", "get_parallel_state", "destroy_model_parallel"]
