"""The single-process graders' runner: a whole check in a forked child, with a time limit.

A single-process grader (``grade_rms_norm``, ``grade_build_sample_index``, ...) calls the student's
function directly — in the notebook's own process, an endless loop would hang the kernel and an
``os._exit`` would kill it. So :func:`run_isolated` runs the whole check in one forked child and, within
``timeout`` seconds, returns its "✓ ..." message or raises a GradingError. How:

* Parent and child talk over a pipe. The child says which student call is running (``call_candidate``
  sends "enter" and "leave"), what to print (``passed``'s verdict, printed by the parent) and how the
  check ended ("ok" and the result, or "error" and the message). A pipe that closes without an ending
  is a crash: the exit code says how.
* Past the timeout the parent asks the child where it is (SIGUSR1) and kills it with all it started.
  Two writers answer: faulthandler at once, every thread, even stuck in C; and a Python handler, as
  soon as the main thread runs Python again (an endless loop does), the main thread's exact stack.
  The exact one wins when it comes, cut to the frames below ``call_candidate``: the student's code.
* The child is forked like ``launch``'s ranks (:mod:`minimegatron.processes`): from a fresh thread
  (OpenMP), dying with the parent, in a session of its own whose whole tree is killed at the end.

The frame helpers at the end show a student their own lines: tracebacks and stacks without the frames
of the grading machinery, of torch and of multiprocessing (``grading.py`` uses them too).
"""
from __future__ import annotations

import contextlib
import functools
import linecache
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import traceback
from typing import Any, Callable

import torch

from minimegatron.processes import (die_with_parent, fork_from_fresh_thread, kill_child, linux_prctl,
                                    private_temp_dir, request_stacks, stacks_on_sigusr1)

__all__ = ["SINGLE_PROCESS_TIMEOUT", "run_isolated", "send_to_parent", "isolated_candidate", "own_frames",
           "format_frames", "one_line", "trim_traceback", "trim_stack"]

SINGLE_PROCESS_TIMEOUT = 20.0  # s, run_isolated's: the default of the graders that check in one process
STACK_PATIENCE_S = 2.0  # how long a timed-out child gets to write its stack
TMP_PREFIX = "minimegatron-grader-"  # + "<parent pid>-<random>": a dead parent's dir is swept
_EXACT, _ALL_THREADS = "stack.py", "stack.txt"  # in the temp dir: what each of the two writers writes

_GRADING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grading.py")
_OWN_FILES = (_GRADING_FILE, os.path.abspath(__file__))  # the grading machinery
_LAUNCH_FILES = (os.path.join("minimegatron", "launch.py"), os.path.join("minimegatron", "processes.py"))
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_MP_DIR = os.path.dirname(mp.__file__) + os.sep

# In an isolated child: the pipe to the parent, the child's pid (a process forked from it must not use
# the pipe) and the name of the candidate. None in every other process.
_CHANNEL: Any = None
_CHANNEL_PID: int | None = None
_CANDIDATE_NAME: str | None = None


def send_to_parent(message: tuple) -> bool:
    """In an isolated child (not a process forked from one): send ``message`` to the parent and return
    True. Elsewhere: False."""
    if _CHANNEL is None or os.getpid() != _CHANNEL_PID:
        return False
    _CHANNEL.send(message)
    return True


def isolated_candidate() -> str | None:
    """The candidate's name in an isolated child (and in a process forked from one); None elsewhere."""
    return _CANDIDATE_NAME


# --- the parent ----------------------------------------------------------------------------------------

def run_isolated(body: Callable[..., Any], candidate: Any, *args: Any,
                 timeout: float | None = SINGLE_PROCESS_TIMEOUT, role: str | None = None) -> Any:
    """Run ``body(candidate, *args)`` — a whole single-process check — in a forked child, and return
    its result (the "✓ ..." message), within ``timeout`` seconds (None: no limit).

    A GradingError raised in the child is raised here; any other exception becomes one; when the
    child does not finish in time, its stack is dumped and it is killed (with anything it started),
    and a GradingError "timeout: your <fn> did not return within N s" says where it was. Forking (not
    spawning) lets ``candidate`` be a function defined in a notebook cell. ``role`` names the
    exercise's function, for a candidate that is a lambda."""
    from exercises.grading import GradingError, describe  # here, not at the top: grading imports us

    name = describe(candidate, role)
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    for stream in (sys.stdout, sys.stderr):  # what the parent printed must not be printed twice
        with contextlib.suppress(Exception):
            stream.flush()
    with private_temp_dir(TMP_PREFIX) as tmp, contextlib.closing(receive), contextlib.closing(send):
        child = ctx.Process(target=_child_main, name="grader",
                            args=(send, tmp, os.getpid(), linux_prctl(), name, body, candidate, args))
        with fork_from_fresh_thread(child.start, lambda: _kill(child),
                                    name="minimegatron-grader") as main_thread:
            send.close()
            deadline = math.inf if timeout is None else time.monotonic() + timeout
            running: tuple[str, str] | None = None  # (where, name) of the student call in progress
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    stack = _where_stuck(child, tmp, main_thread, inside_candidate=running is not None)
                    raise GradingError(_timeout_message(name, timeout, running, stack))
                if not receive.poll(min(remaining, 3600.0)):
                    continue
                try:
                    message = receive.recv()
                except EOFError:
                    child.join(2.0)
                    raise GradingError(_crash_message(name, child.exitcode, running)) from None
                kind = message[0]
                if kind == "enter":
                    running = (message[1], message[2])
                elif kind == "leave":
                    running = None
                elif kind == "print":
                    print(message[1])
                elif kind == "ok":
                    return message[1]
                else:  # "error"
                    raise GradingError(message[1])


def _kill(child: mp.process.BaseProcess) -> None:
    """Kill the child with everything below it, then reap it."""
    kill_child(child)
    if child.pid is not None:
        child.join(5.0)


def _where_stuck(child: mp.process.BaseProcess, tmp: str, main_thread: int, inside_candidate: bool) -> str:
    """Ask the child for its Python stack (SIGUSR1) and keep the relevant frames."""
    if not child.is_alive():
        return "  (the process was gone)"
    exact, everything = os.path.join(tmp, _EXACT), os.path.join(tmp, _ALL_THREADS)
    texts = request_stacks({exact: child, everything: child}, STACK_PATIENCE_S)
    # the exact stack, or, when stuck outside Python (a C call), what faulthandler wrote
    frames = _parse_exact(texts[exact]) or _parse_faulthandler(texts[everything], main_thread)
    if not frames:
        return "  (no stack was written)"
    if inside_candidate:  # only what runs below call_candidate: the student's code
        cut = [i for i, (path, _, func) in enumerate(frames)
               if path == _GRADING_FILE and func == "call_candidate"]
        if cut:
            frames = frames[cut[-1] + 1:]
    frames = [f for f in frames if f[0] not in _OWN_FILES and not f[0].startswith(_MP_DIR)] or frames[-1:]
    return format_frames(frames)


def _parse_exact(text: str) -> list[tuple[str, int, str]]:
    """What :func:`_write_stack` wrote -> the frames (path, line, function), outermost first."""
    try:
        return [(p, int(n), f) for p, n, f in (line.split("\0") for line in text.splitlines())]
    except ValueError:
        return []


def _parse_faulthandler(text: str, thread_id: int) -> list[tuple[str, int, str]]:
    """faulthandler's dump -> the frames (path, line, function) of ``thread_id``, outermost first."""
    sections = re.split(r"^(?=(?:Current thread|Thread) 0x[0-9a-fA-F]+)", text, flags=re.M)
    chosen = None
    for section in sections:
        head = re.match(r"(?:Current thread|Thread) (0x[0-9a-fA-F]+)", section)
        if head and int(head.group(1), 16) == thread_id:
            chosen = section
    if chosen is None:  # not found: the thread that handled the signal
        current = [s for s in sections if s.startswith("Current thread")]
        chosen = current[0] if current else sections[-1] if sections else ""
    frames = [(m.group(1), int(m.group(2)), m.group(3))
              for m in re.finditer(r'^\s+File "(.*)", line (\d+) in (\S+)', chosen, flags=re.M)]
    return frames[::-1]  # faulthandler writes the most recent call first


def _timeout_message(name: str, timeout: float, running: tuple[str, str] | None, stack: str) -> str:
    more = "If your code is only slow, pass a larger timeout= (seconds) to the grader."
    if running is not None:
        where, who = running
        return (f"timeout: your {who} did not return within {timeout:g} s (an infinite loop? a wait "
                f"that never ends?) — {where}. It was stopped here:\n{stack}\n{more}")
    return (f"timeout: the grader did not finish within {timeout:g} s while checking what your {name} "
            f"returned (an unusual result, or a very busy machine?). It was stopped here:\n{stack}\n"
            f"{more}")


def _crash_message(name: str, exitcode: int | None, running: tuple[str, str] | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
        if exitcode == -signal.SIGKILL:
            how += " (out of memory?)"
    else:
        how = f"exit code {exitcode} (did it call sys.exit() or os._exit()?)"
    if running is not None:
        where, who = running
        return f"{where}: your {who} crashed the grader's process ({how}) before it returned"
    return f"the grader's process crashed while checking your {name} ({how})"


# --- the child -----------------------------------------------------------------------------------------

def _child_main(conn, tmp: str, parent: int, prctl, name: str, body: Callable, candidate: Any,
                args: tuple) -> None:
    """Body of the isolated child: die with the parent, own session, stacks on SIGUSR1, run the
    check, report."""
    global _CHANNEL, _CHANNEL_PID, _CANDIDATE_NAME
    from exercises.grading import GradingError  # already imported by the parent: no loading here

    die_with_parent(parent, prctl)
    with contextlib.suppress(OSError):
        os.setsid()  # own process group: the terminal's Ctrl-C goes to the parent only
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _CHANNEL, _CHANNEL_PID, _CANDIDATE_NAME = conn, os.getpid(), name
    # On SIGUSR1 (the parent's "you are out of time"): faulthandler writes every thread's stack at
    # once; then (chain=True) _write_stack writes the main thread's exact stack, atomically.
    signal.signal(signal.SIGUSR1, functools.partial(_write_stack, os.path.join(tmp, _EXACT)))
    with stacks_on_sigusr1(os.path.join(tmp, _ALL_THREADS), chain=True):
        try:
            message = ("ok", body(candidate, *args))
        except GradingError as err:
            message = ("error", str(err))
        except BaseException as err:  # noqa: BLE001 - everything is reported to the parent
            message = ("error", f"checking what your {name} returned raised {one_line(err)} — the grader "
                                f"did not expect that kind of result: compare its type, shape and dtype "
                                f"with the exercise's docstring.\n"
                                f"{format_frames(own_frames(err.__traceback__), err)}")
        try:
            conn.send(message)
        except Exception as err:  # noqa: BLE001 - the result does not pickle
            conn.send(("error", f"the grader's result could not be sent back from its process: "
                                f"{one_line(err)}"))
        conn.close()


def _write_stack(path: str, signum: int, frame) -> None:
    """SIGUSR1 handler of the child: write the main thread's stack to ``path`` (whole or not at all)."""
    frames = traceback.extract_stack(frame)
    with open(path + ".tmp", "w") as fh:
        fh.write("".join(f"{f.filename}\0{f.lineno or 0}\0{f.name}\n" for f in frames))
    os.replace(path + ".tmp", path)


# --- the student's own frames --------------------------------------------------------------------------

def own_frames(tb, fallback: bool = True) -> list[tuple[str, int, str]]:
    """The frames of a traceback without the grading machinery's and torch's own (the student's lines);
    with ``fallback``, the innermost frame when nothing else is left."""
    frames = [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(tb)]
    kept = [f for f in frames if f[0] not in _OWN_FILES and not f[0].startswith(_TORCH_DIR)
            and not f[0].startswith(_MP_DIR)]
    return kept or (frames[-1:] if fallback else [])


def format_frames(frames: list[tuple[str, int, str]], err: BaseException | None = None,
                  limit: int = 12) -> str:
    """Frames (path, line, function), outermost first, as a traceback with their source lines."""
    lines = ["Traceback (most recent call last):"]
    if len(frames) > limit:
        lines.append(f"  ... {len(frames) - limit} earlier frames left out ...")
        frames = frames[-limit:]
    for path, line, func in frames:
        lines.append(f'  File "{path}", line {line}, in {func}')
        source = linecache.getline(path, line).strip()
        if source:
            lines.append(f"    {source}")
    if err is not None:
        lines.append(one_line(err, limit=2000))
    return "\n".join(lines)


def one_line(err: BaseException, limit: int = 500) -> str:
    """``Type: message``, the message cut to ``limit`` characters."""
    try:
        text = str(err)
    except Exception:  # noqa: BLE001
        text = "<unprintable message>"
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _is_machinery(path: str) -> bool:
    return path.endswith(_LAUNCH_FILES) or path in _OWN_FILES or path.startswith(_MP_DIR)


def trim_traceback(text: str) -> str:
    """A formatted traceback (a rank's) without the frames of launch, grading and multiprocessing."""
    out, skipping = [], False
    for line in text.splitlines():
        m = re.match(r'\s+File "(.*)", line \d+', line)
        if m:
            skipping = _is_machinery(m.group(1))
        elif not line.startswith("    "):
            skipping = False  # "Traceback ...", the exception line, "During handling ..."
        if not skipping:
            out.append(line)
    return "\n".join(out)


def trim_stack(text: str) -> str:
    """A faulthandler dump of a rank: its working threads only, without the machinery's frames."""
    sections = [s for s in re.split(r"\n\s*\n", text.strip()) if s.strip()]
    working = [s for s in sections if "_exit_with_parent" not in s] or sections  # not the watchdog
    lines = []
    for section in working:
        for line in section.splitlines():
            m = re.match(r'\s+File "(.*)", line \d+', line)
            if not (m and _is_machinery(m.group(1))):
                lines.append(line)
    return "\n".join(lines) or text
