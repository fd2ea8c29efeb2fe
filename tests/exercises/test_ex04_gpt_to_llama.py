"""Exercises 04.1–04.2: the package passes its graders; stubs and typical mistakes fail precisely."""
import pytest
import torch

from exercises import ex04_gpt_to_llama as ex04
from exercises.grading import GradingError
from minimegatron.layers.positions import RotaryEmbedding, apply_rotary, rotate_half


def _rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, position_ids, theta):
    return apply_rotary(x, *RotaryEmbedding(x.size(-1), theta)(position_ids))


def test_references_pass():
    assert ex04.grade_rms_norm(_rms).startswith("✓")
    assert ex04.grade_apply_rope(_rope).startswith("✓")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="Exercise 04.1 is not implemented yet"):
        ex04.grade_rms_norm(ex04.rms_norm)
    with pytest.raises(GradingError, match="Exercise 04.2 is not implemented yet"):
        ex04.grade_apply_rope(ex04.apply_rope)


def test_layernorm_instead_of_rmsnorm_is_named():
    def centred(x, weight, eps):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, None, eps)

    with pytest.raises(GradingError, match="this is LayerNorm"):
        ex04.grade_rms_norm(centred)


def test_eps_outside_the_square_root_is_a_wrong_value():
    def eps_outside(x, weight, eps):
        return weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps)

    with pytest.raises(GradingError, match=r"Exercise 04.1 \(x of shape .*\): output: wrong values"):
        ex04.grade_rms_norm(eps_outside)


def test_fp32_output_for_bf16_input_is_named():
    with pytest.raises(GradingError, match="bfloat16 input came back as torch.float32"):
        ex04.grade_rms_norm(lambda x, w, eps: _rms(x.float(), w.float(), eps))


def test_interleaved_pairs_are_recognised():
    with pytest.raises(GradingError, match=r"interleaved pairs \(2i, 2i\+1\)"):
        ex04.grade_apply_rope(ex04._interleaved_rope)


def test_ignoring_the_position_ids_fails_on_the_cached_case():
    def from_zero(x, position_ids, theta):
        return _rope(x, torch.arange(x.size(0)).expand(x.size(1), -1), theta)

    with pytest.raises(GradingError, match=r"Exercise 04.2 \(x \(5, 1, 2, 16\).*output: wrong values"):
        ex04.grade_apply_rope(from_zero)


def test_rotating_the_wrong_way_fails():
    def backwards(x, position_ids, theta):
        cos, sin = RotaryEmbedding(x.size(-1), theta)(position_ids)
        return x * cos - rotate_half(x) * sin

    with pytest.raises(GradingError, match="Exercise 04.2.*wrong values"):
        ex04.grade_apply_rope(backwards)
