"""Checkpoints (safetensors + JSON, any TP size in, any TP size out) and Hugging Face conversion.

    save_checkpoint(model, "ckpt", step=100)        # every rank calls it; rank 0 writes full weights
    config = load_config("ckpt")                    # rebuild the model from the checkpoint's config...
    load_checkpoint(GPTModel(config, state), "ckpt")  # ...at any TP size: each rank keeps its shard

    model = from_hf(GPT2LMHeadModel(...), state=state)   # HF -> minimegatron, split for state.tp
    hf = to_hf(model, save_directory="hf_out")           # minimegatron -> HF (save_pretrained)

    save_megatron(model, "meg", tp=2, pp=2)               # minimegatron -> Megatron-LM's layout
    config, full = load_megatron("meg")                   # Megatron-LM (any TP/PP) -> full state dict

Modules: :mod:`.reshape` (shards <-> full tensors), :mod:`.files` (the files of a checkpoint, read
safely), :mod:`.io` (atomic save, load), :mod:`.hf_config` and :mod:`.hf` (Hugging Face),
:mod:`.megatron_layout` and :mod:`.megatron` (Megatron-LM's ``mp_rank_*/model_optim_rng.pt``).
``transformers`` is imported only when converting.
"""
from minimegatron.checkpoint.files import checkpoint_dir, load_config
from minimegatron.checkpoint.hf import from_hf, load_hf_directory, state_dict_from_hf, state_dict_to_hf, to_hf
from minimegatron.checkpoint.hf_config import UnsupportedHFConfig, config_from_hf, config_to_hf
from minimegatron.checkpoint.io import load_checkpoint, load_model, read_checkpoint, save_checkpoint
from minimegatron.checkpoint.megatron import load_megatron, save_megatron
from minimegatron.checkpoint.reshape import (CheckpointError, describe_shards, expected_full_shapes,
                                             full_state_dict, load_full_state_dict)

__all__ = ["save_checkpoint", "load_checkpoint", "load_config", "load_model", "read_checkpoint",
           "checkpoint_dir", "save_megatron", "load_megatron",
           "from_hf", "to_hf", "state_dict_from_hf", "state_dict_to_hf", "load_hf_directory",
           "config_from_hf", "config_to_hf", "UnsupportedHFConfig", "CheckpointError",
           "full_state_dict", "load_full_state_dict", "expected_full_shapes", "describe_shards"]
