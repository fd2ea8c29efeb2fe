"""Instructor mode: write a student edition of this repository and, beside it, the graders it grades with.

    python -m exercises.student_edition OUT        (or: make student-edition [STUDENT_OUT=OUT])

writes two folders:

``OUT/student/``  the repository as students get it: every tracked file, except
                  * in each ``exercises/exNN_*.py``: the references (``reference_*``, ``Reference*``,
                    ``package_*``), the graders' own code and everything only they use; what is left is
                    the module's docstring, its imports and the stubs students fill in (found the way
                    :func:`exercises.grade_class.graded_pairs` finds them), and one line per grader that
                    forwards to the instructor's grader package;
                  * ``exercises/_exNN_*.py`` (checks, references, batteries of wrong solutions) and
                    ``tests/exercises/`` (which holds a correct solution of every exercise);
                  * notebook cells tagged ``solution`` (cell metadata ``"tags": ["solution"]``).
``OUT/grader/``   ``minimegatron_grader``: this checkout's ``exercises`` package under another name, with a
                  ``pyproject.toml``. Students ``pip install OUT/grader`` (or a wheel built from it) to
                  grade themselves; an instructor keeps it outside the student repository. Without it a
                  student's grader says so in one line.

The package ``minimegatron/`` stays whole: later notebooks build on the very layers the exercises ask for
(f and g, RMSNorm, the vocab-parallel loss, ...), so a student who wants to can read them. The graders
refuse the package's own functions submitted as a solution.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from exercises.grade_class import exercise_modules, graded_pairs

ROOT = Path(__file__).resolve().parents[1]
GRADER_PACKAGE = "minimegatron_grader"
_ANSWER = re.compile(r"^(reference_|Reference|package_|_reference)")

__all__ = ["student_module_source", "build", "main"]


def _names_used(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
           {n.value.id for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}


def _defined(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return set()


def _private_import(node: ast.ImportFrom) -> bool:
    """``from exercises._exNN_x import ...`` / ``from exercises import _exNN_x``: the graders' internals
    (not ``_exNN_given``: the helpers the stubs are handed, which a student edition keeps)."""
    names = [node.module or ""] if node.module != "exercises" else [f"exercises.{a.name}" for a in node.names]
    return all(re.match(r"exercises\._ex\d\d_(?!given)", n) for n in names)


def student_module_source(module: str) -> str:
    """The student's ``exercises/<module>.py``: docstring, imports, stubs, and forwarding graders."""
    source = (ROOT / "exercises" / f"{module}.py").read_text()
    tree = ast.parse(source)
    pairs = graded_pairs(module)
    stubs = {candidate for _, candidate in pairs}
    body = tree.body
    keep: list[ast.stmt] = []
    private: set[str] = set()  # names imported from the private grader modules, which go with them
    for node in body:
        if isinstance(node, ast.ImportFrom) and _private_import(node):
            private |= _defined(node)
            continue
        keep.append(node)
    # what the stubs need, transitively: their names, and every top-level definition they use
    by_name = {name: node for node in keep for name in _defined(node)}
    needed, todo = set(), list(stubs)
    while todo:
        name = todo.pop()
        if name in private:
            raise ValueError(f"exercises/{module}.py: a stub needs {name}, imported from a private grader "
                             f"module that the student edition leaves out")
        if name in needed or name not in by_name:
            continue
        needed.add(name)
        node = by_name[name]
        if _ANSWER.match(name) or name.startswith("grade_"):
            raise ValueError(f"exercises/{module}.py: the stub {sorted(stubs)} needs {name}, which is an "
                             f"answer or a grader; a stub must stand without them")
        todo += [n for n in _names_used(node) if n not in needed]
    kept = []
    for node in keep:
        if isinstance(node, ast.Expr) and node is body[0]:  # the docstring
            kept.append(ast.get_source_segment(source, node))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            kept.append(ast.get_source_segment(source, node))
        elif _defined(node) & needed or (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(source.splitlines()[start - 1:node.end_lineno]))
    forward = [f"\n\n# --- grading: your instructor's graders ({GRADER_PACKAGE}), not part of this copy "
               + "-" * 20,
               "from exercises.instructor import instructor_grader as _instructor_grader\n"]
    for grader, _ in pairs:
        line = f"{grader} = _instructor_grader({module!r}, {grader!r})"
        forward.append(line if len(line) <= 100 else f"{grader} = _instructor_grader(\n    {module!r}, {grader!r})")
    text = "\n\n".join(kept) + "\n" + "\n".join(forward) + "\n"
    ast.parse(text)  # the student's file must at least be Python
    return text


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [f for f in out.stdout.split("\0") if f and (ROOT / f).is_file()]


def _strip_solutions(path: Path) -> int:
    nb = json.loads(path.read_text())
    before = len(nb["cells"])
    nb["cells"] = [c for c in nb["cells"] if "solution" not in c.get("metadata", {}).get("tags", [])]
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return before - len(nb["cells"])


def _write_grader_package(out: Path) -> None:
    package = out / GRADER_PACKAGE
    package.mkdir(parents=True)
    for src in sorted((ROOT / "exercises").glob("*.py")):
        text = re.sub(r"\b(from|import) exercises\b", rf"\1 {GRADER_PACKAGE}", src.read_text())
        (package / src.name).write_text(text)
    (out / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{GRADER_PACKAGE}"\nversion = "0.1.0"\n'
        f'description = "The instructor\'s graders and references for minimegatron\'s exercises"\n\n'
        f'[tool.setuptools]\npackages = ["{GRADER_PACKAGE}"]\n')


def build(out: Path) -> dict[str, int]:
    """Write ``out/student`` and ``out/grader``; return what was removed (counts)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"student_edition: {out} is not empty; give a new folder (nothing was written)")
    student = out / "student"
    counts = {"files": 0, "left out": 0, "solution cells": 0, "exercise modules": 0}
    modules = set(exercise_modules())
    for rel in _tracked_files():
        if rel.startswith("tests/exercises/") or re.match(r"exercises/(_ex\d\d_(?!given)|student_edition|grade_class)", rel):
            counts["left out"] += 1
            continue
        dst = student / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.startswith("exercises/") and Path(rel).stem in modules:
            dst.write_text(student_module_source(Path(rel).stem))
            counts["exercise modules"] += 1
        else:
            shutil.copy2(ROOT / rel, dst)
            if rel.endswith(".ipynb"):
                counts["solution cells"] += _strip_solutions(dst)
        counts["files"] += 1
    _write_grader_package(out / "grader")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exercises.student_edition", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="a new (or empty) folder")
    args = parser.parse_args(argv)
    counts = build(args.out)
    print(f"student edition: {args.out / 'student'} ({counts['files']} files; {counts['exercise modules']} "
          f"exercise modules reduced to their stubs; {counts['left out']} files and "
          f"{counts['solution cells']} solution cells left out)\n"
          f"graders:         {args.out / 'grader'}  (pip install it beside the student edition; keep it "
          f"outside the student repository)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
