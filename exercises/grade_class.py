"""Grade a whole class: every student's exercise files against the instructor's graders, into one table.

    python -m exercises.grade_class SUBMISSIONS [--only ex01,ex03] [--csv grades.csv] [--timeout 300]

``SUBMISSIONS`` holds one folder per student, each with the exercise files that student edited, under
their original names (``alice/ex01_tensor_parallel.py``, ``bob/ex03_vocab_parallel.py``, ...). For each
file the grader runs in a fresh Python process (one student's crash, hang or monkey-patching cannot touch
the next one's grade): it imports the *student's* file for the candidates and the *instructor's*
``exercises`` package — this checkout — for the graders, so a student who edits the grader in their copy
changes nothing. Which candidate goes to which grader is read off each exercise's docstring ("Grade with:
grade_copy_to(CopyToTensorParallelRegion) ..."), else ``grade_X`` grades ``X``: :func:`graded_pairs`.

The result is one row per (student, exercise, function): ``pass`` or ``fail`` and the grader's first
line, printed as a table and written as CSV. The process separation is for honest mistakes, not a
sandbox: a student's file runs with your permissions, so read what you grade or grade in a container.
"""
from __future__ import annotations

import argparse
import ast
import csv
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

EXERCISES = Path(__file__).resolve().parent
_PAIR = re.compile(r"\b(grade_\w+)\((\w+)\)")

__all__ = ["graded_pairs", "exercise_modules", "Grade", "grade_file", "grade_class", "main"]


def exercise_modules() -> list[str]:
    """The exercise modules students edit: ``exercises/exNN_*.py``."""
    return sorted(p.stem for p in EXERCISES.glob("ex[0-9][0-9]_*.py"))


def graded_pairs(module: str) -> list[tuple[str, str]]:
    """``[(grader, candidate), ...]`` for one exercise module, from its source (nothing is imported)."""
    tree = ast.parse((EXERCISES / f"{module}.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    named = dict(_PAIR.findall(ast.get_docstring(tree) or ""))
    pairs = []
    for grader in sorted(n for n in defined if n.startswith("grade_")):
        candidate = named.get(grader, grader[len("grade_"):])
        if candidate not in defined:
            raise ValueError(f"exercises/{module}.py: {grader} has no candidate ({candidate!r} is not "
                             f"defined there); name it in the docstring as {grader}(<candidate>)")
        pairs.append((grader, candidate))
    return pairs


@dataclass(frozen=True)
class Grade:
    student: str
    exercise: str
    function: str
    passed: bool
    message: str  # the grader's first line


def _grade_in_this_process(path: Path, module: str) -> list[dict]:
    """Import the student's file as its own module, hand each candidate to the instructor's grader."""
    instructor = importlib.import_module(f"exercises.{module}")
    spec = importlib.util.spec_from_file_location(f"submission_{module}", path)
    rows = []
    try:
        student = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = student  # forked ranks and pickling find it by name
        spec.loader.exec_module(student)
    except BaseException as err:  # noqa: BLE001 - a file that does not import fails every function
        return [dict(function=c, passed=False, message=f"the file does not import: "
                     f"{type(err).__name__}: {err}") for _, c in graded_pairs(module)]
    for grader, candidate in graded_pairs(module):
        if not hasattr(student, candidate):
            rows.append(dict(function=candidate, passed=False, message=f"{candidate} is missing from the file"))
            continue
        try:
            message, ok = getattr(instructor, grader)(getattr(student, candidate)), True
        except BaseException as err:  # noqa: BLE001 - GradingError, or anything a grader let through
            message, ok = str(err) or type(err).__name__, False
        rows.append(dict(function=candidate, passed=ok, message=(str(message).strip().splitlines() or [""])[0]))
    return rows


def grade_file(student: str, path: Path, timeout: float = 300.0) -> list[Grade]:
    """Grade one student's exercise file in a fresh process (``timeout`` seconds for the whole file)."""
    module = path.stem
    cmd = [sys.executable, "-m", "exercises.grade_class", "--one", str(path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=EXERCISES.parent)
        rows = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
        why = f"the grading process failed (exit {done.returncode}): " + \
              ((done.stderr.strip().splitlines() or ["no output"])[-1])
    except subprocess.TimeoutExpired:
        rows, why = None, f"grading this file took longer than {timeout:g} s: it was stopped"
    except (ValueError, IndexError):
        rows, why = None, "the grading process printed no result"
    if rows is None:
        rows = [dict(function=c, passed=False, message=why) for _, c in graded_pairs(module)]
    return [Grade(student, module, r["function"], r["passed"], r["message"]) for r in rows]


def grade_class(submissions: Path, only: Sequence[str] = (), timeout: float = 300.0) -> list[Grade]:
    """Every ``SUBMISSIONS/<student>/exNN_*.py`` that names a known exercise (``only``: prefixes)."""
    known = set(exercise_modules())
    jobs = [(d.name, f) for d in sorted(p for p in submissions.iterdir() if p.is_dir())
            for f in sorted(d.glob("ex[0-9][0-9]_*.py"))
            if f.stem in known and (not only or any(f.stem.startswith(o) for o in only))]
    if not jobs:
        raise SystemExit(f"grade_class: no exercise files under {submissions}/<student>/ "
                         f"(expected names like {sorted(known)[0]}.py)")
    grades = []
    for student, path in tqdm(jobs, desc="grading", unit="file"):
        grades += grade_file(student, path, timeout)
    return grades


def table(grades: Sequence[Grade], width: int = 90) -> str:
    """A plain-text table: one line per graded function, then the passes per student."""
    lines = [f"{'student':<14} {'exercise':<28} {'function':<34} result"]
    for g in grades:
        lines.append(f"{g.student:<14} {g.exercise:<28} {g.function:<34} "
                     f"{'pass' if g.passed else 'FAIL: ' + g.message[:width]}")
    for student in sorted({g.student for g in grades}):
        mine = [g for g in grades if g.student == student]
        lines.append(f"{student}: {sum(g.passed for g in mine)}/{len(mine)} passed")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exercises.grade_class", description=__doc__.split("\n")[0])
    parser.add_argument("submissions", nargs="?", type=Path, help="one folder per student")
    parser.add_argument("--only", default="", help="comma-separated exercise prefixes, e.g. ex01,ex03")
    parser.add_argument("--csv", type=Path, help="also write the grades here")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per file (default 300)")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: grade one file, print JSON
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(_grade_in_this_process(args.one.resolve(), args.one.stem)))
        return 0
    if args.submissions is None or not args.submissions.is_dir():
        parser.error(f"SUBMISSIONS must be a folder of student folders (got {args.submissions})")
    grades = grade_class(args.submissions, [o for o in args.only.split(",") if o], args.timeout)
    print(table(grades))
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["student", "exercise", "function", "passed", "message"])
            writer.writerows([g.student, g.exercise, g.function, g.passed, g.message] for g in grades)
    return 0


if __name__ == "__main__":
    sys.exit(main())
