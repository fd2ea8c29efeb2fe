"""Run one function on N ranks: simulated on this machine, or inside a real launcher.

``launch(fn, world_size, *args, timeout=60, **kwargs)`` is how every experiment in the notebooks and
every parallel test starts. Two modes, one call:

* **Simulated ranks** (the default on a laptop): fork ``world_size`` processes, each a real
  ``torch.distributed`` rank of a gloo process group on 127.0.0.1, run ``fn(*args, **kwargs)`` on each
  and return ``[result_of_rank_0, ..., result_of_rank_{N-1}]``. Forking (not spawning) is what lets
  ``fn`` be a function defined in a Jupyter cell or inside a test.
* **Inside a launcher** (``torchrun`` / ``deepspeed`` set ``RANK`` and ``WORLD_SIZE``): join that world
  with the accelerator's backend (nccl on CUDA, hccl on Gaudi, gloo on CPU), run ``fn`` once on this
  rank and return every rank's result, gathered with ``all_gather_object``.

Failure is loud and bounded. A rank that raises makes ``launch`` raise :class:`RankError` naming the
rank and carrying its traceback; a rank that hangs (a send without a matching recv, a collective one
rank skipped) makes ``launch`` raise :class:`LaunchTimeout` within ``timeout`` seconds, with the Python
stack of every rank that was still running. In both cases every child is killed before ``launch``
returns: nothing is left behind.

The rendezvous ``TCPStore`` listens on a socket the parent bound to port 0 (the kernel picks a free
port and the parent holds it until the ranks are done), so two launches at once never collide.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist

from minimegatron.compat import tcp_store

__all__ = ["launch", "RankError", "LaunchTimeout", "in_launcher"]


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


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
           backend: str = "gloo", threads_per_rank: int = 1, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return their results, indexed by rank."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if in_launcher():
        return _join_launcher(fn, world_size, args, kwargs, timeout)
    if dist.is_initialized():
        raise RuntimeError("launch() forks new ranks, but this process is already a rank of a process "
                           "group; call fn directly there, or destroy_process_group() first.")
    return _fork_ranks(fn, world_size, args, kwargs, timeout, backend, threads_per_rank)


def _join_launcher(fn, world_size, args, kwargs, timeout) -> list[Any]:
    """Inside torchrun/deepspeed: init from env (once), run fn here, all-gather every rank's result."""
    from minimegatron.device import dist_backend, set_device_for_rank

    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world_size:
        raise ValueError(f"launch(world_size={world_size}) inside a launcher that started "
                         f"WORLD_SIZE={env_world} ranks; pass world_size={env_world} or relaunch.")
    set_device_for_rank(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend=dist_backend(), timeout=timedelta(seconds=timeout))
    result = fn(*args, **kwargs)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, result)
    return gathered


def _rank_main(rank, world_size, listen_fd, port, backend, threads, fn, args, kwargs, conn,
               stack_file) -> None:
    """Body of one forked rank: own session, stack dump on SIGUSR1, init, run, report, wait."""
    os.setsid()  # own process group: the parent can kill this rank *and* anything it started
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's cleanup handler
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    import faulthandler
    with open(stack_file, "w") as fh:
        faulthandler.register(signal.SIGUSR1, file=fh, all_threads=True)
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


def _exit_with_parent(parent: int) -> None:
    """Watchdog thread: a rank whose parent died (kernel restarted, Ctrl-C) exits by itself."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _fork_ranks(fn, world_size, args, kwargs, timeout, backend, threads) -> list[Any]:
    ctx = mp.get_context("fork")
    # Bind the rendezvous port here (port 0: the kernel picks a free one, and we hold it, so parallel
    # launches never collide); rank 0 serves the store on this very socket. The parent runs no
    # server thread of its own, so nothing can be mid-lock when we fork.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="minimegatron-launch-")
    procs, conns = [], {}
    previous_sigterm = _exit_cleanly_on_sigterm()
    try:
        for rank in range(world_size):
            recv_end, send_end = ctx.Pipe(duplex=False)
            stack_file = os.path.join(tmp, f"stack{rank}.txt")
            p = ctx.Process(target=_rank_main, daemon=True,
                            args=(rank, world_size, sock.fileno(), port, backend, threads, fn, args,
                                  kwargs, send_end, stack_file))
            p.start()
            send_end.close()
            procs.append(p)
            conns[recv_end] = rank
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        pending = dict(conns)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                hung = sorted(pending.values())
                raise LaunchTimeout(timeout, hung, _dump_stacks(procs, hung, tmp))
            for conn in wait(list(pending), timeout=min(remaining, 86400.0)):  # wait() takes int ms
                rank = pending.pop(conn)
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except EOFError:
                    procs[rank].join(1.0)
                    status, value = "error", (f"rank {rank} died without a result "
                                              f"(exit code {procs[rank].exitcode}; killed by the OS "
                                              f"or crashed in native code)\n")
                if status == "error":
                    raise RankError(rank, value)
                results[rank] = value
        return [results[r] for r in range(world_size)]
    finally:
        _kill_all(procs)
        for c in conns:
            c.close()
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _exit_cleanly_on_sigterm():
    """While ranks run, turn SIGTERM (``timeout``, a CI cancel, a kernel shutdown) into SystemExit so
    that the cleanup in ``finally`` kills the ranks and removes the temp dir. Returns the old handler
    (None when not in the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return None  # the application handles SIGTERM itself: leave it alone

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    return previous


def _dump_stacks(procs, ranks: list[int], tmp: str) -> dict[int, str]:
    """Ask hung ranks to write their Python stacks (faulthandler on SIGUSR1), then read them."""
    for r in ranks:
        if procs[r].is_alive():
            try:
                os.kill(procs[r].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
    time.sleep(0.3)
    stacks = {}
    for r in ranks:
        try:
            with open(os.path.join(tmp, f"stack{r}.txt")) as fh:
                stacks[r] = fh.read().strip() or "(no stack written)"
        except OSError:
            stacks[r] = "(no stack written)"
    return stacks


def _kill_all(procs) -> None:
    """SIGKILL each rank's whole process group, then reap it, so no child outlives launch()."""
    for p in procs:
        if p.pid is None:
            continue
        try:  # the group outlives its leader if the rank started processes of its own
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p.exitcode is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.join(timeout=5)
