"""Exercise 16's grader internals: what happens on each rank, recorded, and the mistake it reveals.

The graders run the student's class on real gloo ranks next to an independent reference (one model,
the whole batch, torch.optim.AdamW) and *watch* it: every collective of ``torch.distributed`` is wrapped
on the rank (:class:`CommLog`: which one, in which phase — backward, sync, step —, on how many elements,
over which group, async or not, and whether its Work was waited), and the grader wraps the student's
hook methods. The ``*_problem`` functions read those records in the parent and name the first usual
mistake they show; the values are compared last. Nothing here is the exercise
(``ex16_data_parallel.py``); it is kept apart to keep that file short.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from exercises._ex16_given import flat, padded  # noqa: F401 (the helpers the stubs are given)
from exercises.grading import GradingError, assert_close, kind_of

D_IN, D_HID, D_OUT, LOCAL_B, STEPS = 5, 6, 3, 4, 3
ADAM = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
KINDS = {"all_reduce": ("all_reduce",),  # the names each collective goes by, in torch 2.6 .. 2.13
         "reduce_scatter": ("reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter"),
         "all_gather": ("all_gather_into_tensor", "all_gather_single", "all_gather")}


def tiny_model() -> nn.Sequential:
    """Three Linear layers (99 parameters: 30+6, 36+6, 18+3), the same on every rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_HID), nn.Tanh(),
                         nn.Linear(D_HID, D_OUT))


def reverse_buckets(model: nn.Sequential) -> list[list[nn.Parameter]]:
    """The parameters in reverse order (the order backward produces them), cut into two buckets of
    27 and 72 elements — the cut falls inside the middle layer, as a size cap cuts it."""
    params = list(model.parameters())[::-1]  # 4.bias 4.weight 2.bias | 2.weight 0.bias 0.weight
    return [params[:3], params[3:]]


def batch(step: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(dp * LOCAL_B, D_IN, generator=g), torch.randn(dp * LOCAL_B, D_OUT, generator=g)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


class _LoggedWork:
    """A Work handle that notes whether it was waited before the step (phase "after" is too late)."""

    def __init__(self, work: Any, entry: dict, log: "CommLog") -> None:
        self._work, self._entry, self._log = work, entry, log

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        self._entry["waited"] = self._entry["waited"] or self._log.phase != "after"
        return self._work.wait(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class CommLog:
    """On one rank: ``torch.distributed``'s collectives wrapped while ``patched()``; each call an entry
    {kind, phase, step, numel (of the full-size tensor), async, group_ok, waited, **note(numel)}."""

    def __init__(self, group: Any, note: Callable[[int], dict] = lambda numel: {}) -> None:
        self.group, self.note, self.calls, self.phase, self.step, self._depth = group, note, [], "setup", 0, 0

    @contextlib.contextmanager
    def patched(self, candidate: Any = None) -> Iterator["CommLog"]:
        """Wrap the collectives in ``torch.distributed`` — and, in the module ``candidate`` was defined
        in, any global bound to one of them (``from torch.distributed import all_reduce``)."""
        saved = {name: getattr(dist, name) for names in KINDS.values() for name in names if hasattr(dist, name)}
        wrapped = {name: self._wrap(kind, saved[name]) for kind, names in KINDS.items() for name in names
                   if name in saved}
        module = sys.modules.get(getattr(candidate, "__module__", None) or "")
        space = vars(module) if module is not None and module is not dist else {}
        aliases = {key: value for key, value in space.items()
                   if callable(value) and any(value is fn for fn in saved.values())}
        for name, fn in wrapped.items():
            setattr(dist, name, fn)
        for key, value in aliases.items():
            space[key] = wrapped[next(n for n, fn in saved.items() if fn is value)]
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)
            space.update(aliases)

    def _wrap(self, kind: str, fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        def logged(*args: Any, **kwargs: Any) -> Any:
            if self._depth:  # called by another collective (an old name that calls the new one)
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs).arguments
            sizes = [v.numel() if isinstance(v, torch.Tensor) else sum(t.numel() for t in v)
                     for v in bound.values() if isinstance(v, torch.Tensor) or
                     (isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v))]
            numel = max(sizes, default=0)  # the full-size tensor: all-reduced, scattered from, gathered into
            entry = dict(kind=kind, phase=self.phase, step=self.step, numel=numel,
                         async_op=bool(bound.get("async_op", False)), group_ok=bound.get("group") is self.group,
                         waited=not bound.get("async_op", False), **self.note(numel))
            self.calls.append(entry)
            self._depth += 1
            try:
                work = fn(*args, **kwargs)
            finally:
                self._depth -= 1
            return _LoggedWork(work, entry, self) if work is not None else None
        return logged


def of(calls: list[dict], **match: Any) -> list[dict]:
    return [c for c in calls if all(c[k] == v for k, v in match.items())]


# --- 16.1 the bucket hook ------------------------------------------------------------------------------

BUCKET_RULE = ("launch dist.all_reduce(self.buffers[i], group=self.group, async_op=True) once, when "
               "self.ready[i] == len(self.buckets[i])")
WATCHED = " (the grader watches torch.distributed's collectives, however you import them)"


def ddp_problem(calls: list[dict], step: int, dp: int, sizes: list[int], param_sizes: set[int]) -> str | None:
    """The first mistake the step's collectives show, in words; None if they are right."""
    calls = of(calls, step=step)
    reduces = of(calls, kind="all_reduce")
    if any(c["kind"] != "all_reduce" for c in calls):
        other = next(c for c in calls if c["kind"] != "all_reduce")
        return f"a {other['kind']} was called: DDP averages each bucket with one all-reduce: {BUCKET_RULE}"
    if not reduces:
        return f"nothing was all-reduced: every rank kept its own gradient — {BUCKET_RULE}{WATCHED}"
    if any(not c["group_ok"] for c in reduces):
        return ("all-reduce over the wrong group: pass group=self.group (the data-parallel group). The "
                "default group is every rank of the job — with tensor or pipeline parallelism as well, it "
                "averages gradients of different layers or shards")
    per_param = [c for c in reduces if c["numel"] in param_sizes]
    if per_param:
        return (f"one all-reduce per parameter ({len(reduces)} calls of {sorted({c['numel'] for c in reduces})} "
                f"elements) instead of one per bucket ({len(sizes)} buckets of {sizes} elements): every call "
                f"pays the latency α again — bucketing exists to pay it once per bucket")
    stray = [c for c in reduces if c["bucket"] is None]
    if stray:
        return (f"an all-reduce of {stray[0]['numel']} elements, not a bucket (the buckets have {sizes}): "
                f"reduce each bucket's flat buffer — {BUCKET_RULE}")
    early = [c for c in reduces if c["phase"] == "backward" and c["ready"] < c["full"]]
    if early:
        c = early[0]
        return (f"bucket {c['bucket']} was all-reduced when only {c['ready']} of its {c['full']} gradients "
                f"were in it — reducing before a bucket is full sends the rest as zeros (or stale values): "
                f"{BUCKET_RULE}")
    for i in range(len(sizes)):
        n = len(of(reduces, bucket=i))
        if n > 1:
            return (f"bucket {i} was all-reduced {n} times in one step: the second all-reduce sums sums "
                    f"(gradients {dp}× too large, times the calls' volume) — reduce each bucket once")
        if n == 0:
            return f"bucket {i} was never all-reduced: {BUCKET_RULE}"
    if not of(reduces, phase="backward"):
        return ("every all-reduce ran after backward (in finish_grad_sync): no overlap — the buckets must "
                "be launched from on_grad_ready while backward still computes the earlier layers' gradients")
    blocking = [c for c in reduces if c["phase"] == "backward" and not c["async_op"]]
    if blocking:
        return (f"a blocking all-reduce in the hook (bucket {blocking[0]['bucket']}, async_op=False): backward "
                "stops until the bucket is reduced — no overlap. Pass async_op=True, keep the Work in "
                "self.handles and wait for it in finish_grad_sync")
    unwaited = [c for c in reduces if not c["waited"]]
    if unwaited:
        return (f"the all-reduce of bucket {unwaited[0]['bucket']} was never waited before the step: an async "
                "all-reduce may still be writing the buffer — call .wait() on every handle in "
                "finish_grad_sync before reading the buffers")
    return None


def check_grads(where: str, names: list[str], got: list[Any], expected: list[torch.Tensor], dp: int) -> None:
    """The gradients after finish_grad_sync: tensors, not N_d× the mean, then the mean's values."""
    for name, g in zip(names, got):
        if not isinstance(g, torch.Tensor):
            raise GradingError(f"{where}: {name}.grad is {'None' if g is None else kind_of(g)} after "
                               "finish_grad_sync — copy the averaged bucket back into every p.grad")
    if all(g.shape == e.shape and torch.allclose(g, dp * e, rtol=1e-5, atol=1e-7)
           for g, e in zip(got, expected)):
        raise GradingError(f"{where}: the gradients are {dp}× the whole batch's — the all-reduce sums the "
                           f"N_d = {dp} replicas' gradients: divide by self.dp")
    for name, g, e in zip(names, got, expected):
        assert_close(f"{where}, {name}.grad (vs the whole batch's on one model)", g, e, rtol=1e-5, atol=1e-6)


# --- 16.2 a ZeRO-2 step --------------------------------------------------------------------------------

def zero2_problem(calls: list[dict], step: int, alive: list[str], dp: int) -> str | None:
    calls = of(calls, step=step)
    if of(calls, kind="all_reduce"):
        return ("all-reduce instead of reduce-scatter: every rank receives the whole summed gradient "
                f"(twice the received volume of a reduce-scatter, and {dp}× the gradient memory ZeRO-2 "
                "keeps) — reduce_scatter_tensor(self.grad_shard[lo:hi], self.flat_grads(i), group=self.group) "
                "leaves each rank only its 1/N_d slice")
    scatters = of(calls, kind="reduce_scatter")
    if not scatters:
        return ("no reduce-scatter: each rank's gradient shard must be the sum over the ranks of its slice — "
                "minimegatron.collectives.reduce_scatter_tensor or dist.reduce_scatter_tensor" + WATCHED)
    if not of(scatters, phase="backward"):
        return ("the gradients were reduce-scattered only at step time: no overlap, and every full gradient "
                "lived until then — reduce-scatter a bucket in on_grad_ready as soon as it is full")
    if alive:
        return (f"full gradients still alive after backward ({', '.join(alive)}): ZeRO-2 keeps only 1/N_d of "
                "the gradients — set p.grad = None for the bucket's parameters once it is reduce-scattered")
    if not of(calls, kind="all_gather", phase="step"):
        return ("no all-gather in step(): each rank updated only its own shard, the other ranks' slices of "
                "the weights are stale — all-gather every bucket's updated master slice into the parameters"
                + WATCHED)
    return None


# --- 16.3 ZeRO-3's gather and release ------------------------------------------------------------------

def is_full(unit: Any) -> bool:
    return all(tuple(p.shape) == tuple(s) for p, s in zip(unit.params, unit.shapes))


def watch_zero3(model: Any, rec: CommLog, record: dict) -> None:
    """Wrap ``model.gather`` / ``model.release`` (instance attributes: the scaffold's hooks call them):
    check each call's effect at once (a GradingError inside the rank) and record what forward used."""
    gather, release = model.gather, model.release
    shards = [u.shard for u in model.units]
    sizes = [s.numel() for s in shards]

    def watched_gather(unit: Any) -> None:
        k, where = model.units.index(unit), f"Exercise 16.3 (dp={model.dp}, step {rec.step + 1})"
        alive = [j for j, u in enumerate(model.units) if j != k and is_full(u)]
        if alive:
            record["alive"].append((rec.phase, rec.step, k, alive))
        gather(unit)
        if not is_full(unit):
            shapes = [tuple(p.shape) for p in unit.params]
            if rec.phase == "backward":
                raise GradingError(f"{where}: in backward, after gather(unit {k}) its parameters are {shapes}, "
                                   "still freed — gathering in forward only: backward needs the full weights "
                                   "again (grad_input = grad_output · W); gather must all-gather every time")
            raise GradingError(f"{where}: after gather(unit {k}) its parameters have shapes {shapes}, expected "
                               f"{[tuple(s) for s in unit.shapes]}: set each p.data to its view of the "
                               "all-gathered flat vector")
        if rec.phase == "forward":
            record["used"][rec.step].append(flat(unit.params))

    def watched_release(unit: Any) -> None:
        k, where = model.units.index(unit), f"Exercise 16.3 (dp={model.dp}, step {rec.step + 1})"
        release(unit)
        s = unit.shard
        if not (isinstance(s, torch.Tensor) and s is shards[k] and s.numel() == sizes[k]):
            shown = "None" if s is None else kind_of(s)
            raise GradingError(f"{where}: after release(unit {k}) unit.shard is {shown} — releasing the "
                               f"shard too: keep unit.shard (the ({sizes[k]},) parameter the optimizer updates, "
                               "this rank's only copy); free only the full parameters")

    model.gather, model.release = watched_gather, watched_release


def zero3_problem(record: dict, expected_used: list[list[torch.Tensor]], dp: int) -> str | None:
    if record["alive"]:
        phase, step, k, alive = record["alive"][0]
        return (f"not releasing: when unit {k}'s gather ran ({phase}, step {step + 1}), units {alive} still "
                "held their full parameters — all parameters alive at once, no memory saved. release(unit) "
                "must free them (p.data = torch.empty(0) for each p) and keep only the shard")
    for step, (used, expected) in enumerate(zip(record["used"], expected_used)):
        for k, (u, e) in enumerate(zip(used, expected)):
            if torch.allclose(u, e, rtol=1e-5, atol=1e-6):
                continue
            earlier = [s for s in range(step) if torch.allclose(u, expected_used[s][k], rtol=1e-5, atol=1e-6)]
            if earlier:
                return (f"step {step + 1}: unit {k}'s forward used its weights of step {earlier[-1] + 1}, "
                        "before the optimizer's update — a stale shard: gather from the updated unit.shard "
                        "every time, not from a full copy kept from an earlier gather")
            return (f"step {step + 1}: unit {k}'s gathered weights differ from the model's (max error "
                    f"{(u - e).abs().max().item():.3e}): all-gather unit.shard over unit.group, in rank order, "
                    "and drop the padding")
    return None
