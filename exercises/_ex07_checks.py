"""Exercise 07's grader internals: the usual wrong partitions (07.1) and wrong AdamW steps (07.2), each
as the result it gives, and its message. 07.2's variants are AdamW written out on one model and the
whole batch (no torch.optim, no parallelism), one formula changed each. Nothing here is the exercise."""
from __future__ import annotations

import math
from typing import Callable

import torch


def partition_mistakes(numel: int, dp: int, r: int, alignment: int = 2) -> list[tuple[tuple[int, int], str]]:
    def slices(size, rank=r):
        return rank * size, (rank + 1) * size

    return [
        (slices(math.ceil(numel / dp)), f"you padded to a multiple of dp = {dp} only: DeepSpeed pads to a multiple of "
                                        f"alignment·dp = {alignment * dp} (aligned slices)"),
        (slices(numel // dp), "floor division drops the remainder: pad the flat vector up to a multiple of "
                              "alignment·dp, then cut dp equal slices"),
        ((slices(-(-numel // (alignment * dp)) * alignment)[0], min(slices(-(-numel // (alignment * dp))
                                                                            * alignment)[1], numel)),
         "stop was clipped at numel: the last slices run into the padding (every rank's slice has the same size)"),
        (slices(-(-numel // (alignment * dp)) * alignment, (r + 1) % dp), "rank r owns slice r (ranks count from "
                                                                          "0), not slice r + 1"),
        (slices(-(-numel // alignment) * alignment // dp), f"padded to a multiple of alignment = {alignment} only, "
                                                           f"then divided by dp: pad to alignment·dp = {alignment * dp}"),
    ]


def adam_variants(model_fn: Callable, batches: list, adam: dict, steps: int) -> dict[str, list[torch.Tensor]]:
    """Each variant's flat parameters after every step, AdamW by hand on the whole batch."""
    out = {}
    for variant in ("no_bias_correction", "l2", "no_decay", "decay_after", "t_fixed", "eps_inside"):
        model = model_fn()
        params = [p for p in model.parameters()]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        (b1, b2), lr, eps, wd = adam["betas"], adam["lr"], adam["eps"], adam["weight_decay"]
        trajectory = []
        for step in range(steps):
            x, y = batches[step]
            model.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            t = 1 if variant == "t_fixed" else step + 1
            with torch.no_grad():
                for p, mi, vi in zip(params, m, v):
                    g = p.grad + (wd * p if variant == "l2" else 0)
                    if variant not in ("l2", "no_decay", "decay_after"):
                        p.mul_(1 - lr * wd)
                    mi.mul_(b1).add_(g, alpha=1 - b1)
                    vi.mul_(b2).addcmul_(g, g, value=1 - b2)
                    c1, c2 = (1.0, 1.0) if variant == "no_bias_correction" else (1 - b1 ** t, 1 - b2 ** t)
                    denom = (vi / c2 + eps).sqrt() if variant == "eps_inside" else (vi / c2).sqrt() + eps
                    p.sub_(lr / c1 * mi / denom)
                    if variant == "decay_after":
                        p.mul_(1 - lr * wd)
            trajectory.append(torch.cat([p.detach().reshape(-1) for p in params]))
        out[variant] = trajectory
    return out


ADAM_MESSAGES = {
    "no_bias_correction": "Adam's bias correction is missing: divide m by (1 − β1^t) and v by (1 − β2^t)",
    "l2": "weight decay was added to the gradient (Adam with L2): AdamW decays the weights directly, "
          "master ← master·(1 − lr·weight_decay), before the update",
    "no_decay": "the weight decay is missing: master ← master·(1 − lr·weight_decay)",
    "decay_after": "the weight decay was applied after the Adam update: torch's AdamW decays first",
    "t_fixed": "the bias correction uses t = 1 at every step: t = self.step_count",
    "eps_inside": "eps inside the square root: sqrt(v̂) + eps",
}
