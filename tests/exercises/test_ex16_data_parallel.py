"""Exercises 16.1–16.3: the references and hand-written solutions pass their graders; the stubs and every
usual mistake — each a switch of a plain solution below — fail with the message that names it."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed import all_reduce as imported_all_reduce  # a student's import, seen too

from exercises import _ex16_reference as ref
from exercises import ex16_data_parallel as ex16
from exercises.grading import GradingError
from minimegatron.collectives import all_gather_into_tensor, reduce_scatter_tensor

TWO = (2,)  # a mistake shows on 2 ranks already: one launch per case


# --- 16.1: a plain bucket hook, the mistakes as switches -------------------------------------------------

class DDP(ex16.BucketedDDP):
    """Correct with the defaults; written otherwise than the reference (a dict of handles by bucket)."""

    when = None  # reduce a bucket when this many gradients are in (None: when it is full)
    per_param = after_backward = twice = everything = False
    async_op = wait = divide = own_group = True
    imported = False  # call the collective by a name imported from torch.distributed

    def on_grad_ready(self, param):
        i, o = self.bucket_of[param], self.offset_of[param]
        self.buffers[i][o:o + param.numel()] = param.grad.flatten()
        self.ready[i] += 1
        group = self.group if self.own_group else None
        if self.per_param:
            self.handles.append((None, dist.all_reduce(param.grad, group=group, async_op=True)))
        elif not (self.after_backward or self.everything) and self.ready[i] == (self.when or len(self.buckets[i])):
            reduce = imported_all_reduce if self.imported else dist.all_reduce
            self.handles.append((i, reduce(self.buffers[i], group=group, async_op=self.async_op)))

    def finish_grad_sync(self):
        if self.everything:  # one flat vector of the whole model, after backward
            flat = torch.cat(self.buffers)
            dist.all_reduce(flat, group=self.group)
            self.buffers = list(flat.split([b.numel() for b in self.buffers]))
        for i, buffer in enumerate(self.buffers if self.after_backward or self.twice else []):
            dist.all_reduce(buffer, group=self.group)
        for _, work in self.handles:
            if self.wait and work is not None:
                work.wait()
        self.handles = []
        for i, bucket in enumerate(self.buckets):
            for p in bucket:
                if self.per_param:
                    p.grad /= self.dp
                    continue
                o = self.offset_of[p]
                p.grad = self.buffers[i][o:o + p.numel()].view_as(p) / (self.dp if self.divide else 1)


def ddp_with(**switches):
    return type("MyDDP", (DDP,), switches)


def test_references_and_hand_written_solutions_pass():
    assert ex16.grade_bucketed_ddp(ref.ReferenceBucketedDDP).startswith("✓ Exercise 16.1")
    assert ex16.grade_bucketed_ddp(DDP).startswith("✓ Exercise 16.1")
    assert ex16.grade_bucketed_ddp(ddp_with(imported=True), world_sizes=TWO).startswith("✓ Exercise 16.1")
    assert ex16.grade_zero2_adamw(ref.ReferenceZero2AdamW).startswith("✓ Exercise 16.2")
    assert ex16.grade_zero2_adamw(Zero2).startswith("✓ Exercise 16.2")
    assert ex16.grade_zero3(ref.ReferenceZero3Model).startswith("✓ Exercise 16.3")
    assert ex16.grade_zero3(Zero3).startswith("✓ Exercise 16.3")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 16.1: copy param.grad"):
        ex16.grade_bucketed_ddp(ex16.BucketedDDP)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 16.2: count param"):
        ex16.grade_zero2_adamw(ex16.Zero2AdamW)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 16.3: all_gather_into_tensor"):
        ex16.grade_zero3(ex16.Zero3Model)


@pytest.mark.parametrize("switches, message", [
    (dict(when=1), r"bucket 0 was all-reduced when only 1 of its 3 gradients were in it — reducing before a "
                   r"bucket is full"),
    (dict(per_param=True), r"one all-reduce per parameter \(6 calls of \[3, 6, 18, 30, 36\] elements\) instead "
                           r"of one per bucket \(2 buckets of \[27, 72\] elements\)"),
    (dict(after_backward=True), r"every all-reduce ran after backward \(in finish_grad_sync\): no overlap"),
    (dict(everything=True), r"an all-reduce of 99 elements, not a bucket \(the buckets have \[27, 72\]\)"),
    (dict(async_op=False), r"a blocking all-reduce in the hook \(bucket 0, async_op=False\)"),
    (dict(wait=False), r"the all-reduce of bucket 0 was never waited before the step"),
    (dict(divide=False), r"rank 0: the gradients are 2× the whole batch's — .*divide by self.dp"),
    (dict(twice=True), r"bucket 0 was all-reduced 2 times in one step"),
    (dict(own_group=False), r"all-reduce over the wrong group: pass group=self.group"),
])
def test_bucket_hook_mistakes_are_named(switches, message):
    with pytest.raises(GradingError, match=rf"(?s)Exercise 16\.1 \(dp=2, step 1\).*{message}"):
        ex16.grade_bucketed_ddp(ddp_with(**switches), world_sizes=TWO)


def test_a_bucket_never_reduced_and_no_reduce_at_all_are_named():
    class Forgets(DDP):  # the last bucket's condition never true
        def on_grad_ready(self, param):
            self.when = len(self.buckets[0]) if self.bucket_of[param] == 0 else 99
            super().on_grad_ready(param)

    with pytest.raises(GradingError, match=r"step 1\): bucket 1 was never all-reduced"):
        ex16.grade_bucketed_ddp(Forgets, world_sizes=TWO)
    with pytest.raises(GradingError, match=r"step 1\): nothing was all-reduced"):
        ex16.grade_bucketed_ddp(ddp_with(when=99), world_sizes=TWO)

    class Off(DDP):  # right collectives, wrong numbers: the values are compared last
        def finish_grad_sync(self):
            super().finish_grad_sync()
            self.module[0].weight.grad += 1e-3

    with pytest.raises(GradingError, match=r"step 1\), rank 0, 0.weight.grad \(vs the whole batch's on one "
                                           r"model\): wrong values"):
        ex16.grade_bucketed_ddp(Off, world_sizes=TWO)


# --- 16.2: a plain ZeRO-2 step, the mistakes as switches ---------------------------------------------------

class Zero2(ex16.Zero2AdamW):
    """Correct with the defaults; divides by dp in the hook, not in the step."""

    free = divide = gather = bias_correction = decoupled = in_hook = True
    all_reduce = False

    def on_grad_ready(self, param):
        i = self.bucket_of[param]
        self.ready[i] += 1
        if self.in_hook and self.ready[i] == len(self.buckets[i]):
            self.scatter(i)

    def scatter(self, i):
        lo, hi = self.shard_range[i]
        if self.all_reduce:
            summed = self.flat_grads(i)
            dist.all_reduce(summed, group=self.group)
            self.grad_shard[lo:hi] = summed.chunk(self.dp)[self.rank]
        else:
            reduce_scatter_tensor(self.grad_shard[lo:hi], self.flat_grads(i), group=self.group)
        self.grad_shard[lo:hi] /= self.dp if self.divide else 1
        for p in self.buckets[i] if self.free else []:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        for i in range(len(self.buckets)) if not self.in_hook else []:
            self.scatter(i)
        t, (b1, b2), lr, wd = self.step_count, self.betas, self.lr, self.weight_decay
        g = self.grad_shard + (0 if self.decoupled else wd * self.master)
        self.master *= 1 - lr * wd * self.decoupled
        self.exp_avg.mul_(b1).add_((1 - b1) * g)
        self.exp_avg_sq.mul_(b2).add_((1 - b2) * g * g)
        c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if self.bias_correction else (1, 1)
        self.master -= lr * (self.exp_avg / c1) / ((self.exp_avg_sq / c2).sqrt() + self.eps)
        for i, (lo, hi) in enumerate(self.shard_range):
            full = torch.cat([p.reshape(-1) for p in self.buckets[i]]
                             + [torch.zeros(self.padded[i] - sum(p.numel() for p in self.buckets[i]))])
            if self.gather:
                all_gather_into_tensor(full, self.master[lo:hi], group=self.group)
            else:  # only this rank's slice updated
                full[self.rank * (hi - lo):(self.rank + 1) * (hi - lo)] = self.master[lo:hi]
            self.set_params(i, full)


@pytest.mark.parametrize("switches, message", [
    (dict(free=False), r"full gradients still alive after backward \(0.weight, 0.bias, .*\): ZeRO-2 keeps only "
                       r"1/N_d of the gradients"),
    (dict(all_reduce=True), r"all-reduce instead of reduce-scatter: every rank receives the whole summed "
                            r"gradient \(twice the received volume"),
    (dict(divide=False), r"rank 0: exp_avg is 2× Adam's — .*divide by N_d = 2"),
    (dict(gather=False), r"no all-gather in step\(\): each rank updated only its own shard"),
    (dict(in_hook=False), r"reduce-scattered only at step time: no overlap"),
    (dict(bias_correction=False), r"\w\.(weight|bias) after the step \(vs torch.optim.AdamW on the whole batch\): "
                                  r"wrong values"),
    (dict(decoupled=False), r"\w\.(weight|bias) after the step \(vs torch.optim.AdamW on the whole batch\): "
                            r"wrong values"),
])
def test_zero2_mistakes_are_named(switches, message):
    with pytest.raises(GradingError, match=rf"(?s)Exercise 16\.2 \(dp=2, step 1\).*{message}"):
        ex16.grade_zero2_adamw(type("MyZero2", (Zero2,), switches), world_sizes=TWO)


# --- 16.3: ZeRO-3's gather and release, and their usual mistakes --------------------------------------------

class Zero3(ex16.Zero3Model):
    """Correct: all_gather into a list of the ranks' shards, concatenated."""

    def gather(self, unit):
        parts = [torch.empty_like(unit.shard.detach()) for _ in range(self.dp)]
        dist.all_gather(parts, unit.shard.detach(), group=unit.group)
        views = torch.cat(parts).split([s.numel() for s in unit.shapes] + [unit.padded - sum(
            s.numel() for s in unit.shapes)])
        for p, view, shape in zip(unit.params, views, unit.shapes):
            p.data = view.view(shape)

    def release(self, unit):
        for p in unit.params:
            p.data = torch.empty(0)


class Cached(Zero3):  # gathers once, then reuses the full copy
    def gather(self, unit):
        self.__dict__.setdefault("cache", {})
        if id(unit) not in self.cache:
            super().gather(unit)
            self.cache[id(unit)] = [p.data for p in unit.params]
        for p, data in zip(unit.params, self.cache[id(unit)]):
            p.data = data


class NeverReleases(Zero3):
    def release(self, unit):
        pass


class ReleasesTheShard(Zero3):
    def release(self, unit):
        super().release(unit)
        unit.shard.data = torch.empty(0)


class OncePerStep(Zero3):  # "already gathered this step": skipped when backward asks again
    def gather(self, unit):
        self.__dict__.setdefault("done", set())
        if id(unit) not in self.done:
            self.done.add(id(unit))
            super().gather(unit)


class WrongOrder(Zero3):  # the shards concatenated last rank first
    def gather(self, unit):
        parts = [torch.empty_like(unit.shard.detach()) for _ in range(self.dp)]
        dist.all_gather(parts, unit.shard.detach(), group=unit.group)
        full = torch.cat(parts[::-1])
        offset = 0
        for p, shape in zip(unit.params, unit.shapes):
            p.data, offset = full[offset:offset + shape.numel()].view(shape), offset + shape.numel()


@pytest.mark.parametrize("mistake, message", [
    (Cached, r"Exercise 16.3 \(dp=2\), step 2: unit 0's forward used its weights of step 1, before the optimizer's update — "
             r"a stale shard"),
    (NeverReleases, r"Exercise 16.3 \(dp=2\), not releasing: when unit 1's gather ran \(forward, step 1\), units \[0\] still "
                    r"held their full parameters — all parameters alive at once, no memory saved"),
    (ReleasesTheShard, r"rank \d: Exercise 16.3 \(dp=2, step 1\): after release\(unit 0\) unit.shard is a Tensor of "
                       r"shape \(0,\).* — releasing the shard too: keep unit.shard \(the \(18,\) parameter"),
    (OncePerStep, r"rank \d: Exercise 16.3 \(dp=2, step 1\): in backward, after gather\(unit 2\) its parameters are "
                  r"\[\(0,\), \(0,\)\], still freed — gathering in forward only"),
    (WrongOrder, r"Exercise 16.3 \(dp=2\), step 1: unit 0's gathered weights differ from the model's .*in rank order"),
])
def test_zero3_mistakes_are_named(mistake, message):
    with pytest.raises(GradingError, match=rf"(?s)^{message}"):
        ex16.grade_zero3(mistake, world_sizes=TWO)
