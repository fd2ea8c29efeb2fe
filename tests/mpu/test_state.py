"""ParallelState on real ranks: its groups are DeepSpeed's pipe/data/model groups, and they work."""
import pytest
import torch
import torch.distributed as dist

from minimegatron.deepspeed_glue import DeepSpeedMPU
from minimegatron.launch import launch
from minimegatron.mpu.state import ParallelState, grid_groups, initialize_model_parallel

# every (tp, pp) whose product divides 8; dp = 8 / (tp·pp)
GRIDS = [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (4, 2), (1, 4), (2, 4), (1, 8)]


def _groups_on_ranks():
    """For every grid: this rank's coordinates and groups, and a sum over each group to prove it works."""
    out = {}
    for tp, pp in GRIDS:
        st = initialize_model_parallel(tp, pp)
        sums = {}
        for kind in ("tp", "dp", "pp", "mp"):
            t = torch.tensor([float(st.rank)])
            dist.all_reduce(t, group=getattr(st, f"{kind}_group"))
            sums[kind] = int(t.item())
        out[(tp, pp)] = dict(coords=(st.tp_rank, st.dp_rank, st.pp_rank), dp=st.dp,
                             tp=st.tp_ranks, dp_ranks=st.dp_ranks, pp=st.pp_ranks, sums=sums,
                             first=st.is_first_stage, last=st.is_last_stage,
                             mp_rank=DeepSpeedMPU(st).get_model_parallel_rank())
    return out


def test_groups_equal_deepspeed_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    results = launch(_groups_on_ranks, 8, timeout=120)
    for tp, pp in GRIDS:
        dp = 8 // (tp * pp)
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        lists = {kind: topo.get_axis_comm_lists(axis)
                 for kind, axis in (("tp", "model"), ("dp", "data"), ("pp", "pipe"))}
        for rank, res in enumerate(results):
            r = res[(tp, pp)]
            where = f"tp={tp} pp={pp} dp={dp} rank {rank}"
            coord = topo.get_coord(rank)
            assert r["coords"] == (coord.model, coord.data, coord.pipe), where
            assert r["dp"] == dp, where
            for kind, mine in (("tp", r["tp"]), ("dp", r["dp_ranks"]), ("pp", r["pp"])):
                ds_group = [g for g in lists[kind] if rank in g] or [[rank]]  # size-1 axes: no lists
                assert mine == ds_group[0], f"{where}: {kind} group {mine} != DeepSpeed's {ds_group[0]}"
                assert r["sums"][kind] == sum(mine), f"{where}: the {kind} process group is not {mine}"
            replica = topo.filter_match(data=coord.data)  # one model copy: all TP×PP ranks of it
            assert r["sums"]["mp"] == sum(replica), where
            assert r["first"] == (coord.pipe == 0) and r["last"] == (coord.pipe == pp - 1), where
            assert r["mp_rank"] == coord.pipe * tp + coord.model, where


def _bad_sizes():
    messages = []
    for tp, pp in ((3, 1), (8, 1), (2, 3), (1, 5)):
        try:
            initialize_model_parallel(tp, pp)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    t = torch.ones(1)  # every rank raised before any collective, so the world is still in step
    dist.all_reduce(t)
    return messages, t.item()


def test_bad_sizes_raise_before_any_collective():
    results = launch(_bad_sizes, 4, timeout=60)
    for messages, total in results:
        assert total == 4
        assert "not divisible by tp·cp·pp = 3·1·1" in messages[0]
        assert "larger than the world of 4 ranks" in messages[1]
        assert "not divisible by tp·cp·pp = 2·1·3" in messages[2]
        assert "larger than the world of 4 ranks" in messages[3]


def test_single_device_state_without_distributed():
    st = initialize_model_parallel()
    assert (st.tp, st.pp, st.dp, st.rank, st.tp_group) == (1, 1, 1, 0, None)
    assert st.is_first_stage and st.is_last_stage
    assert initialize_model_parallel() is not st  # nothing global: every call builds its own state
    assert st.rng_tracker is not ParallelState().rng_tracker  # and every state its own RNG tracker
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        initialize_model_parallel(2)


def test_grid_arithmetic_matches_docstring_example():
    # rank = (pp_rank·dp + dp_rank)·tp + tp_rank for tp=2, pp=2, dp=2
    st = ParallelState(tp=2, pp=2, dp=2, rank=6)
    assert (st.tp_rank, st.dp_rank, st.pp_rank) == (0, 1, 1)
    assert ParallelState.rank_of(1, 0, 1, tp=2, dp=2) == 5
    mpu = DeepSpeedMPU(st)  # the names DeepSpeed asks for; the state keeps only its own
    assert mpu.get_model_parallel_world_size() == 4 and mpu.get_data_parallel_world_size() == 2
    assert mpu.get_model_parallel_rank() == st.mp_rank == 2
    assert not hasattr(st, "get_model_parallel_rank") and not hasattr(mpu, "get_sequence_parallel_group")


def test_context_parallel_axis_sits_between_tp_and_dp():
    # Megatron's order tp-cp-dp-pp: rank = ((pp_rank·dp + dp_rank)·cp + cp_rank)·tp + tp_rank
    g = grid_groups(tp=2, pp=1, dp=2, cp=2)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["mp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # one replica = TP × PP at fixed (dp, cp)
    st = ParallelState(tp=2, cp=2, dp=2, pp=2, rank=13)  # 13 = ((1·2 + 1)·2 + 0)·2 + 1
    assert (st.tp_rank, st.cp_rank, st.dp_rank, st.pp_rank) == (1, 0, 1, 1)
    assert ParallelState.rank_of(1, 1, 1, tp=2, dp=2, cp_rank=0, cp=2) == 13
    assert st.dp_cp_rank == 2 and st.world_size == 16


def _cp_groups():
    st = initialize_model_parallel(2, 1, context_parallel_size=2)  # 8 ranks: tp2 cp2 dp2
    sums = {}
    for kind in ("tp", "cp", "dp", "dp_cp"):
        t = torch.tensor([float(st.rank)])
        dist.all_reduce(t, group=getattr(st, f"{kind}_group"))
        sums[kind] = (int(t.item()), sum(getattr(st, f"{kind}_ranks")))
    mpu = DeepSpeedMPU(st)  # DeepSpeed's "data parallel": the dp·cp ranks that average gradients
    return sums, (mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank(), st.dp_cp_rank)


def test_context_parallel_groups_on_real_ranks():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=4)  # what pipe.py gives DeepSpeed
    for rank, (sums, (size, dp_rank, dp_cp_rank)) in enumerate(launch(_cp_groups, 8, timeout=60)):
        for kind, (got, expected) in sums.items():
            assert got == expected, f"rank {rank}: the {kind} process group is not its ranks"
        assert size == 4 and dp_rank == dp_cp_rank == topo.get_coord(rank).data, rank


# ---- expert parallelism: EP carved from DP -------------------------------------------------------
EP_GRIDS = [(2, 1, 1, 2), (2, 2, 1, 2), (2, 1, 2, 2)]  # (tp, pp, cp, ep) on 8 ranks: dp = 4, 2, 2


def _coords(rank: int, tp: int, cp: int, dp: int) -> tuple[int, int, int, int]:
    """(pp, dp, cp, tp) indices of a rank, by division (rank = ((pp·dp + d)·cp + c)·tp + t)."""
    rest, t = divmod(rank, tp)
    rest, c = divmod(rest, cp)
    p, d = divmod(rest, dp)
    return p, d, c, t


def _ep_groups_on_ranks():
    out = {}
    for tp, pp, cp, ep in EP_GRIDS:
        st = initialize_model_parallel(tp, pp, context_parallel_size=cp, expert_model_parallel_size=ep)
        sums = {}
        for kind in ("ep", "edp"):
            t = torch.tensor([float(st.rank)])
            dist.all_reduce(t, group=getattr(st, f"{kind}_group"))
            sums[kind] = int(t.item())
        out[(tp, pp, cp, ep)] = dict(ep_rank=st.ep_rank, edp_rank=st.edp_rank, edp=st.edp,
                                     ep_ranks=st.ep_ranks, edp_ranks=st.edp_ranks, sums=sums)
    try:  # ep ∤ dp: raised by every rank before any group is made
        initialize_model_parallel(2, expert_model_parallel_size=3)
        out["bad"] = None
    except ValueError as e:
        out["bad"] = str(e)
    st = initialize_model_parallel(2)  # ep = 1: no EP group, the expert gradients average over dp
    out["ep1"] = (st.ep, st.ep_group is None, st.edp_group is st.dp_group, st.edp_ranks == st.dp_ranks)
    return out


def test_expert_parallel_groups_on_real_ranks():
    from deepspeed.utils.groups import _get_expert_parallel_ranks  # DeepSpeed's "E + M + D" layout

    results = launch(_ep_groups_on_ranks, 8, timeout=120)
    for tp, pp, cp, ep in EP_GRIDS:
        dp = 8 // (tp * pp * cp)
        if cp == 1:  # DeepSpeed knows no context parallelism: its data axis is our dp
            ds_ep, ds_edp = _get_expert_parallel_ranks(8, tp, ep, pp)
            assert sorted(map(sorted, ds_ep)) == sorted(grid_groups(tp, pp, dp, cp, ep)["ep"])
            assert sorted(map(sorted, ds_edp)) == sorted(grid_groups(tp, pp, dp, cp, ep)["edp"])
        for rank, res in enumerate(results):
            r, where = res[(tp, pp, cp, ep)], f"tp={tp} pp={pp} cp={cp} dp={dp} ep={ep} rank {rank}"
            p, d, c, t = _coords(rank, tp, cp, dp)
            same = [q for q in range(8) if _coords(q, tp, cp, dp)[::2] == (p, c)
                    and _coords(q, tp, cp, dp)[3] == t]  # the dp ranks of this (pp, cp, tp)
            ep_group = [q for q in same if _coords(q, tp, cp, dp)[1] // ep == d // ep]
            edp_group = [q for q in same if _coords(q, tp, cp, dp)[1] % ep == d % ep]
            assert (r["ep_rank"], r["edp_rank"], r["edp"]) == (d % ep, d // ep, dp // ep), where
            assert r["ep_ranks"] == ep_group and r["edp_ranks"] == edp_group, where
            assert len(ep_group) == ep and len(edp_group) == dp // ep, where
            assert r["sums"] == {"ep": sum(ep_group), "edp": sum(edp_group)}, f"{where}: process groups"
    for res in results:
        assert "ep=3 does not divide the data-parallel size dp=4" in res["bad"]
        assert res["ep1"] == (1, True, True, True)


def test_expert_parallel_size_validated_once():
    from minimegatron.config import ParallelConfig

    with pytest.raises(ValueError, match="ep=2 does not divide the data-parallel size dp=1"):
        ParallelConfig(tp=2, world_size=2, ep=2)
    with pytest.raises(ValueError, match="ParallelConfig.ep must be an int >= 1"):
        ParallelConfig(ep=0)
    with pytest.raises(ValueError, match="ep=4 does not divide"):
        grid_groups(tp=1, pp=1, dp=2, ep=4)
    with pytest.raises(RuntimeError, match="ep=2 needs 2\\+ ranks"):
        initialize_model_parallel(expert_model_parallel_size=2)
    assert ParallelConfig(tp=2, world_size=16, ep=4).dp == 8
    st = ParallelState(tp=2, dp=4, ep=2, rank=6)  # dp index 3: second EP group, EP index 1
    assert (st.dp_rank, st.ep_rank, st.edp_rank, st.edp) == (3, 1, 1, 2)
