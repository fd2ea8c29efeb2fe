"""Exercise 10: where a rank sits in the 3D grid, and which samples it trains on.

10.1  rank_coordinates(rank, tp, pp, dp) -> (tp_rank, dp_rank, pp_rank)

      The world of tp·pp·dp ranks is a 3-D grid, tensor-parallel index fastest, then data, then
      pipeline (DeepSpeed's PipeModelDataParallelTopology)::

          rank = (pp_rank · dp + dp_rank) · tp + tp_rank

      Invert it. Example: tp=2, pp=2, dp=2, rank 5 -> (1, 0, 1).

10.2  rank_groups(rank, tp, pp, dp) -> {"tp": [...], "dp": [...], "pp": [...]}

      The global ranks of the three groups ``rank`` belongs to, each sorted ascending: the ranks that
      differ from it only in the tensor-parallel index ("tp"), only in the data-parallel index ("dp"),
      only in the pipeline stage ("pp"). Example: tp=2, pp=2, dp=2, rank 5 ->
      {"tp": [4, 5], "dp": [5, 7], "pp": [1, 5]}.

10.3  replica_micro_batches(step, dp_rank, global_batch_size, micro_batch_size, dp) -> list[list[int]]

      Optimizer step ``step`` consumes the global batch of samples
      ``[step·G, (step+1)·G)`` (G = global_batch_size). Data-parallel replica ``d`` takes the d-th
      contiguous G/dp of them and cuts them into micro-batches of ``micro_batch_size``, in order::

          num_micro_batches = G / (micro_batch_size · dp)

      Return one list of sample indices per micro-batch. Example: step 1, dp_rank 1, G=8,
      micro_batch_size 2, dp 2 -> [[12, 13], [14, 15]].

10.4  choose_layout(scenario) -> minimegatron.plan.Layout

      Now *choose* the grid. For each scenario of ``SCENARIOS`` (a model, N devices of one kind, a
      global batch and a sequence length) return a Layout(tp, pp, dp, cp, zero, recompute,
      micro_batch) that uses all N devices, divides (heads by tp, layers by pp, the batch by
      dp·micro_batch), fits in 90 % of a device's memory and reaches at least 90 % of the tokens/s of
      the fastest layout the planner finds. Reason it out first — bytes per parameter per ZeRO stage
      (notebooks 07, 16), activations per layer (05, 08), what each kind of parallelism sends and over
      which link (01, 06, 14) — then try candidates with ``minimegatron.plan.estimate`` (not
      ``plan``, which ranks them all for you). The grader says which rule a layout breaks.

Grade with:  grade_rank_coordinates(rank_coordinates)   grade_rank_groups(rank_groups)
             grade_replica_micro_batches(replica_micro_batches)   grade_choose_layout(choose_layout)
The references are minimegatron.mpu.state (ParallelState, grid_groups) and
minimegatron.training (TrainConfig.num_micro_batches, training.data.micro_batches); 10.4's is
minimegatron.plan (exercises/_ex10_planning.py checks with it).
"""
from __future__ import annotations

from typing import Any, Callable

from exercises.grading import (MULTI_RANK_TIMEOUT, SINGLE_PROCESS_TIMEOUT, GradingError, call_candidate,
                               grader, kind_of, passed, run_graded, run_isolated)
from exercises import _ex10_planning
from exercises._ex10_planning import SCENARIOS  # noqa: F401 - the scenarios of 10.4, for the student
from minimegatron.mpu.state import ParallelState, grid_groups
from minimegatron.plan import Layout
from minimegatron.training.args import TrainConfig
from minimegatron.training.data import micro_batches

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2), (4, 2, 1), (2, 3, 2), (1, 4, 3),
           (3, 1, 4), (2, 2, 4)]  # (tp, pp, dp)


def rank_coordinates(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """Your code (10.1): (tp_rank, dp_rank, pp_rank) of ``rank``."""
    raise NotImplementedError("Exercise 10.1: invert rank = (pp_rank·dp + dp_rank)·tp + tp_rank "
                              "-> return (tp_rank, dp_rank, pp_rank)")


def rank_groups(rank: int, tp: int, pp: int, dp: int) -> dict[str, list[int]]:
    """Your code (10.2): {"tp": [...], "dp": [...], "pp": [...]}, the sorted ranks of each group."""
    raise NotImplementedError("Exercise 10.2: list the ranks that differ from `rank` only in the tp / "
                              "dp / pp index -> {'tp': [...], 'dp': [...], 'pp': [...]}")


def replica_micro_batches(step: int, dp_rank: int, global_batch_size: int, micro_batch_size: int,
                          dp: int) -> list[list[int]]:
    """Your code (10.3): the sample indices of each micro-batch replica ``dp_rank`` trains on."""
    raise NotImplementedError("Exercise 10.3: replica d of step t reads samples t·G + d·G/dp + … in "
                              "micro-batches of micro_batch_size -> a list of lists of indices")


def choose_layout(scenario: str) -> Layout:
    """Your code (10.4): a Layout for ``SCENARIOS[scenario]`` that divides, fits and is fast."""
    raise NotImplementedError("Exercise 10.4: return a minimegatron.plan.Layout(tp=…, pp=…, dp=…, "
                              "zero=…, recompute=…, micro_batch=…) for each scenario in SCENARIOS")


@grader
def grade_choose_layout(candidate: Callable[[str], Layout], timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """Each scenario's layout checked with the planner (``exercises/_ex10_planning.py``). The planner's
    best layouts are found here first (the isolated child inherits them); the candidate runs in a
    separate process, ``timeout`` s."""
    for name in SCENARIOS:
        _ex10_planning.best_plan(name)
    return run_isolated(_ex10_planning.grade, candidate, timeout=timeout, role="choose_layout")


def _call(exercise: str, shown: str, candidate: Callable, *args: Any) -> Any:
    """``candidate(*args)``, the call shown as ``shown`` in what goes wrong."""
    return call_candidate(f"{exercise}, {shown}", candidate, *args, exercise=exercise)


@grader
def grade_rank_coordinates(candidate: Callable[[int, int, int, int], tuple[int, int, int]],
                           timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """Every rank of every layout in LAYOUTS against ParallelState's tp_rank / dp_rank / pp_rank.

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    return run_isolated(_grade_rank_coordinates, candidate, timeout=timeout, role="rank_coordinates")


def _ints(values: Any) -> list[int] | None:
    """``values`` as a list of ints, or None when they are not all integers."""
    try:
        if isinstance(values, (str, bytes, dict)) or any(isinstance(v, (str, bytes, bool)) for v in values):
            return None
        out = [int(v) for v in values]
        return out if all(o == v for o, v in zip(out, values)) else None
    except Exception:  # noqa: BLE001 - not iterable, or not numbers
        return None


def _grade_rank_coordinates(candidate: Callable) -> str:
    checked = 0
    for tp, pp, dp in LAYOUTS:
        for rank in range(tp * pp * dp):
            ref = ParallelState(tp=tp, pp=pp, dp=dp, rank=rank)
            expected = (ref.tp_rank, ref.dp_rank, ref.pp_rank)
            got = _call("Exercise 10.1", f"rank_coordinates({rank}, tp={tp}, pp={pp}, dp={dp})", candidate,
                        rank, tp, pp, dp)
            values = _ints(got) if isinstance(got, (tuple, list)) else None
            if values is None or len(values) != 3:
                raise GradingError(f"rank_coordinates({rank}, tp={tp}, pp={pp}, dp={dp}) returned "
                                   f"{kind_of(got)}; expected a tuple of three ints "
                                   "(tp_rank, dp_rank, pp_rank)")
            if tuple(values) != expected:
                names = [n for n, g, e in zip(("tp_rank", "dp_rank", "pp_rank"), values, expected) if g != e]
                raise GradingError(
                    f"rank_coordinates({rank}, tp={tp}, pp={pp}, dp={dp}) = {tuple(values)}, expected "
                    f"{expected}: "
                    f"wrong {', '.join(names)}. Check: rank = (pp_rank·{dp} + dp_rank)·{tp} + tp_rank = "
                    f"({expected[2]}·{dp} + {expected[1]})·{tp} + {expected[0]} = {rank}")
            checked += 1
    return passed(f"Exercise 10.1: coordinates of all {checked} ranks in {len(LAYOUTS)} layouts match "
                  "ParallelState")


@grader
def grade_rank_groups(candidate: Callable[[int, int, int, int], dict[str, list[int]]],
                      timeout: float = MULTI_RANK_TIMEOUT) -> str:
    """Every rank of every layout in LAYOUTS against the groups of ``grid_groups`` holding it, then the
    process groups of 8 real ranks.

    Both parts run in separate processes, each within ``timeout`` s: an exception, an endless loop or
    a hang in ``candidate`` is reported as a GradingError."""
    message = run_isolated(_grade_rank_groups, candidate, timeout=timeout, role="rank_groups")
    _check_groups_on_real_ranks(candidate, tp=2, pp=2, dp=2, timeout=timeout)
    return passed(message)


def _grade_rank_groups(candidate: Callable) -> str:
    checked = 0
    for tp, pp, dp in LAYOUTS:
        groups = grid_groups(tp, pp, dp)
        for rank in range(tp * pp * dp):
            got = _call("Exercise 10.2", f"rank_groups({rank}, tp={tp}, pp={pp}, dp={dp})", candidate,
                        rank, tp, pp, dp)
            if not isinstance(got, dict):
                raise GradingError(f"rank_groups({rank}, tp={tp}, pp={pp}, dp={dp}) returned "
                                   f"{kind_of(got)}; expected a dict with keys 'tp', 'dp', 'pp'")
            for kind in ("tp", "dp", "pp"):
                expected = sorted(next(g for g in groups[kind] if rank in g))
                if kind not in got:
                    raise GradingError(f"rank_groups({rank}, tp={tp}, pp={pp}, dp={dp}) has no key "
                                       f"{kind!r}; expected keys 'tp', 'dp', 'pp'")
                value = _ints(got[kind])
                if value is None:
                    raise GradingError(f"rank_groups({rank}, tp={tp}, pp={pp}, dp={dp})[{kind!r}] is "
                                       f"{kind_of(got[kind])}; expected a sorted list of ints (global ranks)")
                if value != expected:
                    hint = " (sort the ranks ascending)" if sorted(value) == expected else ""
                    raise GradingError(f"rank_groups({rank}, tp={tp}, pp={pp}, dp={dp})[{kind!r}] = {value}, "
                                       f"expected {expected}{hint}: the {kind.upper()} group holds the "
                                       f"ranks that differ from rank {rank} only in their {kind}_rank")
            checked += 1
    # the message only: grade_rank_groups prints it once the real ranks agree too
    return (f"Exercise 10.2: the TP, DP and PP groups of all {checked} ranks in {len(LAYOUTS)} "
            "layouts match minimegatron.mpu.state.grid_groups, and the process groups of 8 real ranks")


def _check_groups_on_real_ranks(candidate: Callable, tp: int, pp: int, dp: int,
                                timeout: float = MULTI_RANK_TIMEOUT) -> None:
    """On tp·pp·dp launched ranks: the candidate's groups are the process groups each rank really joins."""
    import torch.distributed as dist

    from minimegatron.mpu.state import initialize_model_parallel

    def on_rank() -> None:
        state = initialize_model_parallel(tp, pp)
        got = candidate(dist.get_rank(), tp, pp, dp)
        for kind in ("tp", "dp", "pp"):
            members = sorted(dist.get_process_group_ranks(getattr(state, f"{kind}_group")))
            value = _ints(got[kind]) if isinstance(got, dict) and kind in got else None
            if value != members:
                said = kind_of(got) if not isinstance(got, dict) else \
                    kind_of(got.get(kind)) if value is None else str(value)
                raise GradingError(f"rank {dist.get_rank()} joined the {kind.upper()} process group "
                                   f"{members}, your rank_groups says {said}")

    run_graded(on_rank, tp * pp * dp, timeout=timeout)


class _Indices:
    """A dataset whose item i is {"tokens": [i], "labels": [i]}: it shows which samples were read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        return {"tokens": torch.tensor([i]), "labels": torch.tensor([i])}


@grader
def grade_replica_micro_batches(candidate: Callable[..., list[list[int]]],
                                timeout: float = SINGLE_PROCESS_TIMEOUT) -> str:
    """Against the trainer's own reader (``training.data.micro_batches`` on an index dataset).

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    return run_isolated(_grade_replica_micro_batches, candidate, timeout=timeout,
                        role="replica_micro_batches")


def _grade_replica_micro_batches(candidate: Callable) -> str:
    cases = [(8, 2, 1), (8, 2, 2), (16, 2, 2), (32, 8, 1), (24, 2, 3), (16, 4, 4), (12, 1, 2)]  # G, b, dp
    checked = 0
    for g, b, dp in cases:
        cfg = TrainConfig(global_batch_size=g, micro_batch_size=b, dp=dp)
        data = _Indices(10 * g)
        for step in (0, 1, 3):
            for d in range(dp):
                expected = [t[:, 0].tolist() for t, _ in micro_batches(data, step * g, cfg, d)]
                where = (f"replica_micro_batches(step={step}, dp_rank={d}, global_batch_size={g}, "
                         f"micro_batch_size={b}, dp={dp})")
                got = _call("Exercise 10.3", where, candidate, step, d, g, b, dp)
                batches = None
                if got is not None and not isinstance(got, (str, bytes, dict)):
                    try:
                        batches = [_ints(mb) for mb in got]
                    except Exception:  # noqa: BLE001 - not iterable
                        batches = None
                if batches is None or any(mb is None for mb in batches):
                    raise GradingError(f"{where} returned {kind_of(got)}; expected a list of lists of ints")
                got = batches
                if len(got) != len(expected):
                    raise GradingError(f"{where}: {len(got)} micro-batches, expected {len(expected)} = "
                                       f"G / (micro_batch_size · dp) = {g} / ({b} · {dp}) "
                                       f"(TrainConfig.num_micro_batches = {cfg.num_micro_batches})")
                for m, (gm, em) in enumerate(zip(got, expected)):
                    if gm != em:
                        raise GradingError(f"{where}: micro-batch {m} is {gm}, expected {em} (replica {d} "
                                           f"reads samples {expected[0][0]}..{expected[-1][-1]} of the "
                                           f"global batch {step * g}..{step * g + g - 1})")
                checked += 1
    return passed(f"Exercise 10.3: the micro-batches of {checked} (step, replica) pairs match the "
                  "trainer's data reader")
