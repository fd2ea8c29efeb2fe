"""The trainer run the trainer tests compare against, written once.

    runs = Runs(TINY)                 # the file's tiny defaults
    runs(tp=2, zero_stage=1)          # a fresh run with these overrides (History of rank 0)
    runs.once(model="gpt")            # the same, computed once per distinct overrides for the module:
                                      # the single-rank reference several tests compare with
"""
from __future__ import annotations

from typing import Any, Callable

from minimegatron.training import History, TrainConfig, train


class Runs:
    """``train(TrainConfig(**{**base, **overrides}))``, and a cache of the ones used as references."""

    def __init__(self, base: dict[str, Any], check: Callable[[History], None] | None = None) -> None:
        self.base, self.check, self._cache = dict(base), check, {}

    def __call__(self, **overrides: Any) -> History:
        return train(TrainConfig(**{**self.base, **overrides}))

    def once(self, **overrides: Any) -> History:
        """The run for these overrides, computed on first use (``check`` sees it then)."""
        key = tuple(sorted(overrides.items()))
        if key not in self._cache:
            self._cache[key] = self(**overrides)
            if self.check is not None:
                self.check(self._cache[key])
        return self._cache[key]
