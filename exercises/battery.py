"""Grading many candidates in one launch, and refusing the reference itself.

The tests prove that every usual mistake of an exercise fails with its own message (the batteries,
``exercises/_exNN_mistakes.py``). One launch of ranks per mistake would cost seconds each; instead a
multi-rank grader's rank-side case runs a LIST of candidates (:func:`each_candidate`) and the parent
judges each one's results (:func:`verdicts`) with the same checks as the single-candidate grader.

A student who submits the package's own function (or the grader's reference, or a thin wrapper of it:
a partial, ``functools.wraps``, an autograd Function subclass that overrides nothing) has shown nothing
about their own code: :func:`refuse_reference` says so.
"""
from __future__ import annotations

import functools
import sys
import traceback
from typing import Any, Callable

from exercises.grading import GradingError, describe, rank_error

__all__ = ["each_candidate", "verdicts", "refuse_reference"]


def each_candidate(case: Callable[..., Any], candidates: list, *args: Any, catch: bool = False) -> list:
    """On a rank: ``case(candidate, *args)`` for every candidate in turn. With ``catch``, a candidate that
    raises gives ("raised", its traceback) and the next one runs — only for candidates that raise on
    every rank alike (one raising alone would leave the others waiting in a collective)."""
    out = []
    for candidate in candidates:
        try:
            out.append(("ok", case(candidate, *args)))
        except Exception:  # noqa: BLE001
            if not catch:
                raise
            out.append(("raised", traceback.format_exc()))
    return out


def verdicts(judge: Callable[[list], str], per_rank: list[list]) -> list[str]:
    """In the parent: ``judge`` each candidate's results of every rank (``per_rank[rank][candidate]``);
    the "✓ ..." it returns or the message of the GradingError it raises, one per candidate."""
    out = []
    for i in range(len(per_rank[0])):
        results = [rank_results[i] for rank_results in per_rank]
        raised = [(r, res[1]) for r, res in enumerate(results) if res[0] == "raised"]
        try:
            if raised:
                raise GradingError(rank_error(*raised[0]))
            out.append(judge([res[1] for res in results]))
        except GradingError as err:
            out.append(str(err))
    return out


def _unwrapped(obj: Any) -> list[Any]:
    """``obj`` and what it wraps: a partial's function, ``__wrapped__`` (functools.wraps), a bound
    method's function and owner (``MyFunction.apply`` -> MyFunction)."""
    out, todo = [], [obj]
    while todo and len(out) < 20:
        o = todo.pop()
        out.append(o)
        owner = getattr(o, "__self__", None)
        if isinstance(owner, type(sys)):
            owner = None
        # a classmethod's __func__ (autograd.Function.apply) is shared by every subclass: only its owner
        func = getattr(o, "__func__", None) if not isinstance(owner, type) else None
        inner = [o.func if isinstance(o, functools.partial) else None, getattr(o, "__wrapped__", None),
                 func, owner]
        todo += [x for x in inner if x is not None and not any(x is y for y in out)]
    return out


def _same(a: Any, b: Any) -> bool:
    """``a`` is ``b``, shares its code, or is a subclass of the class ``b`` that defines nothing of its own."""
    if a is b:
        return True
    code = getattr(a, "__code__", None)
    if code is not None and code is getattr(b, "__code__", None):
        return True
    if isinstance(a, type) and isinstance(b, type) and a is not b and issubclass(a, b):
        between = a.__mro__[:a.__mro__.index(b)]
        return not any(n in ("forward", "backward", "__call__", "__init__") or not n.startswith("_")
                       for k in between for n in vars(k))
    return False


def refuse_reference(exercise: str, candidate: Any, *references: Any) -> None:
    """Raise GradingError when ``candidate`` is one of ``references`` or a thin wrapper of one."""
    for c in _unwrapped(candidate):
        for ref in references:
            if any(_same(c, r) for r in _unwrapped(ref)):
                name = f"{getattr(ref, '__module__', '?')}.{getattr(ref, '__qualname__', describe(ref))}"
                raise GradingError(f"{exercise}: that is the reference itself ({name}), not your own "
                                   "solution — grading the package's code proves nothing about yours: write "
                                   "it yourself (and read the reference after you tried)")
