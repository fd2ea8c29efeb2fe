"""Exercises 01.1–01.4: references and hand-written solutions pass; the untouched stubs and every wrong
solution of the battery (exercises/_ex01_mistakes.py) fail with the message that names the mistake.
The whole battery is graded in one launch of 4 ranks (two TP groups of 2)."""
import inspect
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from exercises import _ex01_mistakes as M
from exercises import ex01_tensor_parallel as ex01
from exercises.grading import GradingError
from minimegatron.mpu import mappings


class MyF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.group = state.tp_group
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


class MyG(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=state.tp_group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def my_column(x, w, b, state):
    y = F.linear(MyF.apply(x, state), w, b)
    return mappings.gather_from_tensor_model_parallel_region(y, state)


def my_row(x, w, b, state):
    return MyG.apply(x @ w.t(), state) + b


def wrapped(reference):
    """The reference's numbers through a function of another name: graded, not refused as the reference."""
    return lambda *args: reference(*args)


GOOD = [("01.1", wrapped(mappings.copy_to_tensor_model_parallel_region)), ("01.1", MyF),
        ("01.2", wrapped(mappings.reduce_from_tensor_model_parallel_region)), ("01.2", MyG),
        ("01.3", wrapped(ex01.reference_column_parallel_linear)), ("01.3", my_column),
        ("01.4", wrapped(ex01.reference_row_parallel_linear)), ("01.4", my_row)]
STUBS = [("01.1", ex01.CopyToTensorParallelRegion), ("01.2", ex01.ReduceFromTensorParallelRegion),
         ("01.3", ex01.column_parallel_linear), ("01.4", ex01.row_parallel_linear)]
REFERENCES = [("01.3", ex01.reference_column_parallel_linear), ("01.4", ex01.reference_row_parallel_linear)]


@pytest.fixture(scope="module")
def verdicts():
    cases = [(part, c) for part, _, c, _ in M.BATTERY] + GOOD + STUBS + REFERENCES
    return dict(zip(range(len(cases)), ex01.battery_verdicts(cases)))


def test_references_and_hand_written_solutions_pass(verdicts):
    offset = len(M.BATTERY)
    for i, (part, _) in enumerate(GOOD):
        assert verdicts[offset + i].startswith(f"✓ Exercise {part}"), verdicts[offset + i]


def test_untouched_stubs_fail_with_not_implemented(verdicts):
    offset = len(M.BATTERY) + len(GOOD)
    for i, (part, _) in enumerate(STUBS):
        assert re.match(rf"not implemented yet: .*Exercise {part}", verdicts[offset + i]), verdicts[offset + i]


def test_the_reference_itself_is_refused(verdicts):
    offset = len(M.BATTERY) + len(GOOD) + len(STUBS)
    for i, (part, _) in enumerate(REFERENCES):
        assert re.match(rf"Exercise {part}: that is the reference itself", verdicts[offset + i])


@pytest.mark.parametrize("index", range(len(M.BATTERY)), ids=[f"{p} {n}" for p, n, _, _ in M.BATTERY])
def test_every_mistake_is_named(verdicts, index):
    part, _, _, message = M.BATTERY[index]
    assert not verdicts[index].startswith("✓"), f"a wrong solution passed: {verdicts[index]}"
    assert re.search(rf"Exercise {part}.*{message}", verdicts[index], re.S), verdicts[index]


def test_the_public_graders_grade_one_candidate_each():
    """The graders a notebook calls: the same checks, one candidate per launch, a short timeout."""
    assert ex01.grade_copy_to(MyF).startswith("✓ Exercise 01.1")
    with pytest.raises(GradingError, match=r"Exercise 01.4, rank 0 .*counted tp times"):
        ex01.grade_row_parallel_linear(M.row_bias_before_reduce)
    with pytest.raises(GradingError, match=r"not implemented yet.*Exercise 01.2"):
        ex01.grade_reduce_from(ex01.ReduceFromTensorParallelRegion)
    with pytest.raises(GradingError, match=r"Exercise 01.1: that is the reference itself"):
        ex01.grade_copy_to(mappings.copy_to_tensor_model_parallel_region)
    for grade in (ex01.grade_copy_to, ex01.grade_reduce_from, ex01.grade_column_parallel_linear,
                  ex01.grade_row_parallel_linear):
        assert inspect.signature(grade).parameters["timeout"].default <= 15
