"""Gradient buckets: which parameters' gradients are all-reduced together, in one flat buffer.

Data parallelism averages every gradient over the N_d replicas. One all-reduce per tensor pays the
collective's latency once per tensor (a GPT has ~10 tensors per layer, some of them h-element biases);
**bucketing** packs many gradients into one flat buffer and reduces it with one call. The rules here are
torch DDP's and Megatron's:

* **Reverse registration order.** Backward runs the layers last to first, so the gradients of the last
  registered parameters (the final norm, the last layer) are ready first. Filling buckets in
  reverse order makes the first bucket the first one complete, and it can be sent while backward is
  still computing the earlier layers (``ddp.py``, the overlapped variant).
* **A size cap.** A new bucket starts when adding the next parameter would make the current one larger
  than ``bucket_size_mb`` (MiB, 2^20 bytes); a parameter larger than the cap gets a bucket of its own.
  A dtype change also starts a new bucket (one buffer has one dtype).
* **Gradients are views of the bucket.** Each bucket is one contiguous tensor of the gradients' dtype;
  ``param.grad`` is set to the slice ``buffer[offset : offset + numel].view(param.shape)`` (torch
  DDP's ``gradient_as_bucket_view=True``, Megatron's grad buffer). Autograd accumulates into an
  existing ``.grad`` in place, so backward writes straight into the buffer: no copy before the
  all-reduce, none after.
* **Tied weights appear once.** GPT's embedding table is also the LM head; it is one Parameter, so
  ``named_parameters()`` lists it once, its gradient (both uses summed by autograd) is one view, and its
  post-accumulate-grad hook fires once per backward.

    plan = GradBuckets(model.named_parameters(), bucket_size_mb=1.0)
    print(plan.table())                 # bucket, parameter, shape, offset, numel, bytes
    plan.plot()                         # which parameter lands in which bucket (a matplotlib Figure)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

__all__ = ["Bucket", "GradBuckets", "assign_buckets", "MiB"]

MiB = 2 ** 20


def assign_buckets(sizes_bytes: list[int], bucket_bytes: int,
                   dtypes: list[object] | None = None) -> list[list[int]]:
    """Group tensors, *given in the order they fill buckets*, into buckets of at most ``bucket_bytes``.

    Returns a list of buckets, each a list of indices into ``sizes_bytes``. A tensor that would push the
    current bucket past the cap starts a new one; a tensor larger than the cap sits alone; a change in
    ``dtypes`` (if given) starts a new bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes}; pass bucket_size_mb > 0 "
                         "(e.g. 25, torch DDP's default)")
    buckets: list[list[int]] = []
    filled = 0
    for i, size in enumerate(sizes_bytes):
        dtype_changed = dtypes is not None and buckets and dtypes[buckets[-1][-1]] != dtypes[i]
        if not buckets or dtype_changed or (filled + size > bucket_bytes and filled > 0):
            buckets.append([])
            filled = 0
        buckets[-1].append(i)
        filled += size
    return buckets


@dataclass
class Bucket:
    """One flat gradient buffer and the parameters whose ``.grad`` are views of it."""

    index: int
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]                 # element offset of each parameter's gradient in ``buffer``
    buffer: torch.Tensor               # (numel,) in the gradients' dtype
    # filled by the data-parallel wrappers during a backward:
    ready: set[int] = field(default_factory=set)   # ids of the params whose gradient has arrived

    @property
    def numel(self) -> int:
        return self.buffer.numel()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def view_of(self, i: int) -> torch.Tensor:
        """The slice of ``buffer`` that is ``params[i].grad``, in the parameter's shape."""
        p = self.params[i]
        return self.buffer[self.offsets[i]:self.offsets[i] + p.numel()].view(p.shape)

    def missing(self) -> list[str]:
        """Names of the parameters whose gradient has not arrived in this backward."""
        return [n for n, p in zip(self.names, self.params) if id(p) not in self.ready]


class GradBuckets:
    """The parameters that require grad, in reverse registration order, packed into flat buckets.

    ``named_parameters``: e.g. ``model.named_parameters()`` (a tied weight is listed once; a repeat of
    the same Parameter object is skipped anyway). The buffers are allocated here, zeroed, and every
    parameter's ``.grad`` is pointed at its view (:meth:`attach_grads`).
    """

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]],
                 bucket_size_mb: float = 25.0) -> None:
        if not isinstance(bucket_size_mb, (int, float)) or isinstance(bucket_size_mb, bool) \
                or not bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb must be a number > 0, got {bucket_size_mb!r}; "
                             "use e.g. 25 (torch DDP's default) or 1 for a small model")
        seen: set[int] = set()
        named = []
        for name, p in named_parameters:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                named.append((name, p))
        if not named:
            raise ValueError("no parameter requires grad: there is nothing to bucket; wrap a model "
                             "with trainable parameters")
        named.reverse()  # ≈ the order backward produces the gradients
        self.bucket_size_mb = bucket_size_mb
        sizes = [p.numel() * p.element_size() for _, p in named]
        groups = assign_buckets(sizes, int(bucket_size_mb * MiB), [p.dtype for _, p in named])
        self.buckets: list[Bucket] = []
        for b, members in enumerate(groups):
            params = [named[i][1] for i in members]
            offsets = [0]
            for p in params[:-1]:
                offsets.append(offsets[-1] + p.numel())
            numel = offsets[-1] + params[-1].numel()
            buffer = torch.zeros(numel, dtype=params[0].dtype, device=params[0].device)  # (numel,)
            self.buckets.append(Bucket(b, [named[i][0] for i in members], params, offsets, buffer))
        # parameter id -> (bucket index, position in the bucket)
        self.where: dict[int, tuple[int, int]] = {
            id(p): (b.index, i) for b in self.buckets for i, p in enumerate(b.params)}
        self.attach_grads()

    # ---- the buffers ---------------------------------------------------------------------------
    def attach_grads(self) -> None:
        """Point every ``param.grad`` at its view of the bucket buffer (keeping the values it had)."""
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                view = bucket.view_of(i)
                if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
                p.grad = view

    def zero_grad(self) -> None:
        """Zero the buffers in place (the views stay views; ``optimizer.zero_grad()``'s default
        ``set_to_none=True`` would drop them, and :meth:`attach_grads` would then re-point them)."""
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def __len__(self) -> int:
        return len(self.buckets)

    @property
    def names(self) -> list[str]:
        """Every parameter name, in bucket order (= reverse registration order)."""
        return [n for b in self.buckets for n in b.names]

    # ---- reading it ----------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """One dict per parameter: bucket, name, shape, offset, numel, bytes."""
        return [dict(bucket=b.index, name=n, shape=tuple(p.shape), offset=o, numel=p.numel(),
                     bytes=p.numel() * p.element_size())
                for b in self.buckets for n, p, o in zip(b.names, b.params, b.offsets)]

    def describe(self) -> str:
        """One line per bucket: its size and its first and last parameter."""
        lines = [f"{len(self.buckets)} buckets of <= {self.bucket_size_mb:g} MiB, "
                 f"{sum(b.numel for b in self.buckets):,} elements in all (reverse registration order)"]
        for b in self.buckets:
            span = b.names[0] if len(b.names) == 1 else f"{b.names[0]} ... {b.names[-1]}"
            lines.append(f"  bucket {b.index}: {len(b.params):3d} params, {b.numel:>11,} elements, "
                         f"{b.nbytes / MiB:8.3f} MiB, {str(b.buffer.dtype).replace('torch.', '')}: {span}")
        return "\n".join(lines)

    def table(self) -> str:
        """A markdown table, one row per parameter."""
        lines = ["| bucket | parameter | shape | offset | numel | bytes |", "|---:|---|---|---:|---:|---:|"]
        for r in self.rows():
            lines.append(f"| {r['bucket']} | {r['name']} | {tuple(r['shape'])} | {r['offset']:,} | "
                         f"{r['numel']:,} | {r['bytes']:,} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()

    def plot(self, ax=None):
        """Draw each bucket as a horizontal bar, split into its parameters (widths = bytes); returns the
        Figure. Bucket 0 (top) holds the last layers: it fills first in backward."""
        import matplotlib.pyplot as plt

        fig = ax.figure if ax is not None else plt.figure(figsize=(10, 0.5 + 0.45 * len(self.buckets)))
        ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
        colors = plt.get_cmap("tab20").colors
        k = 0
        for b in self.buckets:
            left = 0.0
            for name, p in zip(b.names, b.params):
                width = p.numel() * p.element_size() / MiB
                ax.barh(b.index, width, left=left, color=colors[k % len(colors)], edgecolor="white")
                if width > 0.06 * self.bucket_size_mb:
                    ax.text(left + width / 2, b.index, name, ha="center", va="center", fontsize=6,
                            clip_on=True)
                left += width
                k += 1
        ax.axvline(self.bucket_size_mb, color="black", linestyle="--", linewidth=1, label="bucket_size_mb")
        ax.set_yticks(range(len(self.buckets)), [f"bucket {b.index}" for b in self.buckets])
        ax.invert_yaxis()
        ax.set_xlabel("MiB (parameters in reverse registration order, left to right)")
        ax.set_title("Gradient buckets: bucket 0 is complete first in backward")
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        return fig
