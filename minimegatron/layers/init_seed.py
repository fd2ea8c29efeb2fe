"""Weights by layer index: the same model whatever the layout.

A language model is a list of layers, numbered as the pipeline numbers them (``minimegatron.pipe``)::

    index   0            1 … L                  L+1           L+2
    layer   embedding    transformer layers     final norm    LM head

Layer ``i`` draws its weights from torch's default generator seeded ``seed + i``, where the model's
``seed`` is one draw from a generator seeded ``init_seed`` — or, with ``init_seed=None``, one draw from
torch's default generator as it stands. After the layer is built the default generator is put back, so
a layer's weights depend on ``(init_seed, i)`` only, never on which layers were built before it::

    torch.manual_seed(s); GPTModel(config)
    == GPTModel(config, init_seed=s) == GPTModelPipe(config, state, init_seed=s)  (stage by stage)

A pipeline stage builds only its own layers and still holds exactly the unsplit model's weights, for
any pp, tp, dp. (Tensor parallelism: every layer draws its full master weight and keeps its shard,
``mpu/layers.py``, so a TP=k layer holds the shards of the TP=1 one.) Two models built one after the
other without ``init_seed`` differ: each takes its own draw.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["model_seed", "init_rng"]


def model_seed(init_seed: int | None = None) -> int:
    """The model's seed: one draw from ``torch.Generator().manual_seed(init_seed)``, or from torch's
    default generator when ``init_seed`` is None (equal right after ``torch.manual_seed(init_seed)``)."""
    generator = None if init_seed is None else torch.Generator().manual_seed(init_seed)
    return int(torch.randint(2**62, (), generator=generator))


@contextmanager
def init_rng(seed: int, index: int) -> Iterator[None]:
    """Run the block with torch's default (CPU) generator seeded ``seed + index``, then restore it.

    The weights are drawn on the CPU (``mpu/layers.py`` draws every master weight there), so the CPU
    generator is the only one to seed; device generators (dropout) are left alone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed + index)
        yield
