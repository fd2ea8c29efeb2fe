"""Activation recomputation: keep a block's inputs, rerun the block in backward (Chen et al. 2016).

Korthikanti et al. 2022, §5: a block ``y = fn(x)`` normally keeps every intermediate tensor autograd
needs for backward. :func:`recompute` keeps only the inputs ``x``; backward runs ``fn(x)`` once more
to rebuild the intermediates, then differentiates it::

    forward:   y = fn(x)                 saved: x only           (no intermediates)
    backward:  y' = fn(x) again; ∂L/∂x = (∂y'/∂x)ᵀ·∂L/∂y         one extra forward of fn

The rerun must compute exactly the same ``y``, so every random draw inside ``fn`` must repeat:

* torch's default generator (dropout on the replicated residual stream): ``torch.utils.checkpoint``
  saves and restores it itself;
* the model-parallel generator of ``state.rng_tracker`` (dropout inside TP regions, e.g. on the
  attention probabilities, different per TP rank): saved here before the forward and swapped in for
  the rerun, then swapped back so the training run's stream moves on untouched.

Collectives inside ``fn`` (the TP all-reduces, SP gathers) run again in the rerun, in the same order
on every rank. The package uses it twice: ``"selective"`` recompute of the core attention
(``ParallelAttention(recompute_core=True)``) and ``"full"`` recompute of whole transformer layers.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint

from minimegatron.mpu.state import ParallelState

__all__ = ["recompute"]


def recompute(fn: Callable[..., Any], *args: Any, state: ParallelState) -> Any:
    """``fn(*args)``, keeping only ``args`` for backward and rerunning ``fn`` there.

    Non-reentrant ``torch.utils.checkpoint`` (default generator replayed) that also replays
    ``state.rng_tracker``, so recomputed dropout masks equal the original ones on every rank.
    """
    tracker = state.rng_tracker
    saved = tracker.get_states()  # the model-parallel streams as this forward found them

    @contextmanager
    def replay_tracker() -> Iterator[None]:
        current = tracker.get_states()
        tracker.set_states(saved)
        try:
            yield
        finally:
            tracker.set_states(current)

    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                             context_fn=lambda: (nullcontext(), replay_tracker()))
