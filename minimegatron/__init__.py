"""minimegatron: Megatron-style model parallelism you can read, run on a laptop, and trust.

``import minimegatron`` imports torch only; DeepSpeed, transformers and sentencepiece are imported by
the modules that use them. It sets ``DS_ACCELERATOR`` (if unset) to the device ``device.py`` chose, so
that DeepSpeed, imported later, runs on the same one.
"""
from minimegatron import device
from minimegatron.config import ModelConfig, ParallelConfig
from minimegatron.gpt import gpt_config
from minimegatron.launch import LaunchTimeout, RankError, launch
from minimegatron.llama import llama_config

device.align_deepspeed()  # DeepSpeed, once imported, uses the device chosen in device.py (no guessing)

__version__ = "0.1.0"
__all__ = ["launch", "RankError", "LaunchTimeout", "ModelConfig", "ParallelConfig", "gpt_config",
           "llama_config", "__version__"]
