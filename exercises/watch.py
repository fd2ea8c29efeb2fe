"""What collectives a candidate called: which ones, over which group, on a tensor autograd tracks.

Some mistakes give the right numbers on the grader's world and still are mistakes: an all-reduce
without ``group=`` sums over every rank (the same as the TP group only when the world IS the TP
group), and a raw ``dist.all_reduce`` on a tensor in the autograd graph is invisible to autograd (torch
backpropagates through it as if it were the identity, warning that this "may lead to silently incorrect
behavior" and will be removed). :class:`Collectives` records each call while ``watching(candidate)`` —
through ``torch.distributed`` and through any name the candidate's module imported from it — so that
a grader can name these.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
         "reduce_scatter_tensor", "reduce_scatter_single",
         "broadcast", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv")


class Collectives:
    """``calls``: one dict per collective call — {name, group (the group passed, None: the default),
    tracked (a tensor argument requires grad while autograd records)}."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._depth = 0

    @contextlib.contextmanager
    def watching(self, candidate: Any = None) -> Iterator["Collectives"]:
        saved = {n: getattr(dist, n) for n in NAMES if hasattr(dist, n)}
        module = sys.modules.get(getattr(candidate, "__module__", None) or "")
        space = vars(module) if module is not None and module is not dist else {}
        aliases = {k: v for k, v in space.items() if callable(v) and any(v is f for f in saved.values())}
        wrapped = {n: self._wrap(n, f) for n, f in saved.items()}
        for n, f in wrapped.items():
            setattr(dist, n, f)
        for k, v in aliases.items():
            space[k] = wrapped[next(n for n, f in saved.items() if f is v)]
        try:
            yield self
        finally:
            for n, f in saved.items():
                setattr(dist, n, f)
            space.update(aliases)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        def logged(*args: Any, **kwargs: Any) -> Any:
            if self._depth:  # a collective calling another (an old name calling the new one)
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs).arguments
            tensors = [t for v in bound.values() for t in (v if isinstance(v, (list, tuple)) else [v])
                       if isinstance(t, torch.Tensor)]
            op = bound.get("op", dist.ReduceOp.SUM) if name == "all_reduce" else None
            self.calls.append(dict(name=name, group=bound.get("group"), op=_op_name(op),
                                   tracked=torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return logged

    def summary(self, group: Any) -> dict:
        """{"names": every collective called, "ungrouped": those called without ``group`` (or with
        another group), "tracked": those called on a tensor autograd tracks, "reduce_ops": the op of
        each all_reduce ("SUM", "MAX", ...)} — picklable, for the parent."""
        return {"names": sorted({c["name"] for c in self.calls}),
                "ungrouped": sorted({c["name"] for c in self.calls if c["group"] is not group}),
                "tracked": sorted({c["name"] for c in self.calls if c["tracked"]}),
                "reduce_ops": [c["op"] for c in self.calls if c["name"] == "all_reduce"]}


def _op_name(op: Any) -> str | None:
    if op is None:
        return None
    for name in ("SUM", "MAX", "MIN", "PRODUCT", "AVG"):
        if op == getattr(dist.ReduceOp, name, object()):
            return name
    return str(op)
