"""Exercise 16's reference solutions: what the graders accept (the tests and the fault battery use them).
Read them after trying — each is the exercise's scaffold with the two methods filled in."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from exercises.ex16_data_parallel import BucketedDDP, Unit, Zero2AdamW, Zero3Model
from minimegatron.collectives import all_gather_into_tensor, reduce_scatter_tensor


class ReferenceBucketedDDP(BucketedDDP):
    def on_grad_ready(self, param: nn.Parameter) -> None:
        i, offset = self.bucket_of[param], self.offset_of[param]
        self.buffers[i][offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        self.ready[i] += 1
        if self.ready[i] == len(self.buckets[i]):  # full: send it while backward goes on
            self.handles.append(dist.all_reduce(self.buffers[i], group=self.group, async_op=True))

    def finish_grad_sync(self) -> None:
        for handle in self.handles:
            handle.wait()
        self.handles = []
        for i, bucket in enumerate(self.buckets):
            self.buffers[i] /= self.dp                 # the sum over replicas → the mean
            for p in bucket:
                offset = self.offset_of[p]
                p.grad.copy_(self.buffers[i][offset:offset + p.numel()].view_as(p))


class ReferenceZero2AdamW(Zero2AdamW):
    def on_grad_ready(self, param: nn.Parameter) -> None:
        i = self.bucket_of[param]
        self.ready[i] += 1
        if self.ready[i] == len(self.buckets[i]):
            lo, hi = self.shard_range[i]
            reduce_scatter_tensor(self.grad_shard[lo:hi], self.flat_grads(i), group=self.group)
            for p in self.buckets[i]:
                p.grad = None                          # only the 1/dp shard of the gradients stays

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        t, (b1, b2), lr = self.step_count, self.betas, self.lr
        g = self.grad_shard / self.dp                  # (Σ padded_i/dp,) this rank's slice of ḡ
        self.master.mul_(1 - lr * self.weight_decay)
        self.exp_avg.mul_(b1).add_(g, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.exp_avg_sq / (1 - b2 ** t)).sqrt_().add_(self.eps)
        self.master.addcdiv_(self.exp_avg, denom, value=-lr / (1 - b1 ** t))
        for i, (lo, hi) in enumerate(self.shard_range):
            full = torch.empty(self.padded[i])         # (padded_i,)
            all_gather_into_tensor(full, self.master[lo:hi], group=self.group)
            self.set_params(i, full)


class ReferenceZero3Model(Zero3Model):
    def gather(self, unit: Unit) -> None:
        full = torch.empty(unit.padded)                # (padded,)
        all_gather_into_tensor(full, unit.shard.detach(), group=unit.group)
        offset = 0
        for p, shape in zip(unit.params, unit.shapes):
            p.data = full[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()

    def release(self, unit: Unit) -> None:
        for p in unit.params:
            p.data = torch.empty(0)
