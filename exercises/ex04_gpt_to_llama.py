"""Exercise 04: two of LLaMA's changes to GPT, written by hand.

04.1  rms_norm(x, weight, eps) — RMSNorm (Zhang & Sennrich 2019) over the last dim::

          y = x / sqrt(mean(x²) + eps) · weight

      No mean subtraction and no bias (that is what makes it cheaper than LayerNorm). Compute in fp32
      and return the input's dtype.

04.2  apply_rope(x, position_ids, theta) — rotary position embedding on ``x`` (s, b, n, d) for the
      positions ``position_ids`` (b, s)::

          θ_i = theta^(-2i/d), i = 0 … d/2-1;   angle(m, i) = m·θ_i
          pair dimension i with i + d/2 (Hugging Face's "rotate_half" layout):
          y[..., i]       = x[..., i]·cos(angle) - x[..., i + d/2]·sin(angle)
          y[..., i + d/2] = x[..., i + d/2]·cos(angle) + x[..., i]·sin(angle)

      (The original Meta code pairs (2i, 2i + 1) instead; HF permuted its checkpoints so that the
      halves layout works. Use the halves layout.)

Grade with:  grade_rms_norm(rms_norm)    grade_apply_rope(apply_rope)
The references are minimegatron.layers.norms.RMSNorm and minimegatron.layers.positions
(RotaryEmbedding + apply_rotary); outputs and gradients are compared.
"""
from __future__ import annotations

from typing import Callable

import torch

from exercises import _ex04_checks as M
from exercises.battery import refuse_reference
from exercises.grading import GradingError, assert_close, call_candidate, grader, kind_of, passed, run_isolated
from minimegatron import kernels
from minimegatron.layers.norms import RMSNorm
from minimegatron.layers.positions import RotaryEmbedding, apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Your code (04.1): x / sqrt(mean(x², last dim) + eps) · weight, in fp32, back to x's dtype."""
    raise NotImplementedError("Exercise 04.1: implement RMSNorm — x * rsqrt(mean(x**2, -1) + eps) * weight")


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Your code (04.2): rotate x (s, b, n, d) by the angles of position_ids (b, s), halves layout."""
    # Hint: angles = position_ids.t()[..., None] * inv_freq has shape (s, b, d/2); add a head dim.
    raise NotImplementedError("Exercise 04.2: implement RoPE — inv_freq = theta^(-2i/d), angles = m·θ_i, "
                              "then x·cos + rotate_half(x)·sin with pairs (i, i + d/2)")


# --- grading -----------------------------------------------------------------------------------------

TIMEOUT = 10.0  # s: a few small tensors in one process

def _check_with_grads(exercise: str, where: str, candidate: Callable, args: tuple, reference: Callable,
                      inputs: list[torch.Tensor], names: list[str], mistakes: list | None = None) -> None:
    """``candidate(*inputs, *args)`` against ``reference(*inputs)``: the output, then every gradient.
    ``mistakes``: (model(*inputs) -> the output that mistake gives, message): a wrong output that
    matches one is named."""
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ref_leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    place = f"{exercise} ({where})"
    got = call_candidate(place, candidate, *leaves, *args, exercise=exercise)
    expected = reference(*ref_leaves)
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype and \
            not torch.allclose(got.detach(), expected.detach(), rtol=1e-5, atol=1e-5):
        for model, message in mistakes or []:
            if torch.allclose(got.detach().float(), model(*inputs).float(), rtol=1e-4, atol=1e-5):
                raise GradingError(f"{place}: {message}")
    assert_close(f"{place}: output", got, expected.detach(), rtol=1e-5, atol=1e-5)
    if not got.requires_grad:
        raise GradingError(f"{place}: the output is not connected to the autograd graph "
                           "(.detach(), .data or torch.no_grad()?)")
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    call_candidate(f"{place}, backward", lambda: (got.float() * cotangent).sum().backward(),
                   exercise=exercise)
    (expected.float() * cotangent).sum().backward()
    for name, a, b in zip(names, leaves, ref_leaves):
        if b.grad is not None:
            if a.grad is None:
                raise GradingError(f"{place}: no gradient reached {name}")
            assert_close(f"{place}: gradient of {name}", a.grad, b.grad, rtol=1e-4, atol=1e-5)


@grader
def grade_rms_norm(candidate: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
                   timeout: float = TIMEOUT) -> str:
    """04.1 on several shapes, scales and eps: output and the gradients of x and weight.

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    refuse_reference("Exercise 04.1", candidate, kernels.rms_norm, RMSNorm)
    return run_isolated(_grade_rms_norm, candidate, timeout=timeout, role="rms_norm")


def _grade_rms_norm(candidate: Callable) -> str:
    g = torch.Generator().manual_seed(0)
    for shape, scale, eps in (((4, 2, 16), 1.0, 1e-5), ((3, 32), 50.0, 1e-6), ((5, 8), 1e-3, 1e-2)):
        x = scale * torch.randn(shape, generator=g) + 0.5  # a non-zero mean, so centring shows
        weight = 1 + 0.3 * torch.randn(shape[-1], generator=g)

        def reference(x, weight, eps=eps):
            norm = RMSNorm(shape[-1], eps)
            return torch.func.functional_call(norm, {"weight": weight}, (x,))

        mistakes = M.rms_mistakes(eps)
        _check_with_grads("Exercise 04.1", f"x of shape {shape}, scale {scale:g}, eps {eps:g}",
                          candidate, (eps,), reference, [x, weight], ["x", "weight"], mistakes)
    x16 = torch.randn(4, 16, generator=g).to(torch.bfloat16)
    where = "Exercise 04.1 (a bfloat16 x of shape (4, 16))"
    out = call_candidate(where, candidate, x16, torch.ones(16, dtype=torch.bfloat16), 1e-5,
                         exercise="Exercise 04.1")
    if not isinstance(out, torch.Tensor):
        raise GradingError(f"{where}: expected a torch.Tensor, got {kind_of(out)}")
    if tuple(out.shape) != (4, 16):
        raise GradingError(f"{where}: wrong shape {tuple(out.shape)}, expected (4, 16)")
    if out.dtype != torch.bfloat16:
        raise GradingError(f"Exercise 04.1: a bfloat16 input came back as {out.dtype}; return x's dtype")
    return passed("Exercise 04.1: RMSNorm matches minimegatron.layers.norms.RMSNorm, forward and backward")


@grader
def grade_apply_rope(candidate: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
                     timeout: float = TIMEOUT) -> str:
    """04.2 for several shapes, thetas and position ids: output and the gradient of x.

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    refuse_reference("Exercise 04.2", candidate, apply_rotary)
    return run_isolated(_grade_apply_rope, candidate, timeout=timeout, role="apply_rope")


def _grade_apply_rope(candidate: Callable) -> str:
    g = torch.Generator().manual_seed(0)
    cases = [((6, 2, 3, 8), 10000.0, torch.arange(6).expand(2, 6)),
             ((5, 1, 2, 16), 500000.0, torch.arange(7, 12)[None]),  # after 7 cached tokens
             ((4, 2, 1, 4), 10000.0, torch.tensor([[0, 3, 1, 9], [2, 2, 5, 100]]))]
    for shape, theta, position_ids in cases:
        x = torch.randn(shape, generator=g)

        def reference(x, position_ids=position_ids, theta=theta):
            return apply_rotary(x, *RotaryEmbedding(shape[-1], theta)(position_ids))

        mistakes = M.rope_mistakes(position_ids, theta)
        where = f"x {shape}, theta {theta:g}, positions {position_ids.tolist()}"
        _check_with_grads("Exercise 04.2", where, candidate, (position_ids, theta), reference, [x], ["x"],
                          mistakes)
    return passed("Exercise 04.2: RoPE matches minimegatron.layers.positions, forward and backward")
