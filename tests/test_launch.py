"""launch(): results from 1-8 real gloo ranks, exceptions and hangs surface, nothing is left behind."""
import os
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from minimegatron.launch import LaunchTimeout, RankError, launch


def _children() -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]


def _no_children_left(deadline_s: float = 5.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        # `ps` itself is our child while it runs; it is filtered by exiting before we look again
        kids = [p for p in _children() if _is_running(p)]
        if not kids:
            return True
        time.sleep(0.1)
    return False


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().split()
        return fields[2] != "Z" and "ps" not in fields[1]
    except OSError:
        return False


def _sum_of_ranks(offset: float) -> dict:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item() + offset,
            "threads": torch.get_num_threads(), "env_rank": int(os.environ["RANK"])}


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_results_indexed_by_rank(world_size):
    results = launch(_sum_of_ranks, world_size, 0.5, timeout=60)
    expected_sum = world_size * (world_size - 1) / 2 + 0.5
    assert [r["rank"] for r in results] == list(range(world_size))
    assert all(r["world"] == world_size and r["sum"] == expected_sum for r in results)
    assert all(r["threads"] == 1 and r["env_rank"] == r["rank"] for r in results)
    assert _no_children_left()


def test_local_function_and_kwargs_and_tensors():
    scale = 3.0

    def local(x, *, bias):  # a closure, as a notebook cell would define
        return x * scale + dist.get_rank() + bias

    out = launch(local, 2, torch.ones(3), bias=1.0, timeout=60)
    torch.testing.assert_close(out[0], torch.full((3,), 4.0))
    torch.testing.assert_close(out[1], torch.full((3,), 5.0))


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 blocks here; launch must not wait for it


def test_exception_names_rank_and_carries_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(_raise_on_rank_one, 2, timeout=30)
    assert info.value.rank == 1
    assert "ValueError: deliberate failure on rank one" in info.value.traceback
    assert "_raise_on_rank_one" in info.value.traceback  # the frame is in the traceback
    assert "rank 1" in str(info.value)
    assert time.monotonic() - t0 < 30
    assert _no_children_left()


def _recv_that_never_comes():
    if dist.get_rank() == 0:
        t = torch.zeros(1)
        dist.recv(t, src=1)  # rank 1 never sends
    return dist.get_rank()


def test_hang_becomes_timeout_with_stack():
    timeout = 2.0
    t0 = time.monotonic()
    with pytest.raises(LaunchTimeout) as info:
        launch(_recv_that_never_comes, 2, timeout=timeout)
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 5, f"timeout took {elapsed:.1f}s"
    assert info.value.ranks == [0]
    assert "_recv_that_never_comes" in info.value.stacks[0]  # where rank 0 was stuck
    assert _no_children_left()


def test_back_to_back_launches_reuse_nothing_stale():
    for world_size in (4, 2, 4, 3):
        results = launch(_sum_of_ranks, world_size, 0.0, timeout=60)
        assert [r["world"] for r in results] == [world_size] * world_size
    assert _no_children_left()


def test_grandchildren_are_killed_too():
    marker = f"{300 + os.getpid() % 1000}.5"  # a sleep length no other process uses

    def start_sleeper():
        p = subprocess.Popen(["sleep", marker])
        if dist.get_rank() == 1:
            raise RuntimeError("fail while a subprocess runs")
        dist.barrier()
        return p.pid

    def running_sleepers() -> list[str]:
        pids = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
        return [p for p in pids.stdout.split() if _is_running(int(p))]  # zombies are not running

    with pytest.raises(RankError):
        launch(start_sleeper, 2, timeout=30)
    deadline = time.monotonic() + 5.0  # SIGKILL is delivered asynchronously; give a loaded machine time
    while running_sleepers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running_sleepers(), f"stray processes left: {running_sleepers()}"


def test_bad_world_size_is_rejected_before_forking():
    with pytest.raises(ValueError, match="world_size"):
        launch(_sum_of_ranks, 0, 0.0)


def test_unpicklable_result_is_reported():
    def returns_lambda():
        return lambda: None

    with pytest.raises(RankError, match="pickle|Pickl"):
        launch(returns_lambda, 1, timeout=30)


def test_launcher_mode_joins_existing_world(monkeypatch):
    """Under torchrun (RANK/WORLD_SIZE set) launch() runs fn here and gathers every rank's result."""

    def inner():
        # inside a simulated rank, pretend to be under torchrun: launch() must join, not fork
        os.environ["MINIMEGATRON_DEVICE"] = "cpu"
        assert dist.is_initialized()
        return launch(lambda: dist.get_rank() * 10, dist.get_world_size())

    results = launch(inner, 2, timeout=60)
    assert results == [[0, 10], [0, 10]]


def test_sigterm_to_the_parent_kills_ranks_and_removes_temp_files(tmp_path):
    """`timeout`, a CI cancel or a kernel shutdown sends SIGTERM: ranks die, the temp dir goes."""
    import signal
    import sys

    script = tmp_path / "hang.py"
    script.write_text(
        "import time, torch.distributed as dist\n"
        "from minimegatron.launch import launch\n"
        "def hang():\n"
        "    time.sleep(300)\n"
        "launch(hang, 2, timeout=300)\n")
    tmpdir = tmp_path / "tmp"  # the child's TMPDIR: only its own temp dirs can appear there
    tmpdir.mkdir()
    proc = subprocess.Popen([sys.executable, str(script)], cwd=os.getcwd(),
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
                                 "TMPDIR": str(tmpdir)})
    deadline = time.monotonic() + 60
    while not any(tmpdir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)  # wait until launch() is running
    assert any(tmpdir.iterdir()), "launch() never started"
    time.sleep(1.0)  # ranks are up and sleeping
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    left = [d.name for d in tmpdir.iterdir()]
    assert not left, f"temp dirs left behind: {left}"
    leftovers = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"ranks left running: {leftovers}"


def test_a_python_that_cannot_fork_is_told_where_it_runs():
    """Native Windows has only 'spawn': one line that names WSL 2 instead of multiprocessing's ValueError."""
    from minimegatron.launch import check_can_fork
    check_can_fork(["fork", "spawn", "forkserver"])  # Linux, macOS: fine
    with pytest.raises(RuntimeError, match=r"cannot fork \(start methods: spawn\).*WSL 2"):
        check_can_fork(["spawn"])
