"""Fixtures of the train/demo command-line batteries (test_cli_errors.py, test_cli_faults.py)."""
import shutil
from pathlib import Path

import pytest

from tests.training.cli_runs import RAN_IN, TINY, TRAIN, Run, run_cli, run_main


@pytest.fixture
def refused(request, monkeypatch, capfd):
    """Run a command that must be refused before any rank starts: the real command for the test
    module's SUBPROCESS cases (and whenever a mount prefix is needed), else main(argv) in this process."""
    def run(module: str, *args: str, cwd: Path, prefix: list[str] | None = None) -> Run:
        if prefix or request.node.name in getattr(request.module, "SUBPROCESS", ()):
            return run_cli(module, *args, cwd=cwd, prefix=prefix)
        return run_main(module, list(args), cwd, monkeypatch, capfd)
    return run


# ---- a real checkpoint to damage -----------------------------------------------------------------

@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-step training checkpoint of the TINY model, saved by the command line itself."""
    root = tmp_path_factory.mktemp("saved")
    run = run_cli(TRAIN, *TINY, "--save", str(root / "ck"), "--out-dir", str(root / "log"), cwd=root,
                  timeout=RAN_IN)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (root / "ck" / "latest").read_text().strip() == "iter_0000002"
    return root / "ck"


@pytest.fixture
def copy_of(checkpoint, tmp_path):
    """A fresh copy of the checkpoint and its iteration directory, to damage."""
    def make(name: str = "ck") -> tuple[Path, Path]:
        target = tmp_path / name
        shutil.copytree(checkpoint, target)
        return target, target / "iter_0000002"
    return make
