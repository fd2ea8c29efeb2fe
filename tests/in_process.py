"""A command line's ``main(argv)`` run in the test process as if it were a fresh ``python -m`` process.

The CLI error batteries (tests/training/test_cli_errors.py, tests/data/test_cli_errors.py) run most of
their refusals this way (a subprocess costs seconds of torch import) and the rest as the real command.
:func:`call_main` makes the in-process run see and leave what a fresh process would:

* its own cwd, the given environment changes, ``sys.argv``, a ``tempfile.gettempdir()`` read afresh
  from ``TMPDIR``;
* Python's default warning filters (no ``-W``): a warning the command emits becomes a line on stderr,
  as it would in the subprocess (pytest would otherwise swallow it);
* stdout and stderr captured at the file-descriptor level (capfd: C-level writes too);
* afterwards ``os.environ``, the signal handlers and the root logger's handlers are put back whatever
  the command did to them, and no process it started may be left (children of this process).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pytest

__all__ = ["InProcessResult", "call_main", "children"]

# A fresh interpreter's warning filters (no -W, no PYTHONWARNINGS), in order
DEFAULT_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                           ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                           ("ignore", ResourceWarning, "")]
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD)


@dataclass
class InProcessResult:
    returncode: object  # SystemExit's code
    stdout: str
    stderr: str
    seconds: float


def children() -> set[int]:
    """Every process whose parent is this one (zombies included)."""
    if not os.path.isdir("/proc"):
        return set()
    me, found = str(os.getpid()), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if fh.read().rsplit(")", 1)[1].split()[1] == me:
                        found.add(int(entry))
            except (OSError, IndexError):
                continue
    return found


def call_main(main: Callable[[list[str]], object], argv: Sequence[str], *, cwd, argv0: str, monkeypatch,
              capfd, setenv: Mapping[str, str] = {}, delenv: Sequence[str] = ()) -> InProcessResult:
    """``main(argv)``, which must end in SystemExit (a refusal), run as described above."""
    monkeypatch.chdir(cwd)
    for name, value in setenv.items():
        monkeypatch.setenv(name, value)
    for name in delenv:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    monkeypatch.setattr(sys, "argv", [argv0, *argv])
    environ, before = dict(os.environ), children()
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    log_handlers, log_level = logging.root.handlers[:], logging.root.level
    capfd.readouterr()
    start = time.monotonic()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            for action, category, module in DEFAULT_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module, append=True)
            with pytest.raises(SystemExit) as exit_info:
                main(list(argv))
    finally:
        seconds = time.monotonic() - start
        for name in set(os.environ) - set(environ):
            del os.environ[name]
        os.environ.update(environ)
        for signum, handler in handlers.items():
            if handler is not None and signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)
        logging.root.handlers[:] = log_handlers
        logging.root.setLevel(log_level)
    out, err = capfd.readouterr()
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    deadline = time.monotonic() + 5.0
    while children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not children() - before, "a process the command started outlived it"
    return InProcessResult(exit_info.value.code, out, err, seconds)
