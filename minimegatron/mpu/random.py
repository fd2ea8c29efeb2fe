"""Dropout randomness under tensor parallelism: the same mask where tensors are replicated, different
masks where they are split.

Two kinds of dropout live in a Megatron layer (Shoeybi et al. 2019, §3):

* **outside** TP regions (after the attention block and the MLP, on the replicated (s, b, h)
  residual stream): every TP rank holds the same tensor, so every rank must draw the *same* mask —
  otherwise the replicas silently diverge. They use torch's default generator, seeded ``seed`` on
  every rank.
* **inside** TP regions (attention probabilities, one slice of heads per rank): each rank holds a
  different slice of one big tensor, so the masks must be *different* pieces of one random draw —
  identical masks would correlate the heads. They run under ``tracker.fork()``, which swaps in a
  generator seeded ``seed + 2718 + tp_rank`` and swaps the default one back afterwards, untouched.

A tracker is a dict name → saved generator state. ``fork`` is a context manager, so the model code
reads ``with tracker.fork(): probs = dropout(probs)``. ``get_states`` / ``set_states`` let activation
recomputation replay the exact same masks.

The tracker itself is :mod:`.rng_tracker` (below :mod:`.state`, whose every ParallelState owns one).
Nothing here is global: every :class:`~minimegatron.mpu.state.ParallelState` owns its tracker
(``state.rng_tracker``), :func:`model_parallel_seed` seeds it, and layers reach it through the state
they already receive — :func:`model_parallel_rng` for dropout, ``layers/recompute.py`` for the replay.

Device-agnostic: the tracker (:mod:`.rng_tracker`) swaps the default generator of its device type.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from minimegatron.mpu.rng_tracker import MODEL_PARALLEL_RNG, RNGStatesTracker
from minimegatron.mpu.state import ParallelState

MODEL_PARALLEL_SEED_OFFSET = 2718  # Megatron's offset between the data- and model-parallel seeds

__all__ = ["RNGStatesTracker", "model_parallel_seed", "model_parallel_rng", "MODEL_PARALLEL_RNG"]


def model_parallel_seed(seed: int, state: ParallelState, device_type: str | None = None,
                        tracker: RNGStatesTracker | None = None) -> RNGStatesTracker:
    """Seed both streams on this rank; call it on every rank after ``initialize_model_parallel``.

    * default generator (all devices): ``seed`` — the same on all TP ranks (dropout outside TP regions);
    * the tracker's ``"model-parallel-rng"``: ``seed + 2718 + tp_rank`` — different per TP rank.

    ``device_type`` (default: the device minimegatron runs on) is where dropout draws its masks.
    Returns the tracker: ``state.rng_tracker`` unless another ``tracker`` is given.
    """
    if device_type is None:
        from minimegatron.device import device_type as current_device_type
        device_type = current_device_type()
    tracker = state.rng_tracker if tracker is None else tracker
    torch.manual_seed(seed)
    tracker.reset()
    tracker.device_type = device_type
    tracker.add(MODEL_PARALLEL_RNG, seed + MODEL_PARALLEL_SEED_OFFSET + state.tp_rank)
    return tracker


def model_parallel_rng(state: ParallelState) -> AbstractContextManager:
    """Context for dropout inside a TP region: ``state.rng_tracker``'s per-rank stream (nothing at tp = 1)."""
    return state.rng_tracker.fork() if state.tp > 1 else nullcontext()
