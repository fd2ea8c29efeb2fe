"""In a student edition (``exercises/student_edition.py``), each ``grade_*`` forwards to the instructor's
grader package, ``minimegatron_grader``, which is not part of the student's copy."""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

from exercises.grading import GradingError

GRADER_PACKAGE = "minimegatron_grader"

__all__ = ["instructor_grader", "GRADER_PACKAGE"]


def instructor_grader(module: str, name: str) -> Callable[..., str]:
    """``minimegatron_grader.<module>.<name>``, imported when first called; its GradingError is raised as
    this copy's ``exercises.grading.GradingError`` (what the notebooks catch)."""

    @functools.wraps(_placeholder)
    def grade(*args: Any, **kwargs: Any) -> str:
        try:
            real = getattr(importlib.import_module(f"{GRADER_PACKAGE}.{module}"), name)
        except ImportError:
            raise GradingError(f"this is a student edition: its graders are in your instructor's "
                               f"'{GRADER_PACKAGE}' package, which is not installed here — pip install the "
                               f"grader folder or wheel you were given (or ask for it)") from None
        try:
            return real(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the package's own GradingError class, re-raised as ours
            if type(err).__name__ == "GradingError":
                raise GradingError(str(err)) from None
            raise

    grade.__name__ = grade.__qualname__ = name
    grade.__doc__ = f"Grade with your instructor's {name} ({GRADER_PACKAGE}.{module})."
    return grade


def _placeholder(*args: Any, **kwargs: Any) -> str:  # only lends functools.wraps a signature-free shape
    raise NotImplementedError
