"""Every notebook executes top to bottom; a failing cell fails the suite.

The kernel talks to the test over IPC sockets (files), not TCP ports: jupyter picks free ports and the
kernel binds them a moment later, and a gloo rank or another job that takes one in between kills the
kernel at start ("Address already in use").
"""
import os
import re
import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ is empty"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_opens_with_objectives_prerequisites_and_time(path):
    """COURSE.md promises it: the first cell says what a student will be able to do, what to read first
    and how long it takes; an exercise it promises is one the notebook has."""
    cells = nbformat.read(path, as_version=4).cells
    first = cells[0].source
    assert first.startswith(f"# {path.name[:2]} · "), f"{path.name}: the first cell must open with its title"
    for part in ("**Learning objectives.**", "**Prerequisites:**", "**Time:** about "):
        assert part in first, f"{path.name}: the first cell has no {part!r}"
    objectives = first.split("**Learning objectives.**")[1].split("**Prerequisites:**")[0]
    assert objectives.count("\n* ") >= 3, f"{path.name}: fewer than 3 learning objectives"
    headings = "\n".join(c.source for c in cells[1:] if c.cell_type == "markdown")
    for number in re.findall(r"\(Exercise (\d\d)", objectives):
        assert f"Exercise {number}" in headings, f"{path.name}: promises Exercise {number}, has none"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env_root = str(ROOT)
    os.environ["PYTHONPATH"] = env_root + os.pathsep + os.environ.get("PYTHONPATH", "")
    sockets = tempfile.mkdtemp(prefix="nb-")  # short: a unix socket path has ~100 characters
    try:
        km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "kernel"))
        client = NotebookClient(nb, km=km, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
