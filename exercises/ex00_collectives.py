"""Exercise 00: ranks and collectives.

00.1  ring_all_reduce — build all-reduce out of point-to-point messages around a ring.

Every rank holds a tensor x_r; return Σ_r x_r (a new tensor shaped like x) on every rank. Use only
dist.send / dist.recv / dist.isend / dist.irecv / dist.batch_isend_irecv: the grader makes the
ready-made collectives (all_reduce, reduce_scatter, all_gather, broadcast, ...) raise.
The contract: ranks talk only to their ring neighbours (send to r+1, receive from r-1, mod N); each
rank sends 2(N-1) messages of numel/N elements (rounded up: pad with zeros when numel is not a multiple
of N) — notebook 00 §5 shows why that is the least any all-reduce can move; any tensor shape, float or
integer dtype (integers summed exactly). Which chunk does rank r send at step s so that, after N-1 steps,
each rank holds one chunk summed over all ranks, and after N-1 more every rank holds all of them?

00.2  all_reduce_via_reduce_scatter_all_gather — the same sum from the two halves of an all-reduce,
      with dist.reduce_scatter_tensor and dist.all_gather_into_tensor (all_reduce is forbidden).

Grade them with:  grade_ring_all_reduce(ring_all_reduce)
                  grade_all_reduce_via_reduce_scatter_all_gather(all_reduce_via_reduce_scatter_all_gather)
The package's versions are in minimegatron/collectives.py (submitting them is refused); the grader
compares with the sum of every rank's input and names the usual mistakes (``_ex00_checks.py``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from exercises import _ex00_checks as C
from exercises.battery import each_candidate, refuse_reference, verdicts
from exercises.grading import GradingError, grader, passed, run_graded
from minimegatron import collectives


def ring_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Your code: Σ over ranks of x, as a ring reduce-scatter then a ring all-gather (N-1 steps each)."""
    # Hint: rank, n = dist.get_rank(), dist.get_world_size(). Pad x.reshape(-1) to n·c elements,
    # c = ceil(numel / n), and view it as (n, c). One step = post an isend to (rank + 1) % n and an irecv
    # from (rank - 1) % n together (dist.batch_isend_irecv), then wait() on both: a blocking send on
    # every rank at once would wait forever for a recv nobody has posted yet.
    raise NotImplementedError("Exercise 00.1: implement ring_all_reduce — a reduce-scatter phase and an "
                              "all-gather phase around the ring, N-1 isend/irecv steps each")


def all_reduce_via_reduce_scatter_all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """Your code: Σ over ranks of x, as dist.reduce_scatter_tensor then dist.all_gather_into_tensor."""
    # Hint: both need a flat tensor whose numel is a multiple of the world size: pad, then cut the
    # padding off the gathered result and reshape it like x.
    raise NotImplementedError("Exercise 00.2: implement all_reduce_via_reduce_scatter_all_gather — "
                              "reduce_scatter_tensor into your chunk, then all_gather_into_tensor")


# --- grading -----------------------------------------------------------------------------------------

CASES: list[tuple[tuple[int, ...], torch.dtype]] = [
    ((8,), torch.float32),          # numel a multiple of 2 and 4
    ((7,), torch.float32),          # not a multiple: needs padding
    ((1,), torch.float32),          # fewer elements than ranks
    ((3, 5), torch.float32),        # 2-D, 15 elements
    ((2, 3, 4), torch.float64),
    ((1001,), torch.float32),
    ((6,), torch.int64),            # integers: the sum must be exact
]
POINT_TO_POINT = "dist.send / dist.recv / dist.isend / dist.irecv / dist.batch_isend_irecv"
ALL_REDUCE_LIKE = ("all_reduce", "all_reduce_coalesced", "reduce")
EVERY_COLLECTIVE = ALL_REDUCE_LIKE + (
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather",
    "all_gather_into_tensor", "all_gather_single", "all_gather_object", "all_to_all", "all_to_all_single",
    "broadcast", "gather", "scatter")


def _case_input(rank: int, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * index + rank)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)


def _forbid(names: Sequence[str], exercise: str, allowed: str) -> dict[str, Callable]:
    """Make torch.distributed.<name> raise on this rank (the grader's ranks are forked: nothing leaks)."""
    saved = {}
    for name in names:
        if hasattr(dist, name):
            saved[name] = getattr(dist, name)

            def refuse(*args, _name=name, **kwargs):
                raise GradingError(f"{exercise}: your code called dist.{_name}, which this exercise asks you "
                                   f"to build yourself; use only {allowed}")
            setattr(dist, name, refuse)
    return saved


TIMEOUT = 15.0  # s per world size: seven small tensors — a hang is reported well before a minute


def _guard_sizes(exercise: str) -> dict[str, Callable]:
    """reduce_scatter_tensor / all_gather_into_tensor with sizes that do not fit abort the process in
    some torch versions' gloo (a failed check in C++): check them first and say what is wrong."""
    saved = {}
    for name, big_arg in (("reduce_scatter_tensor", 1), ("all_gather_into_tensor", 0)):
        if not hasattr(dist, name):
            continue
        saved[name] = fn = getattr(dist, name)

        def guarded(*args, _fn=fn, _name=name, _big=big_arg, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)][:2]
            n = dist.get_world_size(kwargs.get("group"))
            if len(tensors) == 2 and tensors[_big].numel() != n * tensors[1 - _big].numel():
                raise GradingError(f"{exercise}: dist.{_name} got tensors of {tensors[0].numel()} and "
                                   f"{tensors[1].numel()} elements: the full one must be exactly N = {n} times the "
                                   "chunk — pad the flat tensor with zeros to a multiple of N")
            return _fn(*args, **kwargs)
        setattr(dist, name, guarded)
    return saved


def _run_cases(candidate, forbidden: Sequence[str], exercise: str, allowed: str) -> list[object]:
    """On every rank: the candidate on each case's input, with the ready-made collectives barred."""
    rank, n = dist.get_rank(), dist.get_world_size()
    guarded = _guard_sizes(exercise)
    saved = _forbid(forbidden, exercise, allowed)
    got = []
    try:
        for i, (shape, dtype) in enumerate(CASES):
            x = _case_input(rank, i, shape, dtype)
            try:
                y = candidate(x.clone())
            except NotImplementedError:
                raise
            except GradingError as err:
                if "pad the flat tensor" not in str(err):
                    raise
                raise GradingError(f"{err} (world_size={n}, input shape {shape})") from None
            except Exception as err:  # noqa: BLE001 - a size the code does not handle: named
                numel = x.numel()
                if numel % n == 0:
                    raise
                raise GradingError(f"{exercise}: world_size={n}, input shape {shape}: your code raised "
                                   f"{type(err).__name__} ({str(err)[:150]}) — numel {numel} is not a multiple of "
                                   f"{n}: pad the flat tensor with zeros to a multiple of N (and cut the padding "
                                   "off the result)") from None
            got.append(y.detach().clone() if isinstance(y, torch.Tensor) else y)
    finally:
        for restore in (saved, guarded):  # the reverse order of the patches
            for name, fn in restore.items():
                setattr(dist, name, fn)
    return got


REFERENCES = {"00.1": (collectives.ring_all_reduce,), "00.2": (collectives.all_reduce_via_reduce_scatter_all_gather,)}
SETTINGS = {"00.1": (EVERY_COLLECTIVE, POINT_TO_POINT),
            "00.2": (ALL_REDUCE_LIKE, "dist.reduce_scatter_tensor and dist.all_gather_into_tensor")}


def _launch(part: str, candidates: list, world_size: int, timeout: float, catch: bool) -> list[list]:
    forbidden, allowed = SETTINGS[part]
    return run_graded(each_candidate, world_size, _run_cases, candidates, forbidden, f"Exercise {part}", allowed,
                      catch=catch, timeout=timeout)


def _grade(candidate, part: str, world_sizes: Sequence[int], timeout: float) -> str:
    refuse_reference(f"Exercise {part}", candidate, *REFERENCES[part])
    for world_size in world_sizes:
        per_rank = _launch(part, [candidate], world_size, timeout, catch=False)
        C.judge(part, world_size, [results[0][1] for results in per_rank])
    return passed(f"Exercise {part}: matches the sum over the ranks on world sizes {tuple(world_sizes)}, "
                  f"{len(CASES)} tensors each (odd sizes included)")


def battery_verdicts(part: str, candidates: Sequence[Callable], world_sizes: Sequence[int] = (2, 4),
                     timeout: float = TIMEOUT) -> list[str]:
    """Grade many candidates of ``part`` in one launch per world size (the tests' batteries): for each,
    "✓ ..." or the message of its first failure. Only candidates that behave alike on every rank."""
    verdict: list[str | None] = []
    for c in candidates:
        try:
            refuse_reference(f"Exercise {part}", c, *REFERENCES[part])
            verdict.append(None)
        except GradingError as err:
            verdict.append(str(err))
    for world_size in world_sizes:
        live = [i for i, v in enumerate(verdict) if v is None]
        if live:
            per_rank = _launch(part, [candidates[i] for i in live], world_size, timeout, catch=True)
            for i, v in zip(live, verdicts(lambda res: C.judge(part, world_size, res) or "", per_rank)):
                verdict[i] = v or None
    return [v or f"✓ Exercise {part}" for v in verdict]


@grader
def grade_ring_all_reduce(candidate: Callable[..., torch.Tensor], world_sizes: Sequence[int] = (2, 4),
                          timeout: float = TIMEOUT) -> str:
    """Run ``candidate(x)`` on real ranks for every case and world size; compare with the sum of every
    rank's input, computed in the grader; a wrong result is described chunk by chunk (which ranks'
    inputs each chunk sums), so that a missing phase or an off-by-one step is named.

    Returns "✓ ..." (and prints it); raises GradingError saying what is wrong: not implemented, a
    forbidden collective, an exception (with traceback), a hang (timeout), wrong shape or wrong values."""
    return _grade(candidate, "00.1", world_sizes, timeout)


@grader
def grade_all_reduce_via_reduce_scatter_all_gather(candidate: Callable[..., torch.Tensor],
                                                   world_sizes: Sequence[int] = (2, 4),
                                                   timeout: float = TIMEOUT) -> str:
    """Like grade_ring_all_reduce; here only dist.all_reduce (and reduce) are barred."""
    return _grade(candidate, "00.2", world_sizes, timeout)
