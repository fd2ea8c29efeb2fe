"""RNG tracker on real ranks (tp=2, dp=2): dropout masks agree outside TP regions, differ inside."""
import pytest
import torch
import torch.nn.functional as F

from minimegatron.launch import launch
from minimegatron.mpu.random import RNGStatesTracker, model_parallel_seed
from minimegatron.mpu.state import ParallelState, initialize_model_parallel

ONES = torch.ones(2000)


def _masks():
    st = initialize_model_parallel(2)  # 4 ranks: TP groups [0,1] [2,3]
    tracker = model_parallel_seed(1234, st, device_type="cpu")
    assert tracker is st.rng_tracker  # the state owns it: nothing global
    outside = F.dropout(ONES, 0.5)
    with tracker.fork():
        inside = F.dropout(ONES, 0.5)
    outside_after = F.dropout(ONES, 0.5)
    with tracker.fork():
        inside_2 = F.dropout(ONES, 0.5)  # the forked stream advances: a new mask
    model_parallel_seed(1234, st, device_type="cpu")  # reseed: same masks again
    again = F.dropout(ONES, 0.5)
    with tracker.fork():
        inside_again = F.dropout(ONES, 0.5)
    torch.manual_seed(1234)  # without any fork: the default stream is the same as with forks in between
    plain = (F.dropout(ONES, 0.5), F.dropout(ONES, 0.5))
    return dict(tp_rank=st.tp_rank, outside=outside, inside=inside, outside_after=outside_after,
                inside_2=inside_2, again=again, inside_again=inside_again, plain=plain)


def test_dropout_masks_agree_outside_and_differ_inside_tp_regions():
    res = launch(_masks, 4, timeout=60)
    for r in res:
        assert torch.equal(r["outside"], res[0]["outside"]), "outside TP regions: same mask on all ranks"
        assert torch.equal(r["outside_after"], res[0]["outside_after"])
        assert torch.equal(r["outside"], r["plain"][0])
        assert torch.equal(r["outside_after"], r["plain"][1]), "fork() must not advance the default RNG"
        assert torch.equal(r["again"], r["outside"]) and torch.equal(r["inside_again"], r["inside"])
        assert not torch.equal(r["inside"], r["inside_2"])
        assert not torch.equal(r["inside"], r["outside"])
    # inside: different across the TP ranks of a group, the same for the same TP rank in each DP replica
    assert not torch.equal(res[0]["inside"], res[1]["inside"])
    assert torch.equal(res[0]["inside"], res[2]["inside"]) and torch.equal(res[1]["inside"], res[3]["inside"])


def test_tracker_states_replay_masks_and_errors_are_named():
    tracker = RNGStatesTracker()
    tracker.add("a", 7)
    saved = tracker.get_states()
    with tracker.fork("a"):
        first = torch.rand(5)
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(5), first)  # recomputation replays the same draw
    with pytest.raises(ValueError, match="seed 7 is already used"):
        tracker.add("b", 7)
    with pytest.raises(ValueError, match="'a' already exists"):
        tracker.add("a", 8)
    with pytest.raises(KeyError, match="model-parallel-rng.*model_parallel_seed"):
        with tracker.fork():
            pass
    tracker.reset()
    tracker.add("a", 7)  # after reset the seed is free again


def test_seeds_follow_megatron_offsets():
    own = RNGStatesTracker()
    model_parallel_seed(5, ParallelState(tp=4, rank=3), device_type="cpu", tracker=own)
    with own.fork():
        got = torch.rand(3)
    assert torch.equal(got, torch.rand(3, generator=torch.Generator().manual_seed(5 + 2718 + 3)))
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)))
