"""Running ``python -m minimegatron.train`` / ``python -m minimegatron.demo`` for the error battery
(tests/training/test_cli_errors.py), and checking what a student sees.

Two ways to run one command, with the same result object (:class:`Run`: ``returncode``, ``stdout``,
``stderr``, ``seconds``) and the same leftovers checks:

* :func:`run_cli`: the real command as a subprocess (its own interpreter: the module's entry point, the
  exit status, nothing printed by imports), with a tag in its environment so that every process it
  started is found afterwards, and a private ``TMPDIR`` (launch's ``minimegatron-launch-*`` dirs);
* :func:`run_main`: the CLI's ``main(argv)`` in this process, for a command refused before any rank
  starts (no two seconds of torch import), isolated like a fresh process (:mod:`tests.in_process`):
  its own cwd, the subprocess's environment, a private ``TMPDIR``, Python's default warning filters,
  stdout/stderr captured at the file-descriptor level; no process it started may be left, nor a
  launch temp dir.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.in_process import call_main

ROOT = Path(__file__).resolve().parents[2]
TRAIN, DEMO = "minimegatron.train", "minimegatron.demo"
PROGS = {TRAIN: "python -m minimegatron.train", DEMO: "python -m minimegatron.demo"}
MAINS = {TRAIN: "minimegatron.train", DEMO: "minimegatron.demo.cli"}  # where each module's main() is
REFUSED_IN = 45.0   # seconds: a refusal before any rank (torch's import dominates; the machine is shared)
RAN_IN = 120.0      # seconds: a case that starts ranks
# The battery's run: a model small enough that a 2-step run of it takes seconds
TINY = ["--steps", "2", "--hidden-size", "16", "--num-layers", "1", "--seq-len", "16",
        "--global-batch-size", "2", "--micro-batch-size", "1", "--vocab-size", "64", "--no-progress"]
COMMAND_ENV = {"MINIMEGATRON_DEVICE": "cpu", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
TRACEBACK_ENV = "MINIMEGATRON_TRACEBACK"


# ---- what a command left behind ----------------------------------------------------------------------

def _alive_with(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``tag``: the command and its ranks."""
    if not os.path.isdir("/proc"):
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if tag.encode() not in fh.read():
                    continue
            with open(f"/proc/{entry}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            pids.append(int(entry))
    return pids


class Run:
    """One command: its result, how long it took, and the leftovers checks."""

    def __init__(self, module: str, args: list[str], cwd: Path, prefix: list[str] | None = None) -> None:
        self.module, self.cwd = module, cwd
        self.tag = f"MINIMEGATRON_TEST_TAG={uuid.uuid4().hex}"
        self.tmpdir = cwd / f"tmp-{uuid.uuid4().hex[:6]}"
        self.tmpdir.mkdir()
        self.env = {**os.environ, "TMPDIR": str(self.tmpdir), "MINIMEGATRON_TEST_TAG": self.tag.split("=")[1],
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    **COMMAND_ENV}
        self.env.pop(TRACEBACK_ENV, None)
        self.argv = (prefix or []) + [sys.executable, "-m", module, *args]

    def run(self, timeout: float) -> "Run":
        start = time.monotonic()
        out = subprocess.run(self.argv, capture_output=True, text=True, timeout=timeout, cwd=self.cwd,
                             env=self.env)
        self.seconds = time.monotonic() - start
        self.returncode, self.stdout, self.stderr = out.returncode, out.stdout, out.stderr
        self.check_nothing_left()
        return self

    def check_nothing_left(self, wait: float = 5.0) -> None:
        deadline = time.monotonic() + wait
        while _alive_with(self.tag.split("=")[1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive_with(self.tag.split("=")[1]), "a process of the command outlived it"
        assert not list(self.tmpdir.glob("minimegatron-launch-*")), "launch left its temp directory"


def run_cli(module: str, *args: str, cwd: Path, timeout: float = REFUSED_IN,
            prefix: list[str] | None = None) -> Run:
    """The real command, as a subprocess."""
    return Run(module, list(args), cwd, prefix).run(timeout)


def run_main(module: str, args: list[str], cwd: Path, monkeypatch, capfd) -> Run:
    """The same command's ``main(argv)`` in this process (a refusal: it must end in SystemExit), with
    the subprocess's environment and a private TMPDIR (:func:`tests.in_process.call_main`)."""
    run = Run.__new__(Run)
    run.module, run.cwd = module, cwd
    run.tmpdir = cwd / f"tmp-{uuid.uuid4().hex[:6]}"
    run.tmpdir.mkdir()
    result = call_main(importlib.import_module(MAINS[module]).main, args, cwd=cwd, monkeypatch=monkeypatch,
                       capfd=capfd, argv0=str(ROOT / (MAINS[module].replace(".", "/") + ".py")),
                       setenv={**COMMAND_ENV, "TMPDIR": str(run.tmpdir)}, delenv=[TRACEBACK_ENV])
    run.returncode, run.stdout, run.stderr, run.seconds = (result.returncode, result.stdout, result.stderr,
                                                          result.seconds)
    assert not list(run.tmpdir.glob("minimegatron-launch-*")), "launch left its temp directory"
    return run


def assert_one_line(run: Run, status: int, *patterns: str, within: float = REFUSED_IN) -> str:
    """Exit ``status``; stderr is one non-blank line ``<prog>: error: ...`` matching every pattern."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == status, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(lines) == 1, run.stderr[-3000:]
    line = lines[0]
    prog = PROGS[run.module]
    assert line.startswith(f"{prog}: error: ") and len(line) > len(prog) + 20, line
    for pattern in patterns:
        assert re.search(pattern, line), (pattern, line)
    assert run.seconds < within, f"took {run.seconds:.1f} s"
    return line


def tree_digest(path: Path) -> str:
    """A hash of every file's name and bytes under ``path``: equal digests, nothing lost."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# ---- file systems a test cannot otherwise make as root: read-only, tiny ----------------------------

def _mount_namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


MOUNTS = _mount_namespaces_work()


def mounted(directory: Path, options: str) -> list[str]:
    """A command prefix that runs the command with a private tmpfs (``options``) on ``directory``
    (a private mount namespace: nothing outside sees it). Skips when this machine cannot."""
    if not MOUNTS:
        pytest.skip("no private mount namespaces (unshare -rm) here")
    directory.mkdir(parents=True, exist_ok=True)
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs "$0" && exec "$@"',
            str(directory)]


def read_only(directory: Path) -> list[str]:
    """A prefix (possibly empty) under which ``directory`` cannot be written."""
    if os.geteuid() != 0:  # permissions are enough for a normal user
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o555)
        return []
    return mounted(directory, "ro,size=64k")
