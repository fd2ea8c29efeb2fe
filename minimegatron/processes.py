"""Child processes that never outlive us.

Two places in this project fork: :func:`minimegatron.launch.launch` forks the simulated ranks, and the
exercises' single-process graders (``exercises/isolation.py``) fork one child to run a student's check
under a time limit. Both promise the same thing: however the parent ends — it returns, raises, gets
Ctrl-C or SIGTERM, or is SIGKILLed — no process it started keeps running. These are the pieces.

**Fork from a fresh thread** (:func:`fork_from_fresh_thread`). GNU OpenMP (libgomp, torch's CPU thread
pool) is not fork-safe: a child forked by a thread that already ran a parallel region (any big matmul)
inherits that thread's pool without its worker threads, and its first multi-threaded op waits for them
forever. A thread that never ran one has no pool, so each child builds its own. ``PR_SET_PDEATHSIG``
(below) fires when the *thread* that forked exits, so that thread lives until its children are dead.

**Die with the parent** (:func:`die_with_parent`, first thing in the child). On Linux the child asks
for SIGKILL the moment its parent dies (``PR_SET_PDEATHSIG``) and becomes a *child subreaper*
(``PR_SET_CHILD_SUBREAPER``): everything it starts, even a process in a session of its own, stays
below it instead of re-parenting to init. Elsewhere a watchdog thread polls every 0.5 s. Children are
not daemonic, so they may start processes of their own (a DataLoader's workers).

**Kill the whole tree** (:func:`kill_tree`, :func:`kill_child`). Killing a child is not enough: what it
started would live on. The tree below it is frozen (SIGSTOP: a stopped process cannot fork) until a
walk finds no new process, then every process in it gets SIGKILL.

**Cleanup that a signal cannot cut short** (:func:`sigint_deferred`, :func:`sigterm_as_exit`). A second
Ctrl-C is held until the cleanup is done; SIGTERM becomes SystemExit, so the cleanup runs at all.

**Where was it stuck?** A child runs :func:`stacks_on_sigusr1`; when it hangs, the parent calls
:func:`request_stacks` and gets every thread's Python stack, written by faulthandler.

**Temp dirs named after the parent** (:func:`private_temp_dir`, :func:`sweep_stale_dirs`). A SIGKILLed
parent cannot clean up after itself, so its dir carries its pid and the next parent removes the dirs
of dead ones. (What its children had started is then on its own: their subreaper died with them.)
"""
from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import glob
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Callable, Iterator, Mapping

__all__ = ["Prctl", "linux_prctl", "die_with_parent", "fork_from_fresh_thread", "kill_tree", "kill_child",
           "sigint_deferred", "sigterm_as_exit", "stacks_on_sigusr1", "request_stacks", "private_temp_dir",
           "sweep_stale_dirs"]

Prctl = Callable[[int, int], int]  # libc's prctl(option, arg2)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36  # <linux/prctl.h>


# --- in the child: die with the parent ---------------------------------------------------------------

def linux_prctl() -> Prctl | None:
    """libc's ``prctl`` on Linux, else None. Call it in the parent and hand the result to the child:
    a child forked from a threaded process must not load libraries (dlopen may deadlock there)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes, prctl.restype = [ctypes.c_int, ctypes.c_ulong], ctypes.c_int
    return prctl


def die_with_parent(parent_pid: int, prctl: Prctl | None) -> None:
    """First thing in a forked child: get SIGKILL the moment ``parent_pid`` dies, and keep below this
    process all it will start.

    With ``prctl`` (from :func:`linux_prctl`): PR_SET_PDEATHSIG, then a check that the parent is still
    there (had it died before the prctl, nobody would send the signal: exit now), then
    PR_SET_CHILD_SUBREAPER. Without it, or if the kernel refuses: a daemon thread that exits the
    process once its parent is gone."""
    if prctl is not None and prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
        if os.getppid() != parent_pid:
            os._exit(1)
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of anything started here re-parent to this process
    else:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    """The watchdog where PR_SET_PDEATHSIG is missing (graders drop it by this name from stacks)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


# --- in the parent: fork, and kill what was forked ---------------------------------------------------

@contextlib.contextmanager
def fork_from_fresh_thread(start: Callable[[], None], stop: Callable[[], None], name: str) -> Iterator[int]:
    """Run ``start()`` — which forks, e.g. ``Process.start()`` — in a new thread named ``name``, and
    keep that thread alive until the ``with`` block is over. Yields the thread's ident: in the
    children, the id of their main thread (as faulthandler prints it).

    However it ends — ``start()`` raised (its exception comes out of the ``with``), the block raised,
    Ctrl-C — the exit waits for ``start()`` to be done, calls ``stop()`` (kill what ``start()``
    forked) with Ctrl-C held, and only then lets the thread end."""
    started, release, failed = threading.Event(), threading.Event(), []

    def body() -> None:
        try:
            start()  # python >= 3.12 warns of fork() with threads: this one holds no lock, no pool
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the caller's thread
            failed.append(err)
        finally:
            started.set()
        release.wait()

    thread = threading.Thread(target=body, name=name, daemon=True)
    try:
        thread.start()
        started.wait()
        if failed:
            raise failed[0]
        yield thread.ident or 0
    finally:
        with sigint_deferred():  # a second Ctrl-C must not leave half the children running
            if thread.ident is not None:
                started.wait()  # every process start() forked is known to stop()
            stop()
            release.set()


def kill_child(proc: BaseProcess) -> None:
    """SIGKILL a forked child (leader of a session of its own) with everything below it and what is
    left of its process group. It is not reaped: ``join`` it after."""
    if proc.pid is None:  # never started
        return
    if proc.exitcode is None:  # not reaped yet, so proc.pid is still this child (or its zombie)
        kill_tree(proc.pid)
    with contextlib.suppress(OSError):  # what is left of its group, if the child died early
        os.killpg(proc.pid, signal.SIGKILL)


def kill_tree(pid: int) -> None:
    """SIGSTOP ``pid`` and every process below it until a walk finds no new one (a stopped process
    cannot fork; a subreaper keeps orphans below it), then SIGKILL them all."""
    frozen: list[int] = []
    for _ in range(100):  # bounded: a fork bomb cannot keep the cleanup busy for ever
        new = [p for p in _tree(pid) if p not in frozen]
        for p in new:
            _signal(p, signal.SIGSTOP)
        frozen += new
        if not new:
            break
    for p in frozen:
        _signal(p, signal.SIGKILL)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants: /proc/<pid>/task/*/children on Linux, else psutil if installed."""
    if not os.path.exists(f"/proc/{pid}/task"):
        with contextlib.suppress(Exception):  # no psutil, or the process is gone
            import psutil
            return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        return [pid]
    kids = [int(k) for path in glob.glob(f"/proc/{pid}/task/*/children") for k in _read(path).split()]
    return [pid] + [d for kid in kids for d in _tree(kid)]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):  # already gone
        os.kill(pid, sig)


def _read(path: str) -> str:
    with contextlib.suppress(OSError), open(path) as fh:
        return fh.read().strip()
    return ""


# --- signals during the cleanup ----------------------------------------------------------------------

@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C during the block, then hand it to the previous handler (KeyboardInterrupt).
    Signal handlers belong to the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """During the block, SIGTERM (``timeout``, a CI cancel, a kernel shutdown) raises
    ``SystemExit(128 + SIGTERM)``, so that the ``finally`` clauses kill the children and remove the
    temp dir. Only in the main thread, and only where SIGTERM has its default action: an application
    that handles SIGTERM itself is left alone."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)):
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- where a hung child was stuck --------------------------------------------------------------------

@contextlib.contextmanager
def stacks_on_sigusr1(path: str, chain: bool = False) -> Iterator[None]:
    """In a child, during the block: on SIGUSR1 faulthandler writes the Python stack of every thread
    to ``path`` — at once, from the signal handler, even while the code is stuck in C. ``chain``: then
    also run the SIGUSR1 handler set before (a Python-level one runs once the main thread executes
    Python again)."""
    with open(path, "w") as fh:
        faulthandler.register(signal.SIGUSR1, file=fh, all_threads=True, chain=chain)
        try:
            yield
        finally:
            faulthandler.unregister(signal.SIGUSR1)  # before the file is closed


def request_stacks(files: Mapping[str, BaseProcess], patience_s: float) -> dict[str, str]:
    """Send SIGUSR1 (once) to each process of ``files`` — path -> the process that writes it, see
    :func:`stacks_on_sigusr1` — that is still alive, and return the text of every file ("" for none).

    Each file is waited for, up to ``patience_s`` in all, until it has content that stopped growing
    (or its process died): on a loaded machine a child may take a while to run the handler."""
    waiting = {path for path, proc in files.items() if proc.is_alive()}
    for pid in {files[path].pid for path in waiting}:
        if pid is not None:
            _signal(pid, signal.SIGUSR1)
    sizes: dict[str, int] = {}
    end = time.monotonic() + patience_s
    while waiting and time.monotonic() < end:
        time.sleep(0.05)
        for path in sorted(waiting):
            size = os.path.getsize(path) if os.path.exists(path) else 0
            if (size > 0 and size == sizes.get(path)) or not files[path].is_alive():
                waiting.discard(path)
            sizes[path] = size
    return {path: _read(path) for path in files}


# --- temp dirs that a SIGKILLed parent leaves behind -------------------------------------------------

@contextlib.contextmanager
def private_temp_dir(prefix: str) -> Iterator[str]:
    """A new temp dir ``<prefix><our pid>-<random>`` for the block, removed after it (Ctrl-C held).
    First the dirs with this prefix of parents that are gone are swept (:func:`sweep_stale_dirs`)."""
    sweep_stale_dirs(prefix)
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")
    try:
        yield path
    finally:
        with sigint_deferred():
            shutil.rmtree(path, ignore_errors=True)


def sweep_stale_dirs(prefix: str) -> None:
    """Remove the dirs ``<prefix><pid>-...`` in the temp dir that are ours (same uid) and whose
    process ``pid`` is gone. A name without a pid, or another user's dir, is left alone."""
    root, names = tempfile.gettempdir(), []
    with contextlib.suppress(OSError):
        names = os.listdir(root)
    for name in names:
        match = re.fullmatch(re.escape(prefix) + r"(\d+)-.+", name)
        path = os.path.join(root, name)
        try:
            if match and os.stat(path).st_uid == os.getuid():
                os.kill(int(match.group(1)), 0)  # no error: that parent (maybe us) is running
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, OverflowError):  # another user's pid, a vanished dir: not ours to judge
            pass
