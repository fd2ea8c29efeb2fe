"""Cross-entropy over a vocabulary split across tensor-parallel ranks — without gathering the logits.

Rank i holds the logit columns ``[start_i, end_i)`` of the (padded) vocabulary ``V``. For one token
with logits ``z`` and target ``t`` the loss is ``ℓ = log Σ_v exp(z_v) − z_t``. Three all-reduces of
one number per token compute it (Shoeybi et al. 2019, §3, "fuse the output GEMM with the loss"):

1. ``m = max_v z_v``           all-reduce MAX of each rank's local max; subtracting it keeps every
                               ``exp(z_v − m) ≤ 1`` (no overflow, the result is unchanged);
2. ``z_t − m``                 all-reduce SUM: only the rank that owns ``t`` contributes, others add 0;
3. ``S = Σ_v exp(z_v − m)``   all-reduce SUM of each rank's partial sum;

then ``ℓ = log S − (z_t − m)``. All ranks hold ℓ for every token: (b·s) numbers moved, not (b·s·V).

Backward needs no communication: ``∂ℓ/∂z_v = softmax(z)_v − 1[v = t]``, and each rank already has
``exp(z_v − m) / S`` for its own columns; the owner of ``t`` subtracts 1 at that column.

Padded vocab columns (``≥ vocab_size``) are set to −inf: probability 0, gradient 0. Targets equal to
``ignore_index`` get loss 0 and gradient 0. The math is fp32 whatever the logits' dtype.

Targets out of range are checked by :func:`validate_targets`, which reads on the host (a device
sync): the data side checks its token ids before ranks start (``training.args.check_token_range``),
and ``check_targets=True`` runs it on every call, for debugging. The hot path has static shapes only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from minimegatron.mpu.state import ParallelState

__all__ = ["vocab_parallel_cross_entropy", "validate_targets"]


def _all_reduce_(x: torch.Tensor, state: ParallelState, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if state.tp > 1:
        dist.all_reduce(x, op=op, group=state.tp_group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """One (…, V/tp) fp32 buffer: shifted logits → exp → softmax in place (saved for backward)."""

    @staticmethod
    def forward(ctx, logits, target, state, vocab_size, ignore_index):
        in_dtype = logits.dtype
        part = logits.size(-1)
        start, end = state.tp_rank * part, (state.tp_rank + 1) * part
        logits = logits.float()  # (…, V/tp), fp32 math (no copy when already fp32)
        first_pad = max(vocab_size - start, 0)  # local column where padding starts (if vocab_size < end)

        # 1. the global max over the whole vocabulary (padding columns excluded)
        real = logits if vocab_size >= end else logits[..., :first_pad]  # (…, real cols of this shard)
        logits_max = (real.max(dim=-1).values if real.size(-1)
                      else logits.new_full(logits.shape[:-1], -torch.inf))  # (…)
        _all_reduce_(logits_max, state, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)  # (…, V/tp), every real entry ≤ 0
        if vocab_size < end:  # padding columns must never get probability
            shifted[..., first_pad:] = float("-inf")

        # 2. the target's logit, from the one rank that owns it
        outside = (target < start) | (target >= end)  # (…) targets (and ignore_index) owned elsewhere
        local_target = (target - start).masked_fill(outside, 0)  # (…) column in this shard
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)  # (…)
        target_logit = target_logit.masked_fill(outside, 0.0)
        _all_reduce_(target_logit, state)

        # 3. the normaliser Σ exp over the whole vocabulary, then softmax — in place in `shifted`
        exp_logits = shifted.exp_()  # (…, V/tp); padded columns give exp(−inf) = 0
        sum_exp = exp_logits.sum(dim=-1)  # (…)
        _all_reduce_(sum_exp, state)

        ignored = target == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)  # (…)
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))  # (…, V/tp)
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        ctx.in_dtype = in_dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside, ignored = ctx.saved_tensors
        scale = grad_loss.float().masked_fill(ignored, 0.0).unsqueeze(-1)  # (…, 1)
        grad = softmax * scale  # (…, V/tp), a new tensor: softmax stays intact for a second backward
        owns = (~outside).to(grad.dtype).unsqueeze(-1)  # (…, 1): one_hot(target) lives on its owner
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -owns * scale)  # softmax − one_hot
        return grad.to(ctx.in_dtype), None, None, None, None


def validate_targets(target: torch.Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Raise a ValueError naming a target outside [0, vocab_size) that is not ``ignore_index``.

    Static shapes (a mask, no boolean indexing); reads on the host only when a target is bad.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))  # (…)
    if bool(bad.any()):
        worst = torch.where(bad, target, 0)  # (…) the bad ids, 0 elsewhere
        hi, lo = int(worst.max()), int(worst.min())
        raise ValueError(f"target token id {hi if hi >= vocab_size else lo} is outside the vocabulary "
                         f"[0, {vocab_size}) (and is not ignore_index={ignore_index}); check the labels "
                         f"and the model's vocab_size")


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, state: ParallelState,
                                 vocab_size: int | None = None, ignore_index: int = -100,
                                 check_targets: bool = False) -> torch.Tensor:
    """Per-token loss (…) from this rank's logit shard (…, V_pad/tp) and the full targets (…).

    Equals ``F.cross_entropy(full_logits[..., :vocab_size], target, reduction="none",
    ignore_index=ignore_index)`` with the full logits never built. ``vocab_size=None`` means no padding.
    Every TP rank passes the same ``target`` and gets the same loss. Bad arguments raise before any
    collective; bad target ids too with ``check_targets=True`` (a host sync: off in the hot path).
    """
    padded = logits.size(-1) * state.tp
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded}] (the padded vocab: "
                         f"{logits.size(-1)} logit columns on each of {state.tp} TP ranks)")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match the logits' "
                         f"{tuple(logits.shape[:-1])} (logits are (…, V_pad/tp), targets (…))")
    if target.is_floating_point():
        raise TypeError(f"targets must be integer token ids, got dtype {target.dtype}")
    if check_targets:
        validate_targets(target, vocab_size, ignore_index)
    return _VocabParallelCrossEntropy.apply(logits, target, state, vocab_size, ignore_index)
