"""Predict, then run: a notebook asks for a number before the cell that measures it.

    PREDICTION = None   # your answer: the bubble of 1F1B at p = 4, m = 4, as a fraction
    ...the experiment runs...
    check_prediction("1F1B's bubble at p = 4, m = 4", PREDICTION, measured, rel_tol=0.1,
                     why="(p − 1)/(m + p − 1) = 3/7: the fill and drain of 3 stages over 7 slots")

Left at ``None`` the check says what to predict and keeps the answer to itself (which is also what the
test suite sees); with a guess it prints the measured value and, when the guess is off, the reason. A
prediction is a question, not a grade: nothing raises.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["check_prediction", "verdict"]


def _close(guess: Any, actual: Any, rel_tol: float, abs_tol: float) -> bool:
    if isinstance(actual, (tuple, list)):
        return (isinstance(guess, (tuple, list)) and len(guess) == len(actual)
                and all(_close(g, a, rel_tol, abs_tol) for g, a in zip(guess, actual)))
    try:
        return math.isclose(float(guess), float(actual), rel_tol=rel_tol, abs_tol=abs_tol)
    except (TypeError, ValueError):
        return guess == actual


def verdict(question: str, guess: Any, actual: Any, *, rel_tol: float = 0.05, abs_tol: float = 0.0,
            why: str = "") -> str:
    """The verdict on a student's ``guess`` of the ``actual`` value the notebook measured.
    ``guess=None``: not predicted yet, and the answer is not shown."""
    if guess is None:
        return (f"? Predict first: {question}. Set your answer in the cell above and run both again "
                f"(the measured value is shown once you have).")
    if _close(guess, actual, rel_tol, abs_tol):
        return f"✓ {question}: you predicted {guess!r}, measured {actual!r}." + (f" {why}" if why else "")
    return f"✗ {question}: you predicted {guess!r}, but it is {actual!r}." + (f" Why: {why}" if why else "")


def check_prediction(question: str, guess: Any, actual: Any, *, rel_tol: float = 0.05,
                     abs_tol: float = 0.0, why: str = "") -> None:
    """Print :func:`verdict` (a notebook cell's last line: nothing else is echoed)."""
    print(verdict(question, guess, actual, rel_tol=rel_tol, abs_tol=abs_tol, why=why))
