"""RNGStatesTracker: named generator states swapped in around a block (``with tracker.fork(): ...``).

The mechanism under :mod:`minimegatron.mpu.random` (why TP dropout needs it is told there). It sits
below :mod:`minimegatron.mpu.state` — every ParallelState owns a tracker — and knows nothing of ranks
or groups: a dict name → saved generator state, and ``fork`` swaps one in and the default one back.

Device-agnostic: the tracker swaps the default generator of its device type — ``torch.get_rng_state``
on the CPU, ``torch.get_device_module(kind)`` (the cuda or hpu module, without naming it) elsewhere.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"  # the name of the per-TP-rank stream that fork() swaps in

__all__ = ["RNGStatesTracker", "MODEL_PARALLEL_RNG"]


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
