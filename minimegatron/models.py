"""The model registry: each model family, its class, its pipeline class — the one list of them.

    family    MODEL_CLASS (the checkpoint's ``model_class``)    PIPE_CLASS (pp > 1)
    "gpt"     GPTModel      (minimegatron.gpt)                   GPTModelPipe   (minimegatron.pipe)
    "llama"   LLaMAModel    (minimegatron.llama)                 LLaMAModelPipe (minimegatron.pipe)

The names are plain strings, so the command line (``--model``), the TrainConfig checks and a
checkpoint's metadata can read them without building anything; :func:`model_class` turns a family
into its constructor (importing the model on first use: the registry sits above ``gpt.py``,
``llama.py`` and ``pipe.py`` in the import graph, so nothing they import may import it back).
"""
from __future__ import annotations

from torch import nn

__all__ = ["MODELS", "MODEL_CLASS", "PIPE_CLASS", "family_of", "model_class"]

MODELS = ("gpt", "llama")
MODEL_CLASS = {"gpt": "GPTModel", "llama": "LLaMAModel"}  # the plain model each family trains
PIPE_CLASS = {"gpt": "GPTModelPipe", "llama": "LLaMAModelPipe"}  # its DeepSpeed pipeline twin


def family_of(class_name: str | None) -> str | None:
    """``"GPTModel"`` → ``"gpt"`` (a checkpoint's ``model_class`` → its family); None if unknown."""
    return {name: family for family, name in MODEL_CLASS.items()}.get(class_name)


def model_class(family: str, pipeline: bool = False) -> type[nn.Module]:
    """The constructor of ``family``: GPTModel / LLaMAModel, or with ``pipeline`` their Pipe twins
    (which import DeepSpeed). A ValueError names the families for anything else."""
    if family not in MODELS:
        raise ValueError(f"model family {family!r}: choose one of {MODELS}")
    if pipeline:
        from minimegatron import pipe
        return getattr(pipe, PIPE_CLASS[family])
    if family == "gpt":
        from minimegatron.gpt import GPTModel
        return GPTModel
    from minimegatron.llama import LLaMAModel
    return LLaMAModel
