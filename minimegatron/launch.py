"""Run one function on N ranks: simulated on this machine, or inside a real launcher.

``launch(fn, world_size, *args, timeout=120, **kwargs)`` is how every experiment in the notebooks and
every parallel test starts. Two modes, one call:

* **Simulated ranks** (the default on a laptop): fork ``world_size`` processes, each a real
  ``torch.distributed`` rank of a gloo process group on 127.0.0.1, run ``fn(*args, **kwargs)`` on each
  and return ``[result_of_rank_0, ..., result_of_rank_{N-1}]``. Forking (not spawning) is what lets
  ``fn`` be a function defined in a Jupyter cell or inside a test.
* **Inside a launcher** (``torchrun`` / ``deepspeed`` set ``RANK`` and ``WORLD_SIZE``): join that world
  with the accelerator's backend (nccl on CUDA, hccl on Gaudi, gloo on CPU), run ``fn`` once on this
  rank and return every rank's result, gathered with ``all_gather_object``.

``timeout`` means one thing: the most seconds the whole run may take (a finite number > 0), or
``None`` for no limit. Anything else, and a ``world_size`` or ``threads_per_rank`` that is not a
positive int, is a ValueError before any rank starts.

Failure is loud and bounded. A rank that raises makes ``launch`` raise :class:`RankError` naming the
rank and carrying its traceback; a rank that hangs (a send without a matching recv, a collective one
rank skipped) makes ``launch`` raise :class:`LaunchTimeout` within ``timeout`` seconds, with the Python
stack of every rank that was still running; Ctrl-C re-raises KeyboardInterrupt. Nothing outlives it:
each rank is a session of its own that gets SIGKILL the moment the parent dies and keeps below it all
it starts (a DataLoader's workers, even a process in a session of its own); the cleanup kills that
whole tree and removes the temp dir of the stack dumps, and each launch sweeps those of dead parents.
The ranks are forked from a fresh thread, so that ``threads_per_rank > 1`` works after any parent op
(GNU OpenMP is not fork-safe). How each of these works, and why: :mod:`minimegatron.processes`.

The rendezvous ``TCPStore`` serves on a socket the parent bound to port 0 and holds until the ranks
are done, so two launches at once never collide.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import numbers
import operator
import os
import pickle
import re
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from minimegatron.compat import tcp_store
from minimegatron.processes import (Prctl, die_with_parent, fork_from_fresh_thread, kill_child, linux_prctl,
                                    private_temp_dir, request_stacks, sigterm_as_exit, stacks_on_sigusr1)

__all__ = ["launch", "RankError", "LaunchTimeout", "in_launcher", "check_can_fork"]

TMP_PREFIX = "minimegatron-launch-"  # + "<parent pid>-<random>": a dead parent's dir is swept
WAIT_SLICE_S = 3600.0  # connection.wait() takes int32 milliseconds: wait at most this long at once
STACK_PATIENCE_S = 5.0  # how long hung ranks get to write their stacks
FAILURE_GRACE_S = 1.0  # after a rank fails, how long the others get to report theirs
# The last line of a rank that failed only because a peer died first (gloo, TCPStore, NCCL words).
_PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|"
                        r"connection refused|peer .*(closed|disconnected)|NCCL communicator was aborted",
                        re.IGNORECASE)


class RankError(RuntimeError):
    """A rank raised. ``.rank`` is its number, ``.traceback`` its formatted traceback."""

    def __init__(self, rank: int, tb: str, others: str = "") -> None:
        self.rank, self.traceback = rank, tb
        super().__init__(f"rank {rank} failed:\n{tb}{others}")


class LaunchTimeout(TimeoutError):
    """Some ranks did not finish within the timeout. ``.ranks`` lists them, ``.stacks`` their stacks."""

    def __init__(self, timeout: float, ranks: list[int], stacks: dict[int, str]) -> None:
        self.ranks, self.stacks = ranks, stacks
        where = "".join(f"\n--- rank {r} was here ---\n{stacks.get(r, '(no stack)')}" for r in ranks)
        super().__init__(
            f"ranks {ranks} did not finish within {timeout:g} s (a hang: typically a collective or a "
            f"send/recv that not every rank reached). They were killed.{where}")


def in_launcher() -> bool:
    """True inside torchrun / deepspeed / mpirun-style launches (RANK and WORLD_SIZE are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float | None = 120.0,
           backend: str = "gloo", threads_per_rank: int = 1, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return their results, indexed by rank.

    ``timeout``: seconds for the whole run (finite, > 0), or ``None`` for no limit; past it the ranks
    still running are killed and :class:`LaunchTimeout` is raised. ``threads_per_rank``: torch's
    intra-op threads in each simulated rank (a launcher's ranks keep their own setting)."""
    world_size = _positive_int("world_size", world_size)
    threads_per_rank = _positive_int("threads_per_rank", threads_per_rank)
    timeout = _checked_timeout(timeout)
    if in_launcher():
        return _join_launcher(fn, world_size, args, kwargs, timeout)
    if dist.is_initialized():
        raise RuntimeError("launch() forks new ranks, but this process is already a rank of a process "
                           "group; call fn directly there, or destroy_process_group() first.")
    check_can_fork()
    return _fork_ranks(fn, world_size, args, kwargs, timeout, backend, threads_per_rank)


def check_can_fork(start_methods: Sequence[str] | None = None) -> None:
    """Simulated ranks are forked processes: where Python cannot fork (native Windows), say what works."""
    methods = mp.get_all_start_methods() if start_methods is None else start_methods
    if "fork" not in methods:
        raise RuntimeError(f"simulated ranks are forked processes, and this Python ({sys.platform}) cannot "
                           f"fork (start methods: {', '.join(methods)}); run minimegatron under Linux, "
                           f"WSL 2 or macOS (see COURSE.md, 'Where it runs')")


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1; a bool, a float or a string is refused, not rounded."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return operator.index(value)


def _checked_timeout(timeout: Any) -> float | None:
    """None (no limit) or a finite number of seconds > 0; anything else is a ValueError naming the fix."""
    if timeout is None:
        return None
    if (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
            or not math.isfinite(timeout) or timeout <= 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}; "
                         f"pass timeout=None for no limit")
    return float(timeout)


def _join_launcher(fn, world_size: int, args, kwargs, timeout: float | None) -> list[Any]:
    """Inside torchrun/deepspeed: init from env (once), run fn here, all-gather every rank's result."""
    from minimegatron.device import dist_backend, set_device_for_rank

    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world_size:
        raise ValueError(f"launch(world_size={world_size}) inside a launcher that started "
                         f"WORLD_SIZE={env_world} ranks; pass world_size={env_world} or relaunch.")
    set_device_for_rank(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        limit = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
        dist.init_process_group(backend=dist_backend(), **limit)
    result = fn(*args, **kwargs)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, result)
    return gathered


def _rank_main(rank: int, world_size: int, parent: int, prctl: Prctl | None, listen_fd: int, port: int,
               backend: str, threads: int, fn: Callable[..., Any], args: tuple, kwargs: dict,
               conn: Connection, stack_file: str) -> None:
    """Body of one forked rank: die with the parent, keep its descendants, own session, stack dump on
    SIGUSR1, init, run, report, then wait to be killed."""
    die_with_parent(parent, prctl)
    os.setsid()  # own session and process group: the terminal's Ctrl-C goes to the parent only
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's cleanup handler
    with stacks_on_sigusr1(stack_file):
        try:
            torch.set_num_threads(threads)
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                              LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
            # Rank 0 serves the rendezvous store on the socket the parent bound (inherited fd).
            store = tcp_store("127.0.0.1", port, world_size, is_master=(rank == 0),
                              timeout=timedelta(seconds=60), listen_fd=listen_fd)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
            result = fn(*args, **kwargs)
            payload = pickle.dumps(("ok", result))
        except BaseException:  # noqa: BLE001 - everything is reported to the parent
            payload = pickle.dumps(("error", traceback.format_exc()))
        try:
            conn.send_bytes(payload)
        except Exception:  # result not picklable or parent gone
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        finally:
            conn.close()
        # Stay alive until the parent kills us: a rank that left early would break its peers'
        # connections and turn their hang into a misleading "connection reset" error.
        while True:
            time.sleep(3600)


def _fork_ranks(fn, world_size: int, args, kwargs, timeout: float | None, backend: str,
                threads: int) -> list[Any]:
    """Fork the ranks (from a fresh thread) and collect their results; however that ends, kill every
    rank with all it started and remove the temp dir."""
    procs: list[mp.process.BaseProcess] = []
    conns: dict[Connection, int] = {}

    def stop() -> None:  # kill each rank with everything below it, then reap it
        for p in procs:
            kill_child(p)
        for p in procs:
            p.join(timeout=5)
        for c in conns:
            c.close()

    with (sigterm_as_exit(), private_temp_dir(TMP_PREFIX) as tmp,
          socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock):
        # Bind the rendezvous port here (port 0: the kernel picks a free one, and we hold it, so
        # parallel launches never collide); rank 0 serves the store on this very socket. The parent
        # runs no server thread of its own, so nothing can be mid-lock when we fork.
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.set_inheritable(True)
        port = sock.getsockname()[1]
        rank_args = (os.getpid(), linux_prctl(), sock.fileno(), port, backend, threads, fn, args, kwargs)
        with fork_from_fresh_thread(lambda: _start_ranks(world_size, rank_args, tmp, procs, conns), stop,
                                    name="minimegatron-ranks"):
            return _collect(procs, conns, timeout, tmp)


def _start_ranks(world_size: int, rank_args: tuple, tmp: str, procs: list, conns: dict) -> None:
    """In the fresh thread: fork every rank, each with the write end of a pipe for its result."""
    ctx = mp.get_context("fork")
    for rank in range(world_size):
        recv_end, send_end = ctx.Pipe(duplex=False)
        conns[recv_end] = rank
        p = ctx.Process(target=_rank_main, name=f"rank{rank}",
                        args=(rank, world_size, *rank_args, send_end, _stack_file(tmp, rank)))
        p.start()
        procs.append(p)
        send_end.close()


def _stack_file(tmp: str, rank: int) -> str:
    return os.path.join(tmp, f"stack{rank}.txt")


def _collect(procs, conns: dict[Connection, int], timeout: float | None, tmp: str) -> list[Any]:
    """Every rank's result, by rank; RankError for a failure, LaunchTimeout past the deadline."""
    results: dict[int, Any] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = dict(conns)
    while pending:
        remaining = WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            hung = sorted(pending.values())
            raise LaunchTimeout(timeout, hung, _dump_stacks(procs, hung, tmp))
        for conn in wait(list(pending), timeout=min(remaining, WAIT_SLICE_S)):
            rank = pending.pop(conn)
            status, value = _receive(conn, procs, rank)
            if status == "error":
                raise _first_cause({rank: value, **_late_errors(pending, procs)})
            results[rank] = value
    return [results[r] for r in range(len(procs))]


def _receive(conn: Connection, procs, rank: int) -> tuple[str, Any]:
    """("ok", result) or ("error", traceback text) from one rank's pipe."""
    try:
        return pickle.loads(conn.recv_bytes())
    except EOFError:
        procs[rank].join(1.0)
        return "error", (f"rank {rank} died without a result (exit code {procs[rank].exitcode}; "
                         f"killed by the OS or crashed in native code)\n")


def _late_errors(pending: dict[Connection, int], procs) -> dict[int, str]:
    """The errors other ranks report within ``FAILURE_GRACE_S`` of the first one.

    When one rank fails, its peers soon fail too ("Connection closed by peer" in their next
    collective), and which report arrives first is a race; waiting a moment lets the cause win."""
    errors: dict[int, str] = {}
    end = time.monotonic() + FAILURE_GRACE_S
    while pending and (left := end - time.monotonic()) > 0:
        for conn in wait(list(pending), timeout=left):
            rank = pending.pop(conn)
            status, value = _receive(conn, procs, rank)
            if status == "error":
                errors[rank] = value
    return errors


def _first_cause(errors: dict[int, str]) -> RankError:
    """The RankError to raise: a rank that failed by itself, not one that lost a failed peer."""
    causes = [r for r, tb in sorted(errors.items()) if not _PEER_LOST.search(tb.strip().splitlines()[-1])]
    rank = causes[0] if causes else min(errors)
    others = sorted(r for r in errors if r != rank)
    note = (f"\n(ranks {others} failed too, after rank {rank}: their peers were gone)" if others else "")
    return RankError(rank, errors[rank], note)


def _dump_stacks(procs, ranks: list[int], tmp: str) -> dict[int, str]:
    """The Python stacks of the hung ``ranks``, asked for with SIGUSR1 (see ``stacks_on_sigusr1``)."""
    texts = request_stacks({_stack_file(tmp, r): procs[r] for r in ranks}, STACK_PATIENCE_S)
    return {r: texts[_stack_file(tmp, r)] or "(no stack written)" for r in ranks}
