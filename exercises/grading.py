"""Shared grading machinery: run a student's code on real ranks and say precisely what is wrong.

Every grader in ``exercises/`` is built from these pieces and is called the same way from a notebook
cell and from pytest::

    from exercises.ex00_collectives import ring_all_reduce, grade_ring_all_reduce
    grade_ring_all_reduce(ring_all_reduce)      # returns "✓ ..." or raises GradingError

A failure is one of: an exception in the student's code (with the rank and traceback), a hang (a
timeout, with where each rank was stuck), a wrong shape, wrong values (with the max error and where),
or a wrong gradient. The message always says which, so a student knows what to fix.

Whatever the student's code does — raise, loop forever, return None or something of the wrong type —
a grader raises nothing but :class:`GradingError`, within its ``timeout``:

* multi-rank graders run the student's code on forked gloo ranks with :func:`run_graded`
  (``minimegatron.launch``: a rank that raises or hangs is reported and every rank is killed);
* single-process graders run their whole check in one forked child with :func:`run_isolated`
  (``exercises/isolation.py``, re-exported here), and call the student's code through
  :func:`call_candidate`: an exception becomes "your <fn> raised <Type>: <msg>" with the traceback of
  the student's own lines, an infinite loop becomes "timeout: your <fn> did not return within N s"
  with where it was stuck, and the child is killed;
* :func:`grader` wraps every public ``grade_*`` function: anything but a GradingError that escapes
  the checks (an unexpected kind of result) is turned into one that says so.

Every grader takes ``timeout=`` (seconds, or None for no limit): by default SINGLE_PROCESS_TIMEOUT for
the single-process ones, MULTI_RANK_TIMEOUT (ex00: 30 s) for those that launch ranks; a grader that
checks in one process and then on ranks (rank_groups, top_p_filter) applies it to each part.
"""
from __future__ import annotations

import functools
import inspect
import math
import pickle
import re
import sys
import traceback
from typing import Any, Callable

import torch

from exercises.isolation import (SINGLE_PROCESS_TIMEOUT, format_frames, isolated_candidate, one_line,
                                 own_frames, run_isolated, send_to_parent, trim_stack, trim_traceback)
from minimegatron.launch import LaunchTimeout, RankError, launch

__all__ = ["GradingError", "SINGLE_PROCESS_TIMEOUT", "MULTI_RANK_TIMEOUT", "describe", "kind_of",
           "assert_close", "passed", "grader", "run_graded", "call_candidate", "run_isolated", "rank_error"]

# SINGLE_PROCESS_TIMEOUT (20 s) is run_isolated's default: that of the graders that check in one process
MULTI_RANK_TIMEOUT = 60.0  # s, run_graded's default: that of the graders that run it on forked ranks


class GradingError(AssertionError):
    """The candidate does not match the reference; the message says how."""


# --- describing what the student gave and returned ----------------------------------------------------

def describe(candidate: Any, role: str | None = None) -> str:
    """A short name for the student's callable: ``rms_norm``, ``Zero1AdamW``, ``MyFn.apply``;
    a lambda is named after the exercise's function (``role``) when given."""
    if isinstance(candidate, functools.partial):
        return describe(candidate.func, role)
    if isinstance(candidate, type):
        return candidate.__name__
    owner = getattr(candidate, "__self__", None)
    name = getattr(candidate, "__name__", None)
    if owner is not None and name and not isinstance(owner, type(sys)):
        owner_name = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        return f"{owner_name}.{name}"
    if name == "<lambda>":
        return f"{role} (a lambda)" if role else "lambda"
    if name:
        return name
    return role or type(candidate).__name__


def kind_of(value: Any) -> str:
    """``None``, or ``a str 'abc'`` / ``a Tensor of shape (2, 3)``: what a student returned, in words."""
    if value is None:
        return "None (did you forget to return the result?)"
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {tuple(value.shape)} ({value.dtype})"
    try:
        shown = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not break the message
        shown = "<unprintable>"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    article = "an" if type(value).__name__[:1].lower() in "aeiou" else "a"
    return f"{article} {type(value).__name__} {shown}"


def assert_close(name: str, got: Any, expected: torch.Tensor, rtol: float = 1e-6,
                 atol: float = 1e-6) -> None:
    """Raise GradingError naming ``name`` if shapes, dtypes or values differ beyond the tolerance."""
    if got is None:
        raise GradingError(f"{name}: got None (did you forget to return the result?)")
    if not isinstance(got, torch.Tensor):
        raise GradingError(f"{name}: expected a torch.Tensor, got {kind_of(got)}")
    if tuple(got.shape) != tuple(expected.shape):
        raise GradingError(f"{name}: wrong shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if got.dtype != expected.dtype:
        raise GradingError(f"{name}: wrong dtype {got.dtype}, expected {expected.dtype}")
    if got.layout != torch.strided:
        raise GradingError(f"{name}: expected a dense tensor, got layout {got.layout}")
    got, expected = got.detach().cpu(), expected.detach().cpu()
    if expected.is_floating_point():
        g, e = got.double(), expected.double()
        diff = (g - e).abs()
        tol = atol + rtol * e.abs()
        # NaN never compares <= tol: a NaN (or an inf) where a number was expected is a mismatch;
        # the same infinity, or NaN where NaN was expected, is a match
        same = (g == e) | (torch.isnan(g) & torch.isnan(e))
        bad = ~(diff <= tol) & ~same
        if bool(bad.any()):
            idx = tuple(int(i) for i in torch.nonzero(bad)[0])
            worst = diff[bad].max().item()
            raise GradingError(
                f"{name}: wrong values — max abs error {worst:.3e} "
                f"(tolerance {atol:g} + {rtol:g}·|expected|); first mismatch at index {idx}: "
                f"got {got[idx].item():.6g}, expected {expected[idx].item():.6g}")
    elif not torch.equal(got, expected):
        idx = tuple(int(i) for i in torch.nonzero(got != expected)[0])
        raise GradingError(f"{name}: wrong values; first mismatch at index {idx}: got "
                           f"{got[idx].item()}, expected {expected[idx].item()}")


def passed(what: str) -> str:
    """The verdict "✓ <what>": printed (in an isolated child, by the parent) and returned."""
    msg = f"✓ {what}"
    if not send_to_parent(("print", msg)):  # in an isolated child the parent prints it
        print(msg)
    return msg


# --- every grader: nothing but GradingError escapes ---------------------------------------------------

def grader(fn: Callable[..., str]) -> Callable[..., str]:
    """Decorator of every public ``grade_*``: an exception other than GradingError that escapes the
    checks (the student's code returned something the grader did not foresee) becomes a GradingError."""

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        timeout = signature.bind_partial(*args, **kwargs).arguments.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < math.inf):
            raise ValueError(f"{fn.__name__}: timeout must be a positive number of seconds (or None for "
                             f"no limit), got {timeout!r}")
        try:
            return fn(*args, **kwargs)
        except GradingError:
            raise
        except Exception as err:  # noqa: BLE001
            raise GradingError(
                f"{fn.__name__}: checking what your code returned raised {one_line(err)} — the grader "
                f"did not expect that kind of result: compare its type, shape and dtype with the "
                f"exercise's docstring.\n{format_frames(own_frames(err.__traceback__), err)}") from None

    return wrapper


# --- multi-rank graders -------------------------------------------------------------------------------

def run_graded(fn: Callable[..., Any], world_size: int, *args: Any,
               timeout: float | None = MULTI_RANK_TIMEOUT, **kwargs: Any) -> list[Any]:
    """``launch`` with failures turned into GradingErrors a student can act on (``timeout``: seconds for
    the whole run, None for no limit)."""
    try:
        return launch(_sendable, world_size, fn, *args, timeout=timeout, **kwargs)
    except RankError as e:
        raise GradingError(rank_error(e.rank, e.traceback)) from None
    except LaunchTimeout as e:
        where = "".join(f"\n--- rank {r} was here (most recent call first) ---\n"
                        f"{trim_stack(e.stacks.get(r, '(no stack)'))}" for r in e.ranks)
        raise GradingError(f"timeout — your code hung on ranks {e.ranks}: they did not finish within "
                           f"{timeout:g} s (an infinite loop? a collective that not every rank reached? "
                           f"every rank must take part in every collective, and each send needs a "
                           f"matching recv). They were killed.{where}") from None


def rank_error(rank: int, traceback_text: str) -> str:
    """The message of a rank that raised (its formatted traceback): not implemented yet, a grader's own
    GradingError raised on the rank, a crash, or the student's exception with their own lines."""
    tb = traceback_text.strip()
    last = tb.splitlines()[-1] if tb else "(no traceback)"
    if "NotImplementedError" in tb and "Exercise" in tb:
        return f"not implemented yet: {last}"
    marker = tb.rfind("GradingError: ")
    if marker >= 0:
        return f"rank {rank}: {tb[marker + len('GradingError: '):]}"
    if "died without a result" in tb:
        return f"your code crashed rank {rank}: {tb}"
    return f"your code raised on rank {rank}: {last}\n{trim_traceback(tb)}"


def _sendable(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """On a rank: run ``fn`` and make sure its result can travel back to the grader (pickle)."""
    result = fn(*args, **kwargs)
    try:
        pickle.dumps(result)
    except Exception as err:  # noqa: BLE001
        culprit = _unpicklable_part(result)
        raise GradingError(f"your code returned {kind_of(culprit)}, which cannot be sent back from the "
                           f"rank to the grader ({one_line(err)}); return a detached torch.Tensor or "
                           f"plain Python numbers and lists") from None
    return result


def _unpicklable_part(value: Any, depth: int = 0) -> Any:
    """The innermost piece of ``value`` (through dicts, lists, tuples) that does not pickle."""
    if depth < 6:
        parts = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) \
            else ()
        for part in parts:
            try:
                pickle.dumps(part)
            except Exception:  # noqa: BLE001
                return _unpicklable_part(part, depth + 1)
    return value


# --- calling the student's code -------------------------------------------------------------------

def call_candidate(where: str, fn: Callable[..., Any], *args: Any, name: str | None = None,
                   exercise: str | None = None, **kwargs: Any) -> Any:
    """Call the student's ``fn(*args, **kwargs)``; what goes wrong becomes a GradingError.

    A stub's ``NotImplementedError("Exercise NN.N: ...")`` becomes "Exercise NN.N is not implemented
    yet"; any other exception "<where>: your <fn> raised <Type>: <msg>" with the traceback of the
    student's own frames. Inside :func:`run_isolated` it also tells the parent which call is running,
    so that a timeout can say where the student's code was stuck."""
    name = name or isolated_candidate() or describe(fn)
    send_to_parent(("enter", where, name))
    try:
        return fn(*args, **kwargs)
    except GradingError:
        raise
    except NotImplementedError as err:
        if "Exercise" in str(err):
            label = exercise or _exercise_label(str(err)) or "this exercise"
            raise GradingError(f"{label} is not implemented yet: {err}") from None
        raise GradingError(_raised(where, name, err)) from None
    except BaseException as err:  # noqa: BLE001 - SystemExit and KeyboardInterrupt from student code too
        if isinstance(err, KeyboardInterrupt) and isolated_candidate() is None:
            raise  # a real Ctrl-C in the parent
        raise GradingError(_raised(where, name, err)) from None
    finally:
        send_to_parent(("leave",))


def _raised(where: str, name: str, err: BaseException) -> str:
    frames = own_frames(err.__traceback__, fallback=False)
    trace = format_frames(frames, err) if frames else one_line(err, limit=2000)
    return f"{where}: your {name} raised {one_line(err)}\n{trace}"


def _exercise_label(text: str) -> str | None:
    m = re.search(r"Exercise \d+\.\d+", text)
    return m.group(0) if m else None
