"""Exercises 02.1–02.2: references and hand-written solutions pass; the untouched stubs and every wrong
solution of the battery (exercises/_ex02_mistakes.py) fail with the message that names the mistake.
02.1's whole battery is graded in one launch of 4 ranks (two TP groups of 2)."""
import re

import pytest
import torch

from exercises import _ex02_mistakes as M
from exercises import ex02_parallel_mlp as ex02
from exercises.grading import GradingError
from minimegatron.mpu.layers import shard_weight

GOOD = [lambda *a: ex02.package_parallel_mlp_forward(*a), M.mlp]


@pytest.fixture(scope="module")
def verdicts():
    return ex02.battery_verdicts([b[1] for b in M.MLP_BATTERY] + GOOD + [ex02.parallel_mlp_forward,
                                                                          ex02.package_parallel_mlp_forward])


def test_references_pass_the_stub_and_the_reference_itself_fail(verdicts):
    *good, stub, reference = verdicts[len(M.MLP_BATTERY):]
    assert all(v.startswith("✓ Exercise 02.1") for v in good), good
    assert re.match(r"not implemented yet: .*Exercise 02.1", stub), stub
    assert re.match(r"Exercise 02.1: that is the reference itself", reference), reference


@pytest.mark.parametrize("index", range(len(M.MLP_BATTERY)), ids=[b[0] for b in M.MLP_BATTERY])
def test_every_mlp_mistake_is_named(verdicts, index):
    assert re.search(rf"^Exercise 02.1, rank \d .*{M.MLP_BATTERY[index][2]}", verdicts[index], re.S), verdicts[index]


def test_the_public_mlp_grader():
    with pytest.raises(GradingError, match=r"Exercise 02.1, rank 0 .*b2 was added 2 times"):
        ex02.grade_parallel_mlp_forward(M.switched(bias="before"))
    assert ex02.TIMEOUT <= 15


def test_qkv_references_pass_and_the_stub_fails():
    assert ex02.grade_fused_qkv_rows(lambda h, r, tp: shard_weight(torch.arange(3 * h), 0, r, tp, 3)).startswith("✓")
    assert ex02.grade_fused_qkv_rows(M.blocks).startswith("✓")
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 02.2"):
        ex02.grade_fused_qkv_rows(ex02.fused_qkv_rows)


@pytest.mark.parametrize("entry", M.QKV_BATTERY, ids=[b[0] for b in M.QKV_BATTERY])
def test_every_qkv_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"^Exercise 02.2 \(hidden_size=\d+, tp=\d, rank \d\): {entry[2]}"):
        ex02.grade_fused_qkv_rows(entry[1])
