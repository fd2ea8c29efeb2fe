"""The one place where an error becomes the line a command-line user reads.

Every CLI of the package (``minimegatron.train``, ``minimegatron.demo``, ``minimegatron.data.preprocess``,
``minimegatron.data.tokenizer``) runs its body under :func:`cli_errors`. Whatever goes wrong — a bad
flag value, an unreadable file, an exception raised inside a rank, a hang, Ctrl-C — ends in **one
line** on stderr, ``<prog>: error: <what went wrong>: <the fix>``, and an exit status, never a Python
traceback:

===================================  ======  ==================================================
what                                 status  the line
===================================  ======  ==================================================
bad input (ValueError, its           2       the message as raised (it names the fix)
CheckpointError, VersionError)
a file problem (OSError)             2       the errno's words and the path
a rank raised (RankError)            1       ``rank 3 failed: OSError: [Errno 28] No space ...``
a hang (LaunchTimeout)               1       which ranks were stuck, and where to look
Ctrl-C (KeyboardInterrupt)           130     ``interrupted``
===================================  ======  ==================================================

``MINIMEGATRON_TRACEBACK=1`` prints the full traceback (a rank's included) for bug reports.

The command line itself is parsed by :class:`ArgumentParser` (a bad flag raises ``CLIError``: one line,
``... error: argument --tp: invalid int value: 'x'; see <prog> --help``, status 2, not argparse's usage
block), and :func:`one_line_warnings` prints warnings as ``<prog>: warning: ...``::

    with cli_errors(PROG), one_line_warnings(PROG):
        args = ArgumentParser(prog=PROG, ...).parse_args(argv)
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
import traceback
import warnings
from typing import Iterator

__all__ = ["one_line", "exception_text", "rank_error_line", "os_error_advice", "cli_errors", "CLIError",
           "ArgumentParser", "one_line_warnings"]

TRACEBACK_ENV = "MINIMEGATRON_TRACEBACK"


class CLIError(Exception):
    """Raised by CLI code to stop with a message and an exit status (default 2: bad input)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def one_line(text: str) -> str:
    """Collapse whitespace and newlines: a message meant for one line of a terminal."""
    return " ".join(str(text).split())


def exception_text(tb: str) -> str:
    """The exception a formatted traceback ends with: its type and its whole message (which may span
    lines), without the frames above it. A text with no frames (a rank that died) is returned as is."""
    lines = [line for line in tb.strip().splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if not frames:
        return " ".join(lines)
    i = frames[-1] + 1
    while i < len(lines) and lines[i].startswith("    "):  # the frame's source line, its ^^^ markers
        i += 1
    text = " ".join(lines[i:]) if i < len(lines) else lines[-1]
    # "minimegatron.checkpoint.reshape.CheckpointError: ..." -> "CheckpointError: ..."
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*(?::|$))", "", text.strip())


def rank_error_line(err: BaseException) -> str:
    """``rank 3 failed: OSError: [Errno 30] Read-only file system: 'ckpt/iter_0000010'``.

    The end of the rank's traceback is the exception it raised (type and message, all of it); the
    frames above it are for developers (``MINIMEGATRON_TRACEBACK=1``)."""
    rank = getattr(err, "rank", "?")
    tb = getattr(err, "traceback", "") or ""
    text = exception_text(tb) if tb.strip() else "(no traceback)"
    if "died without a result" in text and "exit code -9" in text:
        text += (" — SIGKILL usually means the machine ran out of memory: use a smaller model or batch "
                 "(--hidden-size, --num-layers, --micro-batch-size) or fewer ranks")
    return one_line(f"rank {rank} failed: {text}")


def os_error_advice(err: OSError) -> str:
    """What to do about a failed write, by errno ("" when there is nothing specific to say)."""
    return {
        errno.ENOSPC: "free some disk space (df -h shows what is left) or write to another disk",
        errno.EDQUOT: "you are over your disk quota: free some space or write to another disk",
        errno.EROFS: "that file system is read-only: write to a directory on a writable disk",
        errno.EACCES: "you may not write there: choose a directory you own",
        errno.EPERM: "you may not write there: choose a directory you own",
        errno.ENOTDIR: "a component of the path is a file, not a directory: choose another path",
    }.get(getattr(err, "errno", None), "")


def _message(err: BaseException) -> tuple[str, int]:
    """(the one line, the exit status) for an exception that reached a CLI's top level."""
    from minimegatron.launch import LaunchTimeout, RankError

    if isinstance(err, CLIError):
        return one_line(err), err.status
    if isinstance(err, RankError):
        return one_line(rank_error_line(err)), 1
    if isinstance(err, LaunchTimeout):
        return one_line(f"ranks {err.ranks} did not finish in time and were killed (a hang: a "
                        f"collective or send/recv not every rank reached, or a run longer than its "
                        f"--timeout); raise --timeout, or set {TRACEBACK_ENV}=1 to see where each rank "
                        f"was"), 1
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C); every rank was stopped", 130
    if isinstance(err, OSError):
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        words = err.strerror or str(err)
        return one_line(f"{words}{where}"), 2
    if isinstance(err, (ValueError, TypeError, RuntimeError)):
        return one_line(f"{err}" if str(err) else type(err).__name__), 2 if isinstance(
            err, (ValueError, TypeError)) else 1
    return one_line(f"{type(err).__name__}: {err}"), 1


@contextlib.contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    """Run a CLI's body; turn any exception into ``<prog>: error: ...`` and ``sys.exit(status)``."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - this is the top level of a command
        message, status = _message(err)
        if os.environ.get(TRACEBACK_ENV) == "1":
            traceback.print_exc()
            if getattr(err, "traceback", None):
                print(err.traceback, file=sys.stderr)
            if getattr(err, "stacks", None):
                for rank, stack in sorted(err.stacks.items()):
                    print(f"--- rank {rank} was here ---\n{stack}", file=sys.stderr)
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises CLIError (exit status 2, as argparse's own) instead of
    printing the usage block: the caller's cli_errors turns it into the one line
    ``PROG: error: ...; see PROG --help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message}; see {self.prog} --help", status=2)


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """Show each warning as ``PROG: warning: ...`` on one line (not file:line + source) while inside.

    Only the formatting changes: filters and anything that records warnings (pytest.warns) still work."""
    previous = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None) -> str:
        return f"{prog}: warning: {one_line(message)}\n"

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous
