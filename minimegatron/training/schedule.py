"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr`` (GPT-3, Megatron's default).

For optimizer step ``t = 0, 1, …, T-1`` (``T = steps``, ``W = warmup_steps``)::

    lr(t) = lr · (t + 1) / W                                           t < W
    lr(t) = min_lr + (lr - min_lr) · ½ · (1 + cos(π · (t - W) / (T - W)))  t ≥ W

so the first step already moves (``lr/W``), the peak ``lr`` is reached at ``t = W - 1`` or ``W``, and
the last step uses ``≈ min_lr``.
"""
from __future__ import annotations

import math

import torch


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(lr: float, min_lr: float, warmup_steps: int, total_steps: int):
    """``optimizer -> LambdaLR`` following :func:`lr_at` (DeepSpeed calls it with its optimizer and
    steps the scheduler after every optimizer step)."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        for group in optimizer.param_groups:
            group["lr"] = lr  # LambdaLR scales each group's initial lr by the factor below
        factor = lambda step: lr_at(step, lr, min_lr, warmup_steps, total_steps) / lr  # noqa: E731
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return make
