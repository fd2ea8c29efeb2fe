"""FixedTimeLayer: a pipeline stage whose forward, backward (and weight-gradient pass) take fixed times.

The bubble formulas assume equal, steady compute per micro-batch and stage. A tiny model's compute is
a few hundred µs and jittery next to DeepSpeed's per-instruction overhead and the send/recv latency
(which the formulas ignore), so a measured bubble would mostly measure overhead. Sleeping a fixed
time makes compute dominate, on any machine and on 2 cores with 4 ranks (sleep needs no core)::

    FixedTimeLayer(forward_s=T_F, backward_s=T_B)                 1F1B: F = T_F, B = T_B
    FixedTimeLayer(forward_s=T_F, backward_s=T_B, weight_s=T_W)   the backward split in two: B = T_B
        (∂L/∂X) and W = T_W (∂L/∂W) — deferred into a W pass when the layer's ``weight_grad_store``
        defers (``pipe_engine``'s ZB-H1), else slept right after B: one backward of T_B + T_W
"""
from __future__ import annotations

import time

import torch
from torch import nn

from minimegatron.mpu.weight_grad import WeightGradStore, defer_or_compute

__all__ = ["FixedTimeLayer"]


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s, backward_s, weight_s, store):
        time.sleep(forward_s)
        ctx.backward_s, ctx.weight_s, ctx.store = backward_s, weight_s, store
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)  # B
        if ctx.weight_s:  # W: now, or queued for the W pass
            defer_or_compute(ctx.store, lambda: (time.sleep(ctx.weight_s), ())[1], ())
        return grad, None, None, None, None


class FixedTimeLayer(nn.Module):
    """A tiny linear layer whose forward takes ``forward_s``, backward ``backward_s`` (+ ``weight_s``)."""

    weight_grad_store: WeightGradStore | None = None  # set by pipe_engine.use_pipeline_schedule

    def __init__(self, forward_s: float = 0.05, backward_s: float = 0.1, width: int = 4,
                 weight_s: float = 0.0) -> None:
        super().__init__()
        self.forward_s, self.backward_s, self.weight_s = forward_s, backward_s, weight_s
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(self.linear(x), self.forward_s, self.backward_s, self.weight_s,
                            self.weight_grad_store)
