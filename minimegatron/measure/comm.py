"""Count every byte the code puts on the wire, and the formula it should match.

:class:`CommCounter` is a context manager that records each collective issued inside it: the
operation, the group (size and global ranks), the tensor's element count and dtype, the logical
bytes and the bytes this rank actually sends with the standard ring algorithms::

    with CommCounter() as comm:
        with comm.phase("forward"):
            y = layer(x)
        with comm.phase("backward"):
            y.sum().backward()
    print(comm.table())

**How it sees the collectives.** ``dist.all_reduce(x)`` does not do the work in Python: it calls the
process group, which dispatches the C++ operator ``c10d::allreduce_`` (``c10d::_allgather_base_``
for ``all_gather_into_tensor``, ``c10d::send``, ...). The counter is a ``TorchDispatchMode``, so it sits
in front of *every* operator call and keeps the ``c10d::*`` ones. That catches the collectives however
they were reached — ``dist.all_reduce``, an alias bound at import time (``mpu/mappings.py`` binds
``all_gather_single``), DeepSpeed's ``deepspeed.comm``, ``all_gather_object`` — which wrapping the
``torch.distributed`` functions would not. The dispatch mode adds a few µs to every tensor op, so use
it to *count*; time the clean run separately (``time_ops=True`` measures each collective, waiting for
it to finish, which serialises asynchronous collectives).

**Bytes.** ``bytes`` is the size of the logical tensor the collective is about (the summed tensor of an
all-reduce, the gathered output of an all-gather, the input of a reduce-scatter, the tensor sent).
``wire_bytes`` is what *this* rank sends with the bandwidth-optimal ring algorithms, for a group of
``t`` ranks and a tensor of ``n`` elements of ``e`` bytes (``c = ⌈n/t⌉``, the ring's chunk)::

    all-reduce      = reduce-scatter + all-gather       2 (t-1) · c · e     ≈ 2 (t-1)/t · bytes
    reduce-scatter  (input n, output n/t)                 (t-1) · c · e     ≈   (t-1)/t · bytes
    all-gather      (input n/t, output n)                 (t-1) · c · e     ≈   (t-1)/t · bytes
    all-to-all                                            (t-1) · c · e
    broadcast / reduce (pipelined chain)                          n · e
    send / recv                                                   n · e

So an all-reduce costs the same on the wire as a reduce-scatter plus an all-gather: sequence
parallelism's conjugate pairs move the same volume as plain tensor parallelism, plus (as in Megatron)
one backward re-gather per column layer and the small replicated-weight gradient all-reduces
(:func:`tp_layer_comm`).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch._dynamo  # noqa: F401  (a dispatch mode imports it: once here, forked ranks inherit it)
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CommRecord", "OpTotal", "CommCounter", "ring_wire_bytes", "tp_layer_comm",
           "format_comm_table"]

# c10d operator -> the torch.distributed name a student knows
_C10D_NAMES = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce",
    "_allgather_base_": "all_gather", "allgather_": "all_gather",
    "allgather_coalesced_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "broadcast_": "broadcast", "reduce_": "reduce", "gather_": "gather", "scatter_": "scatter",
    "alltoall_": "all_to_all", "alltoall_base_": "all_to_all",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv", "barrier": "barrier",
}
_P2P = {"send", "recv"}


def ring_wire_bytes(op: str, numel: int, element_size: int, group_size: int) -> int:
    """Bytes one rank sends for ``op`` on a tensor of ``numel`` elements (see the module docstring).

    ``numel`` is the logical tensor (all-reduced tensor, all-gather *output*, reduce-scatter *input*).
    """
    t, e = group_size, element_size
    if op in _P2P or op in ("broadcast", "reduce"):
        return numel * e if t > 1 or op in _P2P else 0
    chunk = math.ceil(numel / t)
    if op == "all_reduce":
        return 2 * (t - 1) * chunk * e
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        return (t - 1) * chunk * e
    return 0  # barrier


@dataclass
class CommRecord:
    """One collective as this rank issued it."""

    op: str                   # all_reduce | all_gather | reduce_scatter | broadcast | send | recv | ...
    group_size: int
    ranks: tuple[int, ...]    # global ranks of the group (for send/recv: the peer)
    numel: int                # elements of the logical tensor
    dtype: torch.dtype
    bytes: int                # numel · element size
    wire_bytes: int           # bytes this rank sends with a ring algorithm
    phase: str = ""
    seconds: float = 0.0      # only with CommCounter(time_ops=True)


@dataclass(frozen=True)
class OpTotal:
    """Totals for one kind of collective: how many calls, logical bytes, bytes on the wire."""

    count: int = 0
    bytes: int = 0
    wire_bytes: int = 0

    def __add__(self, other: "OpTotal") -> "OpTotal":
        return OpTotal(self.count + other.count, self.bytes + other.bytes,
                       self.wire_bytes + other.wire_bytes)


def _tensors(x) -> list[torch.Tensor]:
    """Flatten nested lists of tensors (c10d ops take ``list[Tensor]`` and ``list[list[Tensor]]``)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _process_group(args) -> dist.ProcessGroup | None:
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a)
            except (RuntimeError, TypeError, AttributeError):
                continue  # a ReduceOp / options object, not the group
    return None


def _logical_tensors(name: str, args) -> list[torch.Tensor]:
    """The tensor(s) whose size defines the collective's ``bytes`` (see the module docstring)."""
    if name in ("_allgather_base_", "_reduce_scatter_base_"):  # (output, input, ...)
        return [args[0]] if name == "_allgather_base_" else [args[1]]
    if name in ("allgather_", "allgather_coalesced_", "allgather_into_tensor_coalesced_"):
        return _tensors(args[0])  # the outputs
    if name in ("reduce_scatter_", "reduce_scatter_tensor_coalesced_"):
        return _tensors(args[1])  # the inputs
    if name in ("alltoall_base_",):
        return [args[1]]
    return _tensors(args[0])


class CommCounter(TorchDispatchMode):
    """Record every collective issued inside ``with CommCounter() as comm:`` (on this rank).

    ``comm.records`` lists :class:`CommRecord` in issue order; ``comm.totals()`` sums them per op;
    ``comm.table()`` formats a markdown table. Tag regions with ``with comm.phase("forward"):``.
    """

    def __init__(self, time_ops: bool = False) -> None:
        super().__init__()
        self.time_ops = time_ops
        self.records: list[CommRecord] = []
        self._phase = ""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Tag the collectives issued inside with ``name`` (e.g. "forward", "backward")."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "c10d" or func._opname not in _C10D_NAMES:
            return func(*args, **kwargs)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        op = _C10D_NAMES[func._opname]
        if self.time_ops and op not in _P2P:  # waiting on an isend could deadlock its pair
            work = out[-1] if isinstance(out, tuple) else out
            if hasattr(work, "wait"):
                work.wait()
        seconds = time.perf_counter() - start
        self._record(func._opname, op, args, seconds)
        return out

    def _record(self, name: str, op: str, args, seconds: float) -> None:
        tensors = _logical_tensors(name, args)
        numel = sum(t.numel() for t in tensors)
        esize = tensors[0].element_size() if tensors else 0
        dtype = tensors[0].dtype if tensors else torch.float32
        pg = _process_group(args)
        if op in _P2P:  # (tensors, group, peer rank in group, tag)
            peer = args[2] if len(args) > 2 and isinstance(args[2], int) else -1
            ranks = tuple(dist.get_process_group_ranks(pg))[peer:peer + 1] if pg is not None and peer >= 0 \
                else ()
            size = 2
        else:
            ranks = tuple(dist.get_process_group_ranks(pg)) if pg is not None else ()
            size = pg.size() if pg is not None else 1
        self.records.append(CommRecord(op, size, ranks, numel, dtype, numel * esize,
                                       ring_wire_bytes(op, numel, esize, size), self._phase, seconds))

    # ---- summaries -------------------------------------------------------------------------------
    def select(self, op: str | None = None, phase: str | None = None) -> list[CommRecord]:
        return [r for r in self.records
                if (op is None or r.op == op) and (phase is None or r.phase == phase)]

    def totals(self, phase: str | None = None, by_phase: bool = False) -> dict:
        """``{op: OpTotal}`` (or ``{(phase, op): OpTotal}`` with ``by_phase``), barriers left out."""
        out: dict = {}
        for r in self.select(phase=phase):
            if r.op == "barrier":
                continue
            key = (r.phase, r.op) if by_phase else r.op
            out[key] = out.get(key, OpTotal()) + OpTotal(1, r.bytes, r.wire_bytes)
        return out

    def bytes(self, op: str | None = None, phase: str | None = None) -> int:
        return sum(r.bytes for r in self.select(op, phase))

    def wire_bytes(self, op: str | None = None, phase: str | None = None) -> int:
        return sum(r.wire_bytes for r in self.select(op, phase))

    def seconds(self, op: str | None = None, phase: str | None = None) -> float:
        return sum(r.seconds for r in self.select(op, phase))

    def table(self) -> str:
        """Markdown table: one row per (phase, op, group size, dtype)."""
        rows: dict = {}
        for r in self.records:
            key = (r.phase, r.op, r.group_size, str(r.dtype).replace("torch.", ""))
            rows[key] = rows.get(key, OpTotal()) + OpTotal(1, r.bytes, r.wire_bytes)
        return format_comm_table(rows)


def format_comm_table(rows: dict) -> str:
    """``{(phase, op, group_size, dtype): OpTotal}`` -> a markdown table with a total line."""
    lines = ["| phase | op | group | dtype | calls | bytes | wire bytes/rank |",
             "|---|---|---:|---|---:|---:|---:|"]
    total = OpTotal()
    for (phase, op, size, dtype), t in rows.items():
        lines.append(f"| {phase or '-'} | {op} | {size} | {dtype} | {t.count} | {t.bytes:,} | "
                     f"{t.wire_bytes:,} |")
        total = total + t
    lines.append(f"| **total** | | | | {total.count} | {total.bytes:,} | {total.wire_bytes:,} |")
    return "\n".join(lines)


# ---- the formula ----------------------------------------------------------------------------------
def tp_layer_comm(seq: int, batch: int, hidden: int, tp: int, sequence_parallel: bool = False,
                  bytes_per_element: int = 4, by_phase: bool = False, separate_kv: bool = False,
                  norm: str = "layernorm", bias: bool = True) -> dict:
    """Collectives of one transformer layer's forward + backward under tensor parallelism.

    Megatron (Shoeybi et al. 2019, §3): attention and MLP each sit between an ``f`` and a ``g``, so a
    layer runs **2 all-reduces forward** (``g`` after attention's and the MLP's row-parallel linear) and
    **2 backward** (``f`` before their column-parallel linears), each of ``s·b·h`` elements::

        TP:     4 × all-reduce(s·b·h)                     wire/rank = 4 · 2(t-1)/t · s·b·h·e

    Sequence parallelism (Korthikanti et al. 2022, §4.2.2) turns each ``g`` into a reduce-scatter
    (backward: all-gather) and each ``f`` into an all-gather (backward: reduce-scatter). Like
    Megatron, a column-parallel layer under SP keeps only its (s/t, b, h) input shard for backward and
    all-gathers it *again* there to form ∂L/∂W = (∂L/∂Y)ᵀ·X — it trades one all-gather per column
    layer for ``(t-1)/t · s·b·h`` elements of activation memory::

        TP+SP:  4 × all-gather(s·b·h) + 4 × reduce-scatter(s·b·h)      the conjugate pairs
                                                          wire/rank = 8 · (t-1)/t · s·b·h·e  (= TP)
              + 2 × all-gather(s·b·h) backward            the re-gathers of the QKV and fc1 inputs
                                                          wire/rank + 2 · (t-1)/t · s·b·h·e

    ``separate_kv``: GQA/MQA attention projects with two column-parallel layers (``query``,
    ``key_value``) instead of the fused ``query_key_value``: each has its own ``f``, so the input
    gradient takes one more all-reduce backward (under SP: one more all-gather forward, and one more
    reduce-scatter and re-gather all-gather backward).

    Under SP the replicated weights applied to the (s/t, b, h) slice (the norms' γ, β; the ``dense``
    and ``fc2`` biases) enter through ``f``: backward all-reduces each one's h-element gradient::

        TP+SP:  + k × all-reduce(h) backward     k = 2·(1 + [norm = layernorm, bias]) + 2·[bias]
                                                 (GPT 6, LLaMA 2: ``norm``, ``bias`` of the model)

    Returns ``{op: OpTotal}`` as :meth:`CommCounter.totals` (``{(phase, op): …}``: ``by_phase``), {} at t=1.
    """
    if tp == 1:
        return {}
    n = seq * batch * hidden
    f = 3 if separate_kv else 2  # column-parallel entries (f): QKV [or query + key_value], fc1
    if sequence_parallel:  # (phase, op, calls, elements); + f re-gathers backward
        k = 2 * (1 + int(norm == "layernorm" and bias)) + 2 * int(bias)  # replicated h-vectors
        calls = [("forward", "all_gather", f, n), ("forward", "reduce_scatter", 2, n),
                 ("backward", "all_gather", 2 + f, n), ("backward", "reduce_scatter", f, n),
                 ("backward", "all_reduce", k, hidden)]
    else:
        calls = [("forward", "all_reduce", 2, n), ("backward", "all_reduce", f, n)]
    out: dict = {}
    for phase, op, count, numel in calls:
        one = OpTotal(1, numel * bytes_per_element, ring_wire_bytes(op, numel, bytes_per_element, tp))
        key = (phase, op) if by_phase else op
        for _ in range(count):
            out[key] = out.get(key, OpTotal()) + one
    return out
