"""Shared grading machinery: run a student's code on real ranks and say precisely what is wrong.

Every grader in ``exercises/`` is built from these pieces and is called the same way from a notebook
cell and from pytest::

    from exercises.ex00_collectives import ring_all_reduce, grade_ring_all_reduce
    grade_ring_all_reduce(ring_all_reduce)      # returns "✓ ..." or raises GradingError

A failure is one of: an exception in the student's code (with the rank and traceback), a hang (a
timeout, with where each rank was stuck), a wrong shape, wrong values (with the max error and where),
or a wrong gradient. The message always says which, so a student knows what to fix.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from minimegatron.launch import LaunchTimeout, RankError, launch


class GradingError(AssertionError):
    """The candidate does not match the reference; the message says how."""


def assert_close(name: str, got: Any, expected: torch.Tensor, rtol: float = 1e-6,
                 atol: float = 1e-6) -> None:
    """Raise GradingError naming ``name`` if shapes, dtypes or values differ beyond the tolerance."""
    if got is None:
        raise GradingError(f"{name}: got None (did you forget to return the result?)")
    if not isinstance(got, torch.Tensor):
        raise GradingError(f"{name}: expected a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise GradingError(f"{name}: wrong shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if got.dtype != expected.dtype:
        raise GradingError(f"{name}: wrong dtype {got.dtype}, expected {expected.dtype}")
    if expected.is_floating_point():
        diff = (got.detach().double() - expected.detach().double()).abs()
        tol = atol + rtol * expected.detach().double().abs()
        bad = diff > tol
        if bool(bad.any()):
            idx = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise GradingError(
                f"{name}: wrong values — max abs error {diff.max().item():.3e} "
                f"(tolerance {atol:g} + {rtol:g}·|expected|); first mismatch at index {idx}: "
                f"got {got[idx].item():.6g}, expected {expected[idx].item():.6g}")
    elif not torch.equal(got, expected):
        idx = tuple(int(i) for i in torch.nonzero(got != expected)[0])
        raise GradingError(f"{name}: wrong values; first mismatch at index {idx}: got "
                           f"{got[idx].item()}, expected {expected[idx].item()}")


def run_graded(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
               **kwargs: Any) -> list[Any]:
    """``launch`` with failures turned into GradingErrors a student can act on."""
    try:
        return launch(fn, world_size, *args, timeout=timeout, **kwargs)
    except RankError as e:
        if "NotImplementedError" in e.traceback and "Exercise" in e.traceback:
            last = e.traceback.strip().splitlines()[-1]
            raise GradingError(f"not implemented yet: {last}") from None
        if "GradingError" in e.traceback:
            last = e.traceback.strip().splitlines()[-1].replace("exercises.grading.GradingError: ", "")
            raise GradingError(f"rank {e.rank}: {last}") from None
        raise GradingError(f"your code raised on rank {e.rank}:\n{e.traceback}") from None
    except LaunchTimeout as e:
        raise GradingError(f"timeout — your code hung on ranks {e.ranks} (every rank must take part "
                           f"in every collective, and each send needs a matching recv).\n{e}") from None


def passed(what: str) -> str:
    msg = f"✓ {what}"
    print(msg)
    return msg
