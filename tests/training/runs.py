"""The trainer run the trainer tests compare against, written once.

    runs = Runs(TINY)                 # the file's tiny defaults
    runs(tp=2, zero_stage=1)          # a fresh run with these overrides (History of rank 0)
    runs.once(model="gpt")            # the same, computed once per distinct overrides for the module:
                                      # the single-rank reference several tests compare with
    Runs(TINY, require_clipping=True) # .once() also asserts that clipping acted at every step
                                      # (every ‖g‖ above clip_grad), so a wrong norm changes the losses
"""
from __future__ import annotations

from typing import Any

from minimegatron.training import History, TrainConfig, train


class Runs:
    """``train(TrainConfig(**{**base, **overrides}))``, and a cache of the ones used as references."""

    def __init__(self, base: dict[str, Any], require_clipping: bool = False) -> None:
        self.base, self.require_clipping, self._cache = dict(base), require_clipping, {}

    def __call__(self, **overrides: Any) -> History:
        return train(TrainConfig(**{**self.base, **overrides}))

    def once(self, **overrides: Any) -> History:
        """The run for these overrides, computed on first use."""
        key = tuple(sorted(overrides.items()))
        if key not in self._cache:
            history = self._cache[key] = self(**overrides)
            clip = {**self.base, **overrides}.get("clip_grad", 0.0)
            if self.require_clipping:
                assert clip > 0 and all(n > clip for n in history.grad_norm), (clip, history.grad_norm)
        return self._cache[key]
