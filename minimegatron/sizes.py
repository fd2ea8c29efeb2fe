"""Size arithmetic every layer shares: "is this an int", "does X split over tp", "the padded vocab".

These three facts are checked all over the package — a ModelConfig field, a TrainConfig flag, a
ColumnParallelLinear's output size, a tensor split along the sequence, the vocab rows of an embedding —
and each check must say the same thing in the same words. So each fact has one function here, at the
bottom of the import graph (nothing in ``minimegatron`` is imported by this file), and the callers
(``config``, ``mpu``, ``layers``, ``training``) import it:

    is_int(v)                      an int that is not a bool (``True`` is an int to Python, never a size)
    divide(n, d, what, ...)        n // d, or a ValueError "what=n is not divisible by tensor-parallel
                                   size d: <why>; <fix>"
    pad_vocab_size(V, m, tp)       V rounded up to a multiple of m·tp (Megatron's vocab padding)
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["is_int", "divide", "pad_vocab_size"]


def is_int(v: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a size to us)."""
    return isinstance(v, int) and not isinstance(v, bool)


def divide(numerator: int, denominator: int, what: str = "size", *, by: str | None = None,
           fix: str | None = None) -> int:
    """``numerator // denominator``, or a ValueError that names the sizes, why they must split and the fix.

    The message is ``"{what}={numerator} is not divisible by {by}: {fix}"``. ``by`` defaults to
    ``"tensor-parallel size {denominator}"`` (every caller splits over TP ranks; a strided split says
    ``"tensor-parallel size 2 × stride 3 = 6"``); ``fix`` defaults to the generic one — every rank
    must hold an equal slice, choose a multiple — and a caller that knows the better fix (whole heads,
    ``multiple_of``) passes it."""
    if numerator % denominator != 0:
        by = by or f"tensor-parallel size {denominator}"
        fix = fix or (f"every rank must hold an equal slice; choose {what} as a multiple of "
                      f"{denominator} (or a tensor-parallel size that divides {numerator})")
        raise ValueError(f"{what}={numerator} is not divisible by {by}: {fix}")
    return numerator // denominator


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Round the vocab up to a multiple of make_vocab_size_divisible_by·tp (Megatron's padding: every
    TP rank then holds an equal slice of rows, and the slice is a multiple of a GPU-friendly size)."""
    if make_vocab_size_divisible_by < 1:
        raise ValueError(f"make_vocab_size_divisible_by={make_vocab_size_divisible_by} must be >= 1")
    m = make_vocab_size_divisible_by * tp
    return m * math.ceil(vocab_size / m)
