"""The student edition: stubs and forwarding graders only; its stubs fail and correct solutions pass the
instructor's graders (a separate package); without that package a grader says so in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exercises import student_edition as se
from exercises.grade_class import exercise_modules, graded_pairs

ROOT = Path(__file__).resolve().parents[2]

# correct solutions, written here (the student edition has none)
SOLUTIONS = '''
import torch, torch.distributed as dist
import exercises.ex04_gpt_to_llama as ex04, exercises.ex00_collectives as ex00, exercises.ex13_gaudi as ex13
from exercises.grading import GradingError

def rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

def via_halves(x, group=None):
    n = dist.get_world_size(group)
    flat = x.reshape(-1)
    c = -(-flat.numel() // n)
    padded = torch.cat([flat, flat.new_zeros(n * c - flat.numel())])
    mine = padded.new_empty(c)
    dist.reduce_scatter_tensor(mine, padded, group=group)
    whole = padded.new_empty(n * c)
    dist.all_gather_into_tensor(whole, mine, group=group)
    return whole[:flat.numel()].reshape(x.shape)

def mfu(tokens_per_s, num_cards, n_params, num_layers, hidden_size, seq_len, peak_tflops, attention=True):
    flops = 6 * n_params + (12 * num_layers * hidden_size * seq_len if attention else 0)
    return flops * tokens_per_s / num_cards / (peak_tflops * 1e12)

results = {}
for name, grade, candidate in [("rms stub", ex04.grade_rms_norm, ex04.rms_norm), ("rms", ex04.grade_rms_norm, rms),
                               ("halves", ex00.grade_all_reduce_via_reduce_scatter_all_gather, via_halves),
                               ("mfu stub", ex13.grade_model_flops_utilization, ex13.model_flops_utilization),
                               ("mfu", ex13.grade_model_flops_utilization, mfu)]:
    try:
        results[name] = "pass: " + grade(candidate).splitlines()[0]
    except GradingError as err:
        results[name] = "fail: " + str(err).splitlines()[0]
print(repr(results))
'''


@pytest.fixture(scope="module")
def edition(tmp_path_factory):
    out = tmp_path_factory.mktemp("edition") / "course"
    counts = se.build(out)
    assert counts["exercise modules"] == len(exercise_modules()) and counts["left out"] > 0
    return out


def _run(code, *paths, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return eval(done.stdout.strip().splitlines()[-1])


def test_the_student_copy_has_stubs_and_no_answers(edition):
    student = edition / "student"
    assert not (student / "tests" / "exercises").exists()
    assert [p.name for p in (student / "exercises").glob("_ex*.py")] == ["_ex16_given.py"]  # helpers a stub uses
    assert not (student / "exercises" / "student_edition.py").exists()
    for module in exercise_modules():
        text = (student / "exercises" / f"{module}.py").read_text()
        assert "def reference_" not in text and "class Reference" not in text, module
        for grader, candidate in graded_pairs(module):
            assert f"{grader} = _instructor_grader(" in text.replace("(\n    ", "("), (module, grader)
            assert f"def {candidate}" in text or f"class {candidate}" in text, (module, candidate)
    assert (edition / "grader" / "minimegatron_grader" / "ex01_tensor_parallel.py").is_file()
    imports = "import importlib; print(repr([importlib.import_module('exercises.' + m).__name__ for m in %r]))"
    assert _run(imports % exercise_modules(), student, cwd=student) == [f"exercises.{m}" for m in exercise_modules()]


def test_stubs_fail_and_solutions_pass_the_instructors_graders(edition):
    got = _run(SOLUTIONS, edition / "student", edition / "grader", cwd=edition / "student")
    assert got["rms stub"].startswith("fail: Exercise 04.1 is not implemented yet")
    assert got["mfu stub"].startswith("fail: Exercise 13.1 is not implemented yet")
    assert got["rms"].startswith("pass: ✓") and got["mfu"].startswith("pass: ✓")
    assert got["halves"].startswith("pass: ✓"), got["halves"]


def test_without_the_grader_package_a_grader_says_where_it_is(edition):
    got = _run(SOLUTIONS, edition / "student", cwd=edition / "student")
    assert got["rms"] == ("fail: this is a student edition: its graders are in your instructor's "
                          "'minimegatron_grader' package, which is not installed here — pip install the "
                          "grader folder or wheel you were given (or ask for it)")


def test_solution_cells_are_left_out(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": "x = 1", "outputs": [], "execution_count": None},
                    {"cell_type": "code", "metadata": {"tags": ["solution"]}, "source": "answer()", "outputs": [],
                     "execution_count": None}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(nb))
    assert se._strip_solutions(path) == 1
    assert [c["source"] for c in json.loads(path.read_text())["cells"]] == ["x = 1"]


def test_an_existing_folder_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not empty"):
        se.build(tmp_path)
