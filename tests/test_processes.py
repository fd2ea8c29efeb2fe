"""minimegatron.processes: each primitive on real processes (no mocks), each test in about a second.

The scripts run in fresh pythons load processes.py alone (it needs only the standard library), so that
they start without importing torch."""
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import minimegatron.processes as processes
from minimegatron.processes import (fork_from_fresh_thread, kill_child, kill_tree, linux_prctl,
                                    private_temp_dir, request_stacks, sigint_deferred, sigterm_as_exit,
                                    stacks_on_sigusr1, sweep_stale_dirs)

LINUX = sys.platform.startswith("linux")
_LOAD_PROCESSES = (  # the preamble of every script: `processes` is minimegatron/processes.py
    "import importlib.util, os, subprocess, sys, time\n"
    f"spec = importlib.util.spec_from_file_location('processes', {processes.__file__!r})\n"
    "processes = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(processes)\n")


def _is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _gone(pids: list[int], deadline_s: float = 5.0) -> bool:
    """True once none of ``pids`` runs, polling up to ``deadline_s`` (SIGKILL lands asynchronously)."""
    end = time.monotonic() + deadline_s
    while any(_is_running(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.02)
    return not any(_is_running(p) for p in pids)


def _script(body: str, *args: str) -> subprocess.Popen:
    """A fresh python running ``body`` after the preamble; what it prints comes back line by line."""
    return subprocess.Popen([sys.executable, "-c", _LOAD_PROCESSES + body, *args],
                            stdout=subprocess.PIPE, text=True)


# --- kill_tree -----------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task"), reason="walks /proc")
@pytest.mark.parametrize("how", ["child", "orphan"])
def test_kill_tree_kills_a_grandchild_in_its_own_session(how):
    """With ``how="child"`` the grandchild's parent is alive; with "orphan" its parent (a shell) has
    exited, and it stays in the tree because the child became a subreaper in die_with_parent."""
    if how == "orphan" and not LINUX:
        pytest.skip("PR_SET_CHILD_SUBREAPER is Linux only")
    start = {"child": "p = subprocess.Popen(['sleep', '300'], start_new_session=True); print(p.pid)\n",
             "orphan": "processes.die_with_parent(os.getppid(), processes.linux_prctl())\n"
                       "print(subprocess.run(['sh', '-c', 'sleep 300 >/dev/null 2>&1 & echo $!'],\n"
                       "                     start_new_session=True,\n"
                       "                     capture_output=True, text=True).stdout.strip())\n"}[how]
    child, grandchild = _script(start + "sys.stdout.flush()\ntime.sleep(300)\n"), 0
    try:
        grandchild = int(child.stdout.readline())
        assert _is_running(grandchild) and os.getsid(grandchild) != os.getsid(child.pid)
        kill_tree(child.pid)
        assert child.wait(timeout=5) == -signal.SIGKILL
        assert _gone([grandchild]), "the grandchild outlived kill_tree"
    finally:  # whatever failed, leave nothing behind
        if grandchild and _is_running(grandchild):
            os.kill(grandchild, signal.SIGKILL)
        child.kill()
        child.wait()
        child.stdout.close()


# --- die_with_parent -----------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["prctl", "watchdog"])
def test_die_with_parent_kills_the_child_when_its_parent_is_sigkilled(mechanism):
    if mechanism == "prctl" and not LINUX:
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    parent = _script(
        "prctl = processes.linux_prctl() if sys.argv[1] == 'prctl' else None\n"
        "me = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    processes.die_with_parent(me, prctl)\n"
        "    while True:\n"
        "        time.sleep(0.01)\n"
        "print(pid, flush=True)\n"
        "time.sleep(300)\n", mechanism)
    try:
        child = int(parent.stdout.readline())
        time.sleep(0.2)  # the child is past die_with_parent (if not, it finds its parent gone)
        assert _is_running(child)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    # PDEATHSIG is immediate; the watchdog polls every 0.5 s
    assert _gone([child], 1.0 if mechanism == "prctl" else 3.0), f"the child outlived its parent ({mechanism})"


# --- private_temp_dir, sweep_stale_dirs ----------------------------------------------------------

def test_sweep_removes_only_the_dirs_of_dead_parents(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    prefix = "minimegatron-test-"
    stale = tmp_path / f"{prefix}{dead.pid}-abc123"
    live = tmp_path / f"{prefix}{os.getppid()}-def456"  # the shell that started pytest: alive
    no_pid = tmp_path / f"{prefix}k2j4_x9a"  # no pid in the name: not ours to judge
    other = tmp_path / f"another-prefix-{dead.pid}-ghi789"
    for d in (stale, live, no_pid, other):
        d.mkdir()
        (d / "stack0.txt").write_text("x")
    sweep_stale_dirs(prefix)
    assert sorted(tmp_path.iterdir()) == sorted([live, no_pid, other])

    stale.mkdir()
    with private_temp_dir(prefix) as path:  # sweeps first, then makes one named after us
        assert not stale.exists()
        assert os.path.basename(path).startswith(f"{prefix}{os.getpid()}-") and os.path.isdir(path)
        with open(os.path.join(path, "file"), "w") as fh:
            fh.write("x")  # removed with the dir
    assert not os.path.exists(path)


# --- fork_from_fresh_thread, stacks_on_sigusr1, request_stacks, kill_child ------------------------

def _deep_in_a_named_function(ready) -> None:
    ready.set()
    while True:
        time.sleep(0.02)


def _sleeper(path: str, ready) -> None:
    with stacks_on_sigusr1(path):
        _deep_in_a_named_function(ready)


def test_request_stacks_returns_the_stack_of_a_sleeping_child(tmp_path):
    ctx = mp.get_context("fork")
    ready, path = ctx.Event(), str(tmp_path / "stack.txt")
    child = ctx.Process(target=_sleeper, args=(path, ready))

    def stop() -> None:
        kill_child(child)
        child.join(5)

    with fork_from_fresh_thread(child.start, stop, name="minimegatron-test") as main_thread:
        assert main_thread != threading.get_ident()  # it forked from another thread
        assert ready.wait(10)
        stack = request_stacks({path: child}, patience_s=5.0)[path]
    assert child.exitcode == -signal.SIGKILL
    assert "_deep_in_a_named_function" in stack and "_sleeper" in stack, stack
    thread = re.search(r"Current thread (0x[0-9a-fA-F]+)", stack)  # the child's only thread...
    assert thread and int(thread.group(1), 16) == main_thread  # ...is the one that forked it
    assert _thread_ends()


def _thread_ends() -> bool:
    """True once the thread that forked is gone (it ends soon after the with block)."""
    end = time.monotonic() + 2.0
    while [t for t in threading.enumerate() if t.name == "minimegatron-test"] and time.monotonic() < end:
        time.sleep(0.01)
    return not [t for t in threading.enumerate() if t.name == "minimegatron-test"]


def test_fork_from_fresh_thread_raises_what_start_raised_after_stop():
    calls = []

    def start() -> None:
        calls.append(("start", threading.current_thread().name))
        raise OSError("no fork today")

    with pytest.raises(OSError, match="no fork today"):
        with fork_from_fresh_thread(start, lambda: calls.append(("stop", None)), name="minimegatron-test"):
            calls.append(("body", None))  # not reached
    assert calls == [("start", "minimegatron-test"), ("stop", None)]
    assert _thread_ends()


def test_kill_child_of_a_child_never_started_does_nothing():
    kill_child(mp.get_context("fork").Process(target=print))


# --- signals -------------------------------------------------------------------------------------

def test_sigint_deferred_holds_ctrl_c_until_the_block_is_done():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler has run by now: it only took note
            done.append(True)
    assert done == [True]


def test_sigterm_as_exit_raises_system_exit_and_restores_the_handler():
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this process handles SIGTERM itself: sigterm_as_exit leaves it alone")
    with sigterm_as_exit():
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(SystemExit) as info:
            handler(signal.SIGTERM, None)  # what a real SIGTERM would run, without risking pytest
    assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_linux_prctl_is_found_on_linux_only():
    assert (linux_prctl() is not None) == LINUX
