"""Exercise 07's battery: plausible wrong partitions and ZeRO-1 steps, each with the message its grader
must give. A step is :class:`Student` with its usual mistakes as switches."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from exercises.ex07_zero import Zero1AdamW
from minimegatron.collectives import all_gather_into_tensor, reduce_scatter_tensor


def partition(numel, dp, r, alignment=2, *, pad_to="alignment_dp", clip=False, shift=0):
    """The partition with the usual mistakes as switches (the defaults are right)."""
    multiple = {"alignment_dp": alignment * dp, "dp": dp, "alignment": alignment}[pad_to]
    padded = -(-numel // multiple) * multiple
    size = padded // dp if pad_to != "dp" else math.ceil(numel / dp)
    rank = (r + shift) % dp
    start, stop = rank * size, (rank + 1) * size
    return start, min(stop, numel) if clip else stop


def partition_with(**switches):
    def zero1_partition(numel, dp, dp_rank, alignment=2):
        return partition(numel, dp, dp_rank, alignment, **switches)
    return zero1_partition


PARTITION_BATTERY = [
    ("padded to dp only", partition_with(pad_to="dp"), r"you padded to a multiple of dp = \d only"),
    ("floor division", lambda numel, dp, r, alignment=2: (r * (numel // dp), (r + 1) * (numel // dp)),
     r"floor division drops the remainder|your slice has 0 elements"),
    ("stop clipped at numel", partition_with(clip=True), r"stop was clipped at numel"),
    ("ranks shifted by one", partition_with(shift=1), r"rank r owns slice r"),
    ("padded to alignment only", partition_with(pad_to="alignment"), r"padded to a multiple of alignment = 2 only"),
]


class Student(Zero1AdamW):
    """A plain ZeRO-1 step with the usual mistakes as switches (the defaults are right)."""

    mean = gather = bias_correction = decoupled = True
    all_reduce = decay_after = eps_inside = fixed_t = False

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        t, (b1, b2), dp = (1 if self.fixed_t else self.step_count), self.betas, self.state.dp
        grad = torch.zeros(self.padded)
        grad[:self.numel] = torch.cat([p.grad.reshape(-1) for p in self.params])
        if self.all_reduce:
            dist.all_reduce(grad, group=self.state.dp_group)
            g = grad[self.start:self.stop].clone()
        else:
            g = torch.empty_like(self.master)
            reduce_scatter_tensor(g, grad, group=self.state.dp_group)
        if self.mean:
            g /= dp
        if not self.decoupled:
            g = g + self.weight_decay * self.master
        elif not self.decay_after:
            self.master *= 1 - self.lr * self.weight_decay
        self.exp_avg.mul_(b1).add_((1 - b1) * g)
        self.exp_avg_sq.mul_(b2).add_((1 - b2) * g * g)
        c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if self.bias_correction else (1.0, 1.0)
        denom = (self.exp_avg_sq / c2 + self.eps).sqrt() if self.eps_inside else (self.exp_avg_sq / c2).sqrt() + self.eps
        self.master -= self.lr / c1 * self.exp_avg / denom
        if self.decoupled and self.decay_after:
            self.master *= 1 - self.lr * self.weight_decay
        flat = torch.cat([p.detach().reshape(-1) for p in self.params] + [torch.zeros(self.padded - self.numel)])
        if self.gather:
            all_gather_into_tensor(flat, self.master, group=self.state.dp_group)
        else:
            flat[self.start:self.stop] = self.master
        offset = 0
        for p in self.params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def step_with(**switches):
    return type("MyZero1AdamW", (Student,), switches)


STEP_BATTERY = [
    ("the sum, not the mean", step_with(mean=False), r"exp_avg is 2× Adam's .* divide by dp"),
    ("no all-gather", step_with(gather=False), r"the ranks hold different weights .*all-gather"),
    ("all-reduce instead of reduce-scatter", step_with(all_reduce=True), r"your step all-reduces"),
    ("no bias correction", step_with(bias_correction=False), r"Adam's bias correction is missing"),
    ("L2, not decoupled decay", step_with(decoupled=False), r"weight decay was added to the gradient"),
    ("decay after the update", step_with(decay_after=True), r"applied after the Adam update"),
    ("eps inside the root", step_with(eps_inside=True), r"eps inside the square root"),
    ("t fixed at 1", step_with(fixed_t=True), r"uses t = 1 at every step"),
]
