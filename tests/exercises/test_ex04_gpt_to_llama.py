"""Exercises 04.1–04.2: the package and hand-written solutions pass; the stubs, the package's own
functions and every wrong solution of the battery (exercises/_ex04_mistakes.py) fail with the message
that names the mistake."""
import pytest
import torch

from exercises import _ex04_mistakes as M
from exercises import ex04_gpt_to_llama as ex04
from exercises._ex04_checks import rope
from exercises.grading import GradingError
from minimegatron import kernels
from minimegatron.layers.positions import RotaryEmbedding, apply_rotary


def _rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, position_ids, theta):
    return apply_rotary(x, *RotaryEmbedding(x.size(-1), theta)(position_ids))


def test_references_and_hand_written_solutions_pass():
    assert ex04.grade_rms_norm(_rms).startswith("✓")
    assert ex04.grade_rms_norm(lambda x, w, eps: kernels.rms_norm(x, w, eps)).startswith("✓")
    assert ex04.grade_apply_rope(_rope).startswith("✓")
    assert ex04.grade_apply_rope(rope).startswith("✓")


def test_untouched_stubs_fail_and_the_package_itself_is_refused():
    with pytest.raises(GradingError, match="Exercise 04.1 is not implemented yet"):
        ex04.grade_rms_norm(ex04.rms_norm)
    with pytest.raises(GradingError, match="Exercise 04.2 is not implemented yet"):
        ex04.grade_apply_rope(ex04.apply_rope)
    with pytest.raises(GradingError, match=r"Exercise 04.1: that is the reference itself \(minimegatron.kernels"):
        ex04.grade_rms_norm(kernels.rms_norm)
    assert ex04.TIMEOUT <= 10


@pytest.mark.parametrize("entry", M.RMS_BATTERY, ids=[b[0] for b in M.RMS_BATTERY])
def test_every_rms_norm_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"^Exercise 04.1.*{entry[2]}"):
        ex04.grade_rms_norm(entry[1])


@pytest.mark.parametrize("entry", M.ROPE_BATTERY, ids=[b[0] for b in M.ROPE_BATTERY])
def test_every_rope_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"^Exercise 04.2 .*{entry[2]}"):
        ex04.grade_apply_rope(entry[1])
