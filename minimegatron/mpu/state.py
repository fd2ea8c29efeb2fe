"""ParallelState: the tensor-, context-, data- and pipeline-parallel groups carved out of one rank grid.

The world of ``N = tp · cp · dp · pp`` ranks is a 4-D grid read off ``torch.arange(N).view(pp, dp, cp,
tp)``: the tensor-parallel index varies fastest, then context, then data, then pipeline — Megatron's
order (``tp-cp-ep-dp-pp``)::

    rank = ((pp_rank · dp + dp_rank) · cp + cp_rank) · tp + tp_rank

    tp=2, pp=2, dp=2 (8 ranks):      stage 0            stage 1
                                  dp0: [0 1]         dp0: [4 5]       TP groups: [0,1] [2,3] [4,5] [6,7]
                                  dp1: [2 3]         dp1: [6 7]       DP groups: [0,2] [1,3] [4,6] [5,7]
                                                                      PP groups: [0,4] [1,5] [2,6] [3,7]
    tp=2, cp=2 (4 ranks):         cp0: [0 1]  cp1: [2 3]              CP groups: [0,2] [1,3]

Tensor-parallel ranks sit next to each other because they talk the most (every layer, forward and
backward); on a real node they share the fastest links. Context-parallel ranks come next: they pass
keys and values (ring) or all-to-all their heads every attention layer.

**CP ranks are data-parallel for the weights.** The ``cp`` ranks of one (dp, tp, pp) coordinate hold
the same weights and different pieces of the same sequences, so their gradients are averaged together
with the data-parallel ones: ``dp_cp_group`` (Megatron's "data parallel group with context
parallel", ``dp·cp`` ranks) is the group DeepSpeed is told is data-parallel. With cp = 1 it is
``dp_group``. DeepSpeed's ``PipeModelDataParallelTopology(pp, tp, dp·cp)`` (axes ``['pipe', 'data',
'model']``) then makes the same sets of ranks: its data index is ``dp_rank · cp + cp_rank``.

The object speaks only its own names (``tp_rank``, ``dp_group``, ``mp_group``, ...). DeepSpeed asks an
``mpu`` for Megatron's (``get_model_parallel_rank``, ``get_data_parallel_group``, ...): the adapter
``minimegatron.deepspeed_glue.DeepSpeedMPU(state)`` answers them, and is what ``deepspeed.initialize(mpu=...)``
receives. ("Model parallel" there means Megatron's definition: the TP×PP ranks that together hold one
copy of the model, ``mp_group`` here.)

Decided once, here: ``state.sequence_parallel`` is True only when sequence parallelism was requested
*and* ``tp > 1`` (at tp = 1 there is no sequence to split); layers read it as it is, never re-deciding.
The request itself stays readable as ``state.sequence_parallel_requested``. Likewise
``state.cp_comm`` (``"p2p"`` ring or ``"a2a"`` all-to-all, Megatron's ``cp_comm_type``) is validated by
``ParallelConfig`` before any rank starts.

**EP is carved from DP** (Megatron's expert-model-parallel axis, ``tp-cp-ep-dp-pp``). The ``dp``
ranks of one (pp, cp, tp) coordinate split into ``dp/ep`` groups of ``ep`` *consecutive* dp ranks:
with the dp index ``d``, ``ep_rank = d % ep`` and ``edp_rank = d // ep``. ``ep_group`` (expert-model-
parallel) is the ``ep`` ranks that share out the experts and exchange tokens by all-to-all;
``edp_group`` (expert-data-parallel) is the ``dp/ep`` ranks holding the *same* experts::

    tp=2, dp=4, ep=2 (8 ranks):   dp index d:  0     1     2     3
                                  ranks:      [0 1] [2 3] [4 5] [6 7]
                                  EP groups:  [0,2] [1,3] [4,6] [5,7]     (d ∈ {0,1} | d ∈ {2,3})
                                  EDP groups: [0,4] [1,5] [2,6] [3,7]     (d % 2 fixed)

Non-expert weights average over ``dp_group`` as before; an expert weight's gradient already sums its
EP group's tokens (the all-to-all's backward brings them home), so it is summed over ``edp_group`` and
divided by ``dp``. With cp > 1 the cp ranks hold the same experts too (and different tokens): their
expert gradients are summed over ``cp_group`` as well. With ep = 1 there is no ``ep_group`` (``None``:
no communication) and ``edp_group`` is ``dp_group``. DeepSpeed's own construction
(``deepspeed.utils.groups._get_expert_parallel_ranks``, "E + M + D") makes the same groups at cp = 1.

Nothing here is global: layers receive the ParallelState they live in, and it carries everything
rank-local they need — the groups and the RNG tracker of dropout inside TP regions
(``state.rng_tracker``, seeded by ``minimegatron.mpu.random.model_parallel_seed``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from minimegatron.config import ParallelConfig
from minimegatron.mpu.rng_tracker import RNGStatesTracker


@dataclass
class ParallelState:
    """Sizes, this rank's coordinates, its groups and its RNG tracker. ``group=None``: no communication.

    ``sequence_parallel`` given to the constructor is the request; after construction it reads
    ``requested and tp > 1``.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    cp: int = 1
    cp_comm: str = "p2p"
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    cp_group: Any = None
    dp_cp_group: Any = None        # DP × CP: the ranks that average gradients
    mp_group: Any = None           # TP × PP: one model replica
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    cp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_cp_ranks: list[int] = field(default_factory=lambda: [0])
    ep: int = 1                    # expert-model-parallel size, carved from dp (divides it)
    ep_group: Any = None           # the ep ranks that exchange tokens (None when ep = 1)
    edp_group: Any = None          # the dp/ep ranks holding the same experts (dp_group when ep = 1)
    ep_ranks: list[int] = field(default_factory=lambda: [0])
    edp_ranks: list[int] = field(default_factory=lambda: [0])
    rng_tracker: RNGStatesTracker = field(default_factory=RNGStatesTracker, repr=False, compare=False)
    sequence_parallel_requested: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sequence_parallel_requested = self.sequence_parallel
        self.sequence_parallel = self.sequence_parallel and self.tp > 1  # the one place it is decided

    # ---- grid arithmetic ------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def dp_cp_rank(self) -> int:
        """This rank's index in ``dp_cp_group`` (DeepSpeed's data-parallel index): dp_rank·cp + cp_rank."""
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def ep_rank(self) -> int:
        """This rank's index in ``ep_group``: dp_rank % ep (consecutive dp ranks form an EP group)."""
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        """This rank's index in ``edp_group``: dp_rank // ep."""
        return self.dp_rank // self.ep

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: how many ranks of a (pp, cp, tp) coordinate hold the same experts."""
        return self.dp // self.ep

    @property
    def context_parallel(self) -> bool:
        return self.cp > 1

    @property
    def mp_rank(self) -> int:
        """This rank's index in ``mp_group`` (its model replica's TP×PP ranks, in rank order)."""
        return self.pp_rank * self.tp + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @staticmethod
    def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int, cp_rank: int = 0,
                cp: int = 1) -> int:
        return ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

    def __deepcopy__(self, memo):  # process groups are process-wide handles: share them, never copy
        return self

    def __repr__(self) -> str:
        cp = f", cp {self.cp_rank}/{self.cp} ({self.cp_comm})" if self.cp > 1 else ""
        ep = f", ep {self.ep_rank}/{self.ep}" if self.ep > 1 else ""
        return (f"ParallelState(rank={self.rank}: tp {self.tp_rank}/{self.tp}{cp}, pp {self.pp_rank}/"
                f"{self.pp}, dp {self.dp_rank}/{self.dp}{ep}, sequence_parallel={self.sequence_parallel})")


def rank_grid(tp: int, pp: int, dp: int, cp: int = 1) -> torch.Tensor:
    """The global ranks laid out as ``grid[pp_rank, dp_rank, cp_rank, tp_rank]``."""
    return torch.arange(tp * cp * dp * pp).view(pp, dp, cp, tp)


def grid_groups(tp: int, pp: int, dp: int, cp: int = 1, ep: int = 1) -> dict[str, list[list[int]]]:
    """Every TP, CP, DP, DP×CP, PP, model-parallel, EP and EDP group of the grid, as global ranks.

    A group varies the named coordinates and fixes the others: read off :func:`rank_grid` by moving
    the named axes last and flattening them (``"tp"`` fixes (pp, dp, cp); ``"mp"`` = TP × PP fixes
    (dp, cp); ``"dp_cp"`` fixes (pp, tp)). For EP the dp axis is split in two, ``d = edp_rank·ep +
    ep_rank``: ``"ep"`` varies ep_rank, ``"edp"`` varies edp_rank (the rank grid itself is unchanged).
    """
    ParallelConfig(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep)  # ep must divide dp
    grid = rank_grid(tp, pp, dp, cp).view(pp, dp // ep, ep, cp, tp)  # (pp, dp/ep, ep, cp, tp)
    axes = {"pp": 0, "edp": 1, "ep": 2, "cp": 3, "tp": 4}

    def groups(*varying: str) -> list[list[int]]:
        varying = tuple(a for v in varying for a in (("edp", "ep") if v == "dp" else (v,)))
        fixed = [a for a in axes if a not in varying]
        g = grid.permute(*[axes[a] for a in fixed], *[axes[a] for a in varying])
        return [sorted(row) for row in g.reshape(-1, math.prod(g.shape[len(fixed):])).tolist()]

    return {"tp": groups("tp"), "cp": groups("cp"), "dp": groups("dp"), "pp": groups("pp"),
            "dp_cp": groups("dp", "cp"), "mp": groups("pp", "tp"), "ep": groups("ep"),
            "edp": groups("edp")}


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              sequence_parallel: bool = False,
                              context_parallel_size: int = 1,
                              cp_comm: str = "p2p",
                              expert_model_parallel_size: int = 1) -> ParallelState:
    """Build this rank's ParallelState from the initialised world (dp = world / (tp·cp·pp)).

    ``expert_model_parallel_size`` (ep) is carved from dp and must divide it (checked, with every
    other size, by ``ParallelConfig`` before any group is made).

    Every rank must call it (``new_group`` is collective). Without torch.distributed initialised,
    only tp = pp = cp = 1 is possible and a single-rank state is returned (plain single-device model).
    """
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    ep = expert_model_parallel_size
    if not dist.is_initialized():
        if tp * pp * cp * ep != 1:
            raise RuntimeError(f"tp={tp}, pp={pp}, cp={cp}, ep={ep} needs {tp * pp * cp * ep}+ ranks but "
                               "torch.distributed is not initialised; run inside "
                               "minimegatron.launch(fn, world_size) or torchrun")
        ParallelConfig(cp_comm=cp_comm)  # the same checks as a parallel run
        return ParallelState(sequence_parallel=sequence_parallel, cp_comm=cp_comm)
    world, rank = dist.get_world_size(), dist.get_rank()
    if max(tp, pp, cp) > world:
        raise ValueError(f"tensor/pipeline/context parallel size ({tp}/{pp}/{cp}) is larger than the "
                         f"world of {world} ranks; launch more ranks or choose smaller sizes")
    cfg = ParallelConfig(tp=tp, pp=pp, cp=cp, world_size=world, sequence_parallel=sequence_parallel,
                         cp_comm=cp_comm, ep=ep)
    state = ParallelState(tp=tp, pp=pp, dp=cfg.dp, cp=cp, rank=rank, sequence_parallel=sequence_parallel,
                          cp_comm=cp_comm, ep=ep)
    groups = grid_groups(tp, pp, cfg.dp, cp, ep)
    kinds = ("tp", "cp", "dp", "dp_cp", "pp", "mp") if cp > 1 else ("tp", "dp", "pp", "mp")
    kinds += ("ep", "edp") if ep > 1 else ()
    for kind in kinds:
        for ranks in groups[kind]:  # new_group must be called by every rank, for every group, in order
            g = dist.new_group(ranks)
            if rank in ranks:
                setattr(state, f"{kind}_group", g)
                if kind != "mp":
                    setattr(state, f"{kind}_ranks", ranks)
    if cp == 1:  # no context parallelism: the gradient-averaging group is the data-parallel one
        state.cp_ranks, state.dp_cp_group, state.dp_cp_ranks = [rank], state.dp_group, state.dp_ranks
    if ep == 1:  # no expert parallelism: every dp rank holds every expert
        state.ep_ranks, state.edp_group, state.edp_ranks = [rank], state.dp_group, state.dp_ranks
    return state
