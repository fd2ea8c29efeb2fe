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

Device-agnostic: the tracker swaps the default generator of its device type — ``torch.get_rng_state``
on the CPU, ``torch.get_device_module(kind)`` (the cuda or hpu module, without naming it) elsewhere.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from minimegatron.mpu.state import ParallelState

MODEL_PARALLEL_RNG = "model-parallel-rng"
MODEL_PARALLEL_SEED_OFFSET = 2718  # Megatron's offset between the data- and model-parallel seeds

__all__ = ["RNGStatesTracker", "get_rng_tracker", "model_parallel_seed", "MODEL_PARALLEL_RNG"]


def _rng_functions(device_type: str) -> tuple[Callable, Callable, Callable]:
    """(get_state, set_state, manual_seed) of the default generator of one device type only."""
    if device_type == "cpu":
        return torch.get_rng_state, torch.set_rng_state, torch.default_generator.manual_seed
    module = torch.get_device_module(device_type)
    return module.get_rng_state, module.set_rng_state, module.manual_seed


class RNGStatesTracker:
    """Named generator states that can be swapped in around a block of code."""

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def add(self, name: str, seed: int) -> None:
        """Register a generator ``name`` seeded ``seed`` (the default generator is left as it was)."""
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} is already used by this tracker; two streams with one "
                             "seed would give identical masks")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists; call reset() first to re-seed")
        get_state, set_state, manual_seed = _rng_functions(self.device_type)
        original = get_state()
        manual_seed(seed)
        self.states_[name] = get_state()
        set_state(original)
        self.seeds_.add(seed)

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every named state (save it before a forward you will recompute)."""
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with generator ``name``; its advanced state is kept for next time, and the
        default generator is restored exactly as it was."""
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not registered (have {sorted(self.states_)}); "
                           "call model_parallel_seed(seed, state) on every rank first")
        get_state, set_state, _ = _rng_functions(self.device_type)
        original = get_state()
        set_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = get_state()
            set_state(original)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The tracker seeded last by :func:`model_parallel_seed` in this process (convenience accessor)."""
    return _TRACKER


def model_parallel_seed(seed: int, state: ParallelState, device_type: str | None = None,
                        tracker: RNGStatesTracker | None = None) -> RNGStatesTracker:
    """Seed both streams on this rank; call it on every rank after ``initialize_model_parallel``.

    * default generator (all devices): ``seed`` — the same on all TP ranks (dropout outside TP regions);
    * the tracker's ``"model-parallel-rng"``: ``seed + 2718 + tp_rank`` — different per TP rank.

    ``device_type`` (default: the device minimegatron runs on) is where dropout draws its masks.
    Returns the tracker (the process-wide one unless ``tracker`` is given).
    """
    if device_type is None:
        from minimegatron.device import device_type as current_device_type
        device_type = current_device_type()
    tracker = _TRACKER if tracker is None else tracker
    torch.manual_seed(seed)
    tracker.reset()
    tracker.device_type = device_type
    tracker.add(MODEL_PARALLEL_RNG, seed + MODEL_PARALLEL_SEED_OFFSET + state.tp_rank)
    return tracker
