"""Data parallelism from the inside, in three steps: naive, bucketed, overlapped.

Each of the N_d replicas holds the whole model and computes the gradient g_r of the loss on its own
micro-batch; before the optimizer step every replica needs the **average**

    ḡ = (1/N_d) · Σ_r g_r          (one all-reduce, then ÷ N_d — torch DDP and DeepSpeed average too)

which, with equal micro-batches and a mean loss, is exactly the gradient of the whole batch: N_d
replicas train like one device on N_d× the batch. Forward has no collective; backward's collective is
this all-reduce (the one "g" of data parallelism). Read the three wrappers in order; they share one
interface, that of torch's ``DistributedDataParallel`` plus Megatron's ``finish_grad_sync``::

    ddp = OverlappedDDP(model, group=state.dp_group, bucket_size_mb=25)   # parameters broadcast
    loss = ddp(ids, labels)                                               # from the group's first rank
    loss.backward()                       # (bucketed/overlapped: buckets reduced as they fill)
    ddp.finish_grad_sync()                # after backward, before optimizer.step()
    optimizer.step(); ddp.zero_grad()

=============  ==========================================  ===============  ===========================
wrapper        when the all-reduces run                    messages/step    logical bytes, wire/rank
=============  ==========================================  ===============  ===========================
NaiveDDP       after backward, one per gradient tensor     T (tensors)      Ψ·e,  Σ_t 2(N−1)⌈n_t/N⌉·e
BucketedDDP    in backward, when a bucket's last gradient  B (buckets)      Ψ·e,  Σ_b 2(N−1)⌈n_b/N⌉·e
               arrives; blocking: backward waits
OverlappedDDP  the same moments, ``async_op=True``:        B                the same
               backward continues; finish_grad_sync waits
=============  ==========================================  ===============  ===========================

(Ψ = parameters, e = bytes per element, N = N_d.) The volume on the wire is the same for all three,
≈ 2(N−1)/N · Ψ · e per rank (a ring all-reduce = reduce-scatter + all-gather); what changes is how
many messages carry it and *when* they move:

* **Bucketing** pays the per-message latency B times instead of T times (``buckets.py``).
* **Reverse order.** Buckets are filled with the parameters in reverse registration order, ≈ the order
  backward produces their gradients, so bucket 0 is complete first. Buckets are *launched in bucket
  order* (as torch DDP's reducer does): if bucket 2 completes before bucket 1, it waits for it, so that
  every rank issues the same collectives in the same order.
* **Overlap** hides communication behind the backward compute of the earlier layers: only the last
  bucket's all-reduce (the first layers, the embedding) must be exposed. Its cost: buckets too small →
  many messages, latency dominates; too big → the first bucket completes late and little backward is
  left to hide behind (one bucket = no overlap at all). ``minimegatron.measure.overlap`` measures it.

**Gradient accumulation**: inside ``with ddp.no_sync():`` backward only accumulates locally; the first
backward after it reduces the accumulated sum. As with torch DDP, scale each micro-batch's loss by
1/M to get the mean over M micro-batches (DeepSpeed does this division for you).

**Unused parameters** are an error, on purpose: a parameter that gets no gradient in a backward leaves
its bucket unfilled, and ``finish_grad_sync`` raises one line naming it and the fix (freeze it with
``requires_grad_(False)`` before wrapping, or make the loss use it). This is detected when the same
parameter is unused on every rank (a module the loss never reaches); a parameter unused on *some* ranks
only would leave the others waiting on a collective (torch DDP's ``find_unused_parameters=True``
all-reduces a bitmap of used parameters every step to handle it; we do not).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.data_parallel.buckets import Bucket, GradBuckets

__all__ = ["NaiveDDP", "BucketedDDP", "OverlappedDDP", "broadcast_parameters", "Observer"]

# observer(event, index, name): "grad" (a parameter's gradient arrived), "ready" (bucket complete),
# "launch" (its all-reduce issued), "done" (it completed; may run on the communication thread)
Observer = Callable[[str, int, str], None]


def broadcast_parameters(module: nn.Module, group: Any = None) -> None:
    """Copy every parameter from the group's first rank to the others (one broadcast per tensor), so
    that the replicas start equal — as torch DDP and DeepSpeed do when they wrap a model."""
    src = dist.get_process_group_ranks(group)[0] if group is not None else 0  # a global rank
    with torch.no_grad():
        for p in _unique_parameters(module):
            dist.broadcast(p.data, src=src, group=group)


def _unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    return list(dict.fromkeys(module.parameters()))  # a tied weight once


def _unused_message(kind: str, names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")
    return (f"{kind}.finish_grad_sync: {len(names)} parameter(s) got no gradient in this backward "
            f"({shown}), so their bucket was never reduced; freeze them with requires_grad_(False) "
            "before wrapping the model, or make the loss use them")


class NaiveDDP(nn.Module):
    """Step 1: after backward, all-reduce every gradient tensor, one call each, then ÷ N_d."""

    def __init__(self, module: nn.Module, group: Any = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__} wraps a torch.nn.Module, got {type(module).__name__}")
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs torch.distributed: run inside "
                               "minimegatron.launch(fn, world_size) or torchrun")
        self.module = module
        self.group = group
        self.world_size = dist.get_world_size(group)  # N_d
        self.observer: Observer | None = None          # minimegatron.measure.overlap sets it
        self._sync = True
        broadcast_parameters(module, group)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)  # forward has no collective in data parallelism

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside only accumulates gradients locally (micro-batches of one step)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _note(self, event: str, index: int, name: str = "") -> None:
        if self.observer is not None:
            self.observer(event, index, name)

    def finish_grad_sync(self) -> None:
        """ḡ = (1/N_d) Σ_r g_r for every gradient, in place (a no-op inside ``no_sync``)."""
        if not self._sync:
            return
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        missing = [n for n, p in named if p.grad is None]
        if missing:
            raise RuntimeError(_unused_message(type(self).__name__, missing))
        for i, (name, p) in enumerate(named):
            self._note("launch", i, name)
            p.grad.div_(self.world_size)                 # pre-divide: the sum is then the mean
            dist.all_reduce(p.grad, group=self.group)    # one message per tensor
            self._note("done", i, name)

    def zero_grad(self) -> None:
        for p in self.module.parameters():
            p.grad = None


class BucketedDDP(NaiveDDP):
    """Step 2: flat buckets (``buckets.GradBuckets``), each all-reduced — blocking — the moment its
    last gradient arrives (``register_post_accumulate_grad_hook``: after autograd has accumulated
    the parameter's whole gradient into ``.grad``, which is a view of the bucket)."""

    def __init__(self, module: nn.Module, group: Any = None, bucket_size_mb: float = 25.0) -> None:
        super().__init__(module, group)
        self.buckets = GradBuckets(module.named_parameters(), bucket_size_mb)
        self._next_bucket = 0  # buckets are launched in order: 0, 1, 2, ...
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready)
                       for b in self.buckets.buckets for p in b.params]

    def _grad_ready(self, param: nn.Parameter) -> None:
        """Autograd calls this once per backward per parameter, when its gradient is complete."""
        b, i = self.buckets.where[id(param)]
        bucket = self.buckets.buckets[b]
        view = bucket.view_of(i)
        if param.grad.data_ptr() != view.data_ptr():  # .grad was set to None (optimizer.zero_grad())
            view.copy_(param.grad)                     # and autograd made a new tensor: back into
            param.grad = view                          # the bucket
        if not self._sync:
            return
        if id(param) in bucket.ready:
            raise RuntimeError(f"{type(self).__name__}: the gradient of {bucket.names[i]!r} arrived twice "
                               "before finish_grad_sync(); call finish_grad_sync() after every backward, "
                               "or run the earlier backward passes inside no_sync()")
        bucket.ready.add(id(param))
        self._note("grad", b, bucket.names[i])
        if len(bucket.ready) == len(bucket.params):
            self._note("ready", b)
            buckets = self.buckets.buckets
            while self._next_bucket < len(buckets) and \
                    len(buckets[self._next_bucket].ready) == len(buckets[self._next_bucket].params):
                self._reduce(buckets[self._next_bucket])
                self._next_bucket += 1

    def _reduce(self, bucket: Bucket) -> None:
        """All-reduce one bucket now; backward waits for it."""
        self._note("launch", bucket.index)
        bucket.buffer.div_(self.world_size)                    # (numel,)
        dist.all_reduce(bucket.buffer, group=self.group)       # one message per bucket
        self._note("done", bucket.index)

    def _wait(self) -> None:
        """Nothing is in flight: every all-reduce finished inside backward."""

    def finish_grad_sync(self) -> None:
        """Check that every bucket was reduced (a no-op inside ``no_sync``); reset for the next step."""
        if not self._sync:
            return
        self._wait()
        missing = [n for b in self.buckets.buckets for n in b.missing()]
        for b in self.buckets.buckets:
            b.ready.clear()
        self._next_bucket = 0
        if missing:
            raise RuntimeError(_unused_message(type(self).__name__, missing))

    def zero_grad(self) -> None:
        """Zero the bucket buffers; the gradients stay views of them."""
        self.buckets.zero_grad()


class OverlappedDDP(BucketedDDP):
    """Step 3: the same hooks launch ``dist.all_reduce(..., async_op=True)`` and return at once, so
    backward goes on computing the earlier layers while the bucket is on the wire;
    ``finish_grad_sync`` waits for every handle."""

    def __init__(self, module: nn.Module, group: Any = None, bucket_size_mb: float = 25.0) -> None:
        super().__init__(module, group, bucket_size_mb)
        self._handles: list = []  # dist.Work, or the future that also stamps "done"

    def _reduce(self, bucket: Bucket) -> None:
        self._note("launch", bucket.index)
        bucket.buffer.div_(self.world_size)                                   # (numel,)
        work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        if self.observer is not None:  # stamp the completion, on the communication thread
            work = work.get_future().then(lambda fut, i=bucket.index: self._note("done", i))
        self._handles.append(work)  # (waiting on the chained future waits for the stamp too)

    def _wait(self) -> None:
        for work in self._handles:
            work.wait()
        self._handles.clear()
