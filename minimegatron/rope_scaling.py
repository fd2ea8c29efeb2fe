"""RopeScaling: how RoPE's frequencies are stretched for contexts longer than pre-training's.

A ModelConfig field (``ModelConfig.rope_scaling``, ``None`` = plain RoPE). The math that uses it,
``θ_i -> θ'_i``, lives with the rotation in :mod:`minimegatron.layers.positions`
(:func:`~minimegatron.layers.positions.rope_inv_freq`). Two kinds, those of Hugging Face's
``rope_type`` that change only the frequencies (no attention scaling, no length-dependent state):

* ``"linear"`` (position interpolation, Chen et al. 2023): every frequency divided by ``factor``.
* ``"llama3"`` (every Llama-3.1/3.2 checkpoint): low frequencies divided by ``factor``, high ones
  kept, a smooth blend in between, set by ``low_freq_factor``, ``high_freq_factor`` and
  ``original_max_position_embeddings`` (the pre-training context).

``dynamic`` NTK recomputes the frequencies as the sequence grows (state that a KV cache would have
to track) and ``yarn``/``longrope`` also rescale the attention logits: they are refused by name.
Frozen: a config's scaling is a value, compared and hashed like one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["RopeScaling", "ROPE_SCALING_TYPES"]

ROPE_SCALING_TYPES = ("linear", "llama3")


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True, repr=False)
class RopeScaling:
    """``rope_type`` ∈ {"linear", "llama3"}; ``factor`` ≥ 1; the three llama3 fields only for llama3.

    Llama-3.1's values: ``RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)``.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"RopeScaling.rope_type={self.rope_type!r} is not implemented: use one of "
                             f"{ROPE_SCALING_TYPES} ('dynamic' and 'yarn' are not supported)")
        if not (_positive(self.factor) and self.factor >= 1):
            raise ValueError(f"RopeScaling.factor={self.factor!r} must be a number >= 1 (how many times "
                             "longer than pre-training the context may be; Llama-3.1 uses 8)")
        llama3 = (self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings)
        if self.rope_type == "linear":
            if any(v is not None for v in llama3):
                raise ValueError("RopeScaling('linear') takes only factor: low_freq_factor, "
                                 "high_freq_factor and original_max_position_embeddings are llama3's")
            return
        lo, hi, ctx = llama3
        if not (_positive(lo) and _positive(hi) and hi > lo):
            raise ValueError(f"RopeScaling('llama3') needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{lo!r} and {hi!r} (Llama-3.1 uses 1 and 4)")
        if not (isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0):
            raise ValueError(f"RopeScaling('llama3') needs original_max_position_embeddings, the "
                             f"pre-training context, as a positive int, got {ctx!r} (Llama-3.1: 8192)")

    def __repr__(self) -> str:
        """Positional and short, ``RopeScaling('llama3', 8.0, 1.0, 4.0, 8192)``: fits a printed config
        line, and eval gives it back."""
        values = [self.rope_type, self.factor, self.low_freq_factor, self.high_freq_factor,
                  self.original_max_position_embeddings]
        return f"RopeScaling({', '.join(repr(v) for v in values if v is not None)})"

    @classmethod
    def coerce(cls, value: "RopeScaling | dict[str, Any] | None") -> "RopeScaling | None":
        """``None``, a RopeScaling, or its dict (from ``ModelConfig.to_dict`` / a config.json)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = set(cls.__dataclass_fields__)
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown RopeScaling fields {unknown}: expected some of {sorted(known)}")
            return cls(**value)
        raise TypeError(f"ModelConfig.rope_scaling must be a RopeScaling, its dict or None, got "
                        f"{type(value).__name__}")
