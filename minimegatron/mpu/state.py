"""ParallelState: the tensor-, pipeline- and data-parallel groups carved out of one rank grid.

The world of ``N = tp · pp · dp`` ranks is laid out as a 3-D grid with the tensor-parallel index
varying fastest, then data, then pipeline — the order of DeepSpeed's
``PipeModelDataParallelTopology`` (axes ``['pipe', 'data', 'model']``), so that the groups made here
and the ones DeepSpeed's pipeline engine makes are the same sets of ranks::

    rank = (pp_rank · dp + dp_rank) · tp + tp_rank

    tp=2, pp=2, dp=2 (8 ranks):      stage 0            stage 1
                                  dp0: [0 1]         dp0: [4 5]       TP groups: [0,1] [2,3] [4,5] [6,7]
                                  dp1: [2 3]         dp1: [6 7]       DP groups: [0,2] [1,3] [4,6] [5,7]
                                                                      PP groups: [0,4] [1,5] [2,6] [3,7]

Tensor-parallel ranks sit next to each other because they talk the most (every layer, forward and
backward); on a real node they share the fastest links.

The object speaks only its own names (``tp_rank``, ``dp_group``, ``mp_group``, ...). DeepSpeed asks an
``mpu`` for Megatron's (``get_model_parallel_rank``, ``get_data_parallel_group``, ...): the adapter
``minimegatron.compat.DeepSpeedMPU(state)`` answers them, and is what ``deepspeed.initialize(mpu=...)``
receives. ("Model parallel" there means Megatron's definition: the TP×PP ranks that together hold one
copy of the model, ``mp_group`` here.)

Decided once, here: ``state.sequence_parallel`` is True only when sequence parallelism was requested
*and* ``tp > 1`` (at tp = 1 there is no sequence to split); layers read it as it is, never re-deciding.
The request itself stays readable as ``state.sequence_parallel_requested``.

Nothing here is global: layers receive the ParallelState they live in, and it carries everything
rank-local they need — the groups and the RNG tracker of dropout inside TP regions
(``state.rng_tracker``, seeded by ``minimegatron.mpu.random.model_parallel_seed``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    mp_group: Any = None           # TP × PP: one model replica
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    rng_tracker: RNGStatesTracker = field(default_factory=RNGStatesTracker, repr=False, compare=False)
    sequence_parallel_requested: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sequence_parallel_requested = self.sequence_parallel
        self.sequence_parallel = self.sequence_parallel and self.tp > 1  # the one place it is decided

    # ---- grid arithmetic ------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

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
    def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
        return (pp_rank * dp + dp_rank) * tp + tp_rank

    def __deepcopy__(self, memo):  # process groups are process-wide handles: share them, never copy
        return self

    def __repr__(self) -> str:
        return (f"ParallelState(rank={self.rank}: tp {self.tp_rank}/{self.tp}, pp {self.pp_rank}/"
                f"{self.pp}, dp {self.dp_rank}/{self.dp}, sequence_parallel={self.sequence_parallel})")


def grid_groups(tp: int, pp: int, dp: int) -> dict[str, list[list[int]]]:
    """Every TP, DP, PP and model-parallel group of the grid, as lists of global ranks."""
    r = lambda t, d, p: ParallelState.rank_of(t, d, p, tp, dp)  # noqa: E731
    return {
        "tp": [[r(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[r(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[r(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "mp": [sorted(r(t, d, p) for p in range(pp) for t in range(tp)) for d in range(dp)],
    }


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              sequence_parallel: bool = False) -> ParallelState:
    """Build this rank's ParallelState from the initialised world (dp = world / (tp·pp)).

    Every rank must call it (``new_group`` is collective). Without torch.distributed initialised,
    only tp = pp = 1 is possible and a single-rank state is returned (plain single-device model).
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if not dist.is_initialized():
        if tp * pp != 1:
            raise RuntimeError(f"tp={tp}, pp={pp} needs {tp * pp}+ ranks but torch.distributed is not "
                               "initialised; run inside minimegatron.launch(fn, world_size) or torchrun")
        return ParallelState(sequence_parallel=sequence_parallel)
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp > world or pp > world:
        raise ValueError(f"tensor/pipeline parallel size ({tp}/{pp}) is larger than the world of "
                         f"{world} ranks; launch more ranks or choose smaller sizes")
    cfg = ParallelConfig(tp=tp, pp=pp, world_size=world, sequence_parallel=sequence_parallel)
    state = ParallelState(tp=tp, pp=pp, dp=cfg.dp, rank=rank, sequence_parallel=sequence_parallel)
    groups = grid_groups(tp, pp, cfg.dp)
    for kind in ("tp", "dp", "pp", "mp"):
        for ranks in groups[kind]:  # new_group must be called by every rank, for every group, in order
            g = dist.new_group(ranks)
            if rank in ranks:
                setattr(state, f"{kind}_group", g)
                if kind != "mp":
                    setattr(state, f"{kind}_ranks", ranks)
    return state
