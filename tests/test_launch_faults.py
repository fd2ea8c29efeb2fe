"""launch() under bad input and faults (issue 12): each ends in one clear exception, in bounded time,
with no process and no temp dir left behind. Real forked gloo ranks, no mocks."""
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minimegatron.launch import TMP_PREFIX, LaunchTimeout, RankError, launch

from tests.test_launch import _is_running, _no_children_left


def _rank() -> int:
    return dist.get_rank()


def _gone(pids, deadline_s: float = 5.0) -> bool:
    """True once none of ``pids`` is running (zombies do not count), polling up to ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while any(_is_running(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    return not any(_is_running(p) for p in pids)


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """This test's launches put their temp dirs (and look for stale ones) in a dir of its own."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _script(tmp_path: Path, body: str) -> subprocess.Popen:
    """Run ``body`` (after the imports) in a fresh python whose TMPDIR is ``tmp_path/tmp``."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    script = tmp_path / "script.py"
    script.write_text("import os, sys, time\nimport torch.distributed as dist\n"
                      "from minimegatron.launch import launch\n" + body)
    return subprocess.Popen([sys.executable, str(script)], cwd=os.getcwd(), stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
                                            "TMPDIR": str(tmp_path / "tmp")})


def _wait_for_files(paths, deadline_s: float = 60.0) -> list[int]:
    """Wait until every file in ``paths`` holds a pid; return the pids."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if all(p.exists() and p.read_text().strip() for p in paths):
            return [int(p.read_text()) for p in paths]
        time.sleep(0.05)
    raise AssertionError(f"ranks never wrote {paths}")


# -- 1, 2: bad input is refused before any rank forks --------------------------------------------

@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf, True, "10"])
def test_bad_timeout_is_refused_before_forking(timeout, own_tmp):
    t0 = time.monotonic()
    with pytest.raises(ValueError) as info:
        launch(_rank, 2, timeout=timeout)
    assert repr(timeout) in str(info.value) and "timeout=None for no limit" in str(info.value)
    assert time.monotonic() - t0 < 1.0
    assert _no_children_left(0.1) and not list(own_tmp.iterdir())  # nothing was started


@pytest.mark.parametrize("name, value", [("world_size", True), ("world_size", 2.0), ("world_size", "2"),
                                         ("threads_per_rank", 0), ("threads_per_rank", True),
                                         ("threads_per_rank", 1.5)])
def test_bad_world_size_or_threads_is_refused(name, value, own_tmp):
    args = {"world_size": 1, "threads_per_rank": 1, name: value}
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got {value!r}"):
        launch(_rank, args["world_size"], threads_per_rank=args["threads_per_rank"], timeout=30)
    assert _no_children_left(0.1) and not list(own_tmp.iterdir())


def test_timeout_none_is_no_limit_and_large_finite_is_accepted():
    assert launch(_rank, 2, timeout=None) == [0, 1]
    assert launch(_rank, 2, timeout=20 * 24 * 3600.0) == [0, 1]  # training's "no limit" until now
    assert _no_children_left()


# -- 3: nothing a rank started outlives launch(), even in a session of its own --------------------

def test_descendants_in_their_own_session_are_killed():
    marker = f"{400 + os.getpid() % 1000}"

    def sleepers() -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"^sleep {marker}"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if _is_running(int(p))]

    def start_escapees():
        # a child in its own session, and an orphan (its shell exits at once) in another one
        subprocess.Popen(["sleep", f"{marker}.1"], start_new_session=True)
        subprocess.Popen(["sh", "-c", f"sleep {marker}.2 &"], start_new_session=True).wait()
        time.sleep(0.2)
        dist.barrier()
        return len(sleepers())

    assert launch(start_escapees, 2, timeout=30) == [4, 4]  # they were all running
    end = time.monotonic() + 5.0  # SIGKILL is asynchronous: give a loaded machine a moment
    while sleepers() and time.monotonic() < end:
        time.sleep(0.05)
    assert not sleepers(), f"stray processes: {sleepers()}"
    assert _no_children_left()


# -- 4: ranks may have children (a DataLoader with workers) ---------------------------------------

class _Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([i, os.getpid()])


def _iterate_with_workers():
    loader = torch.utils.data.DataLoader(_Pids(), batch_size=2, num_workers=2)
    batches = torch.cat(list(loader))
    return sorted(batches[:, 0].tolist()), set(batches[:, 1].tolist()) - {os.getpid()}


def test_rank_can_iterate_a_dataloader_with_workers():
    results = launch(_iterate_with_workers, 2, timeout=60)
    for items, workers in results:
        assert items == list(range(8)) and len(workers) == 2  # two worker processes did the work
    assert _gone([w for _, ws in results for w in ws]) and _no_children_left()


# -- 5: threads_per_rank > 1 after the parent's OpenMP pool started -------------------------------

def _matmul_threads() -> int:
    a = torch.randn(600, 600)
    (a @ a).sum()
    return torch.get_num_threads()


@pytest.mark.parametrize("threads", [2, 1])
def test_threads_per_rank_after_a_multithreaded_parent_op(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(1500, 1500)
        (a @ a).sum()  # the parent's OpenMP pool is now up
        t0 = time.monotonic()
        assert launch(_matmul_threads, 2, threads_per_rank=threads, timeout=20) == [threads] * 2
        assert time.monotonic() - t0 < 15
    finally:
        torch.set_num_threads(before)
    assert _no_children_left()


# -- 6, 10: a hang ends in LaunchTimeout with every stack, even one written late ------------------

def _stalled_when_asked_for_its_stack():
    # a stand-in for a loaded machine: the rank is not scheduled (stopped) from now until 2.5 s
    # later, well past the timeout, so it writes its stack late
    dist.barrier()  # both ranks are through init (a stopped rank 0 would hold rank 1 there)
    subprocess.Popen(["sh", "-c", f"sleep 2.5; kill -CONT {os.getpid()}"])
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(300)


def test_late_stacks_are_waited_for(own_tmp):
    t0 = time.monotonic()
    with pytest.raises(LaunchTimeout) as info:
        launch(_stalled_when_asked_for_its_stack, 2, timeout=1.0)
    assert time.monotonic() - t0 < 1.0 + 5
    assert info.value.ranks == [0, 1]
    stacks = info.value.stacks
    assert all("_stalled_when_asked_for_its_stack" in stacks[r] for r in (0, 1)), stacks
    assert "did not finish within 1 s" in str(info.value)
    assert _no_children_left() and not list(own_tmp.iterdir())


def test_rank_error_without_timeout_is_a_rank_error(own_tmp):
    def fail_on_one():
        if dist.get_rank() == 1:
            raise KeyError("no such shard")
        dist.barrier()

    with pytest.raises(RankError) as info:
        launch(fail_on_one, 2, timeout=None)
    assert info.value.rank == 1 and "KeyError: 'no such shard'" in info.value.traceback
    assert _no_children_left() and not list(own_tmp.iterdir())


# -- 7: Ctrl-C kills the ranks, removes the temp dir, re-raises KeyboardInterrupt, prints nothing --

def test_ctrl_c_kills_ranks_and_reraises(tmp_path):
    proc = _script(tmp_path, (
        f"def hang():\n"
        f"    here = os.path.join({str(tmp_path)!r}, f'rank{{dist.get_rank()}}.pid')\n"
        f"    open(here, 'w').write(str(os.getpid()))\n"
        f"    time.sleep(300)\n"
        f"try:\n"
        f"    launch(hang, 2, timeout=None)\n"
        f"except KeyboardInterrupt:\n"
        f"    sys.exit(99)\n"))
    pids = _wait_for_files([tmp_path / "rank0.pid", tmp_path / "rank1.pid"])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 99, proc.stderr.read()
    assert proc.stderr.read() == ""  # launch itself printed nothing
    assert _gone(pids, 1.0), "ranks survived Ctrl-C"
    assert not list((tmp_path / "tmp").iterdir())


# -- 8, 9: kill -9 of the parent: ranks die with it, and the next launch sweeps its temp dir ------

def test_sigkilled_parent_takes_its_ranks_along_and_its_dir_is_swept(tmp_path, monkeypatch):
    proc = _script(tmp_path, (
        f"def beat():\n"
        f"    here = os.path.join({str(tmp_path)!r}, f'rank{{dist.get_rank()}}')\n"
        f"    open(here + '.pid', 'w').write(str(os.getpid()))\n"
        f"    while True:\n"
        f"        open(here + '.beat', 'a').write(f'{{time.time()}}\\n')\n"
        f"        time.sleep(0.01)\n"
        f"launch(beat, 2, timeout=300)\n"))
    pids = _wait_for_files([tmp_path / "rank0.pid", tmp_path / "rank1.pid"])
    time.sleep(0.3)
    proc.kill()
    proc.wait(timeout=10)
    parent_dead_at = time.time()
    assert _gone(pids, 2.0), "ranks outlived their SIGKILLed parent"
    for r in (0, 1):  # not one heartbeat after the parent was gone (a 0.5 s poll would allow many)
        last = float((tmp_path / f"rank{r}.beat").read_text().split()[-1])
        assert last <= parent_dead_at + 0.05, f"rank {r} kept working {last - parent_dead_at:.2f} s"
    stale = list((tmp_path / "tmp").iterdir())
    assert [d.name.startswith(f"{TMP_PREFIX}{proc.pid}-") for d in stale] == [True]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert launch(_rank, 1, timeout=30) == [0]
    assert not list((tmp_path / "tmp").iterdir()), "the dead parent's temp dir was not swept"


def test_only_dirs_of_dead_parents_are_swept(own_tmp):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = own_tmp / f"{TMP_PREFIX}{dead.pid}-abc123"
    live = own_tmp / f"{TMP_PREFIX}{os.getppid()}-def456"  # the shell that started pytest: alive
    old_style = own_tmp / f"{TMP_PREFIX}k2j4_x9a"  # no pid in the name: not ours to judge
    for d in (stale, live, old_style):
        d.mkdir()
        (d / "stack0.txt").write_text("x")
    assert launch(_rank, 1, timeout=30) == [0]
    assert sorted(own_tmp.iterdir()) == sorted([live, old_style])


def _one_rank_dies_mid_run():
    dist.barrier()
    if dist.get_rank() == 1:
        os._exit(9)  # no exception, no report: the process is just gone
    time.sleep(0.2)  # rank 1 is dead by now: the next collective loses its peer
    dist.all_reduce(torch.ones(1))


@pytest.mark.parametrize("attempt", range(3))
def test_the_rank_that_died_is_blamed_not_the_peer_that_lost_it(attempt):
    """Which report arrives first is a race; the cause (rank 1 died) must win it every time."""
    with pytest.raises(RankError) as info:
        launch(_one_rank_dies_mid_run, 2, timeout=60)
    assert info.value.rank == 1, str(info.value)
    assert "died without a result (exit code 9" in str(info.value)
    assert _no_children_left()


def test_a_lost_peer_is_not_the_cause():
    from minimegatron.launch import _first_cause

    lost = ("Traceback (most recent call last):\n  ...\nRuntimeError: [../gloo/transport/tcp/pair.cc:534] "
            "Connection closed by peer [127.0.0.1]:51923\n")
    died = "rank 2 died without a result (exit code 9; killed by the OS or crashed in native code)\n"
    err = _first_cause({0: lost, 2: died})
    assert err.rank == 2 and "ranks [0] failed too, after rank 2" in str(err)
    assert _first_cause({1: lost}).rank == 1  # nothing better known: the one that reported
    own = "Traceback (most recent call last):\nValueError: bad shape\n"
    assert _first_cause({0: lost, 1: own, 3: died}).rank == 1  # the lowest rank that failed by itself
