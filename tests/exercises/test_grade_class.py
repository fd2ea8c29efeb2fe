"""Grading a class: a folder per student, the instructor's graders, one row per graded function."""
import ast
from pathlib import Path

import pytest

from exercises import grade_class as gc

ROOT = Path(__file__).resolve().parents[2]

SOLVED_EX04 = '''
import torch
from exercises.ex04_gpt_to_llama import *  # noqa: F401,F403  (what a student's copy also has)
from minimegatron.layers.positions import RotaryEmbedding, apply_rotary

def rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

def apply_rope(x, position_ids, theta):
    return apply_rotary(x, *RotaryEmbedding(x.size(-1), theta)(position_ids))
'''
# a student who "fixes" the grader in their own copy: the instructor's grader still grades
CHEATS_EX04 = (ROOT / "exercises/ex04_gpt_to_llama.py").read_text() + '''

def grade_rms_norm(candidate, *a, **k):
    return "✓ all good"
'''


def test_every_grader_of_every_exercise_has_its_candidate():
    for module in gc.exercise_modules():
        source = (ROOT / "exercises" / f"{module}.py").read_text()
        graders = {n.name for n in ast.parse(source).body
                   if isinstance(n, ast.FunctionDef) and n.name.startswith("grade_")}
        pairs = gc.graded_pairs(module)
        assert {g for g, _ in pairs} == graders, module
    assert ("grade_copy_to", "CopyToTensorParallelRegion") in gc.graded_pairs("ex01_tensor_parallel")


def test_a_class_of_four(tmp_path, capsys):
    for student, text in [("ada", SOLVED_EX04), ("bo", (ROOT / "exercises/ex04_gpt_to_llama.py").read_text()),
                          ("cy", "def rms_norm(:\n"), ("di", CHEATS_EX04)]:
        (tmp_path / "class" / student).mkdir(parents=True)
        (tmp_path / "class" / student / "ex04_gpt_to_llama.py").write_text(text)
    (tmp_path / "class" / "ada" / "notes.py").write_text("not an exercise")
    assert gc.main([str(tmp_path / "class"), "--csv", str(tmp_path / "grades.csv")]) == 0
    out = capsys.readouterr().out
    rows = (tmp_path / "grades.csv").read_text().splitlines()
    assert rows[0] == "student,exercise,function,passed,message" and len(rows) == 1 + 4 * 2
    got = {(r.split(",")[0], r.split(",")[2]): r.split(",")[3] for r in rows[1:]}
    assert got == {("ada", "apply_rope"): "True", ("ada", "rms_norm"): "True",
                   ("bo", "apply_rope"): "False", ("bo", "rms_norm"): "False",
                   ("cy", "apply_rope"): "False", ("cy", "rms_norm"): "False",
                   ("di", "apply_rope"): "False", ("di", "rms_norm"): "False"}
    assert "ada: 2/2 passed" in out and "bo: 0/2 passed" in out
    assert "not implemented yet" in out and "the file does not import: SyntaxError" in out


def test_no_submissions_is_one_line(tmp_path):
    (tmp_path / "empty" / "ada").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no exercise files under"):
        gc.main([str(tmp_path / "empty")])


def test_a_file_that_hangs_is_stopped_and_failed(tmp_path):
    (tmp_path / "ada").mkdir()
    (tmp_path / "ada" / "ex13_gaudi.py").write_text("import time\ntime.sleep(600)\n")
    grades = gc.grade_class(tmp_path, timeout=3)
    assert [(g.function, g.passed) for g in grades] == [("model_flops_utilization", False)]
    assert "took longer than 3 s: it was stopped" in grades[0].message
