"""The overlap recorder: its arithmetic on hand-made intervals, and the ordering of a real backward on
gloo ranks (a bucket launches after its gradients, in bucket order, completes after launch). Times are
never asserted."""
import pytest
import torch

from minimegatron import launch
from minimegatron.measure.overlap import (OverlapTimeline, intersection_length, plot_overlap, subtract,
                                          total_length, union)
from tests.layers.hf_reference import VOCAB, tiny_gpt


def test_interval_arithmetic():
    assert union([(5, 8), (1, 3), (2, 4), (9, 9)]) == [(1, 4), (5, 8)]
    assert total_length([(1, 5), (3, 7), (10, 11)]) == 7       # queued buckets counted once
    assert intersection_length([(0, 10)], [(2, 4), (9, 13)]) == 3
    assert subtract([(0, 10)], [(2, 4), (5, 8), (9, 13)]) == [(0, 2), (4, 5), (8, 9)]
    assert subtract([(0, 1)], [(0, 1)]) == []


def test_hidden_share_and_exposed_time_on_a_synthetic_timeline():
    # backward 0..10; three buckets on the wire 2..4, 5..8, 9..13; finish_grad_sync returns at 13.5
    kw = dict(backward=(0.0, 10.0), finish=13.5, launch={0: 2.0, 1: 5.0, 2: 9.0},
              done={0: 4.0, 1: 8.0, 2: 13.0})
    overlapped = OverlapTimeline(blocking=False, **kw)
    assert overlapped.comm_s == 9.0                    # |C| = 2 + 3 + 4
    assert overlapped.hidden_s == 6.0                  # inside [0, 10]: 2 + 3 + 1
    assert overlapped.exposed_s == 3.0 and overlapped.hidden_share == pytest.approx(6 / 9)
    assert overlapped.wait_s == 3.5
    blocking = OverlapTimeline(blocking=True, **kw)    # backward stalls while a bucket is reduced
    assert blocking.compute_intervals() == [(0.0, 2.0), (4.0, 5.0), (8.0, 9.0)]
    assert blocking.hidden_s == 0.0 and blocking.exposed_s == 9.0 and blocking.hidden_share == 0.0
    summary = overlapped.summary()
    assert summary["messages"] == 3 and summary["step_s"] == 13.5 and summary["backward_s"] == 10.0
    assert OverlapTimeline(backward=(0, 1), finish=1, launch={}, done={}).hidden_share == 0.0


def _record():
    from minimegatron.data_parallel.ddp import BucketedDDP, NaiveDDP, OverlappedDDP
    from minimegatron.gpt import GPTModel
    from minimegatron.measure.overlap import record_overlap

    out = {}
    for cls in (NaiveDDP, BucketedDDP, OverlappedDDP):
        model = GPTModel(tiny_gpt(), init_seed=0)
        ddp = cls(model) if cls is NaiveDDP else cls(model, bucket_size_mb=0.05)
        ids = torch.randint(0, VOCAB, (2, 16))
        out[cls.__name__] = (record_overlap(ddp, ddp(ids, ids)),
                             None if cls is NaiveDDP else [b.names for b in ddp.buckets.buckets],
                             len(list(model.parameters())))
    return out


def test_a_real_backward_is_recorded_in_order_on_two_ranks():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    results = launch(_record, 2, timeout=120)
    for rank, result in enumerate(results):
        for name in ("BucketedDDP", "OverlappedDDP"):
            tl, buckets, n_params = result[name]
            assert tl.rank == rank and tl.blocking == (name == "BucketedDDP")
            assert tl.launch_order == list(range(len(buckets)))      # launched in bucket order
            arrivals = {}
            for b, param, t in tl.grads:
                arrivals.setdefault(b, []).append(param)
                assert t <= tl.ready[b] <= tl.launch[b]                # after all its gradients
            assert {b: sorted(p) for b, p in arrivals.items()} == \
                {b: sorted(names) for b, names in enumerate(buckets)}   # every gradient, once
            for b in range(len(buckets)):
                assert tl.launch[b] <= tl.done[b] <= tl.finish           # completion after launch
                assert tl.backward[0] <= tl.launch[b] <= tl.backward[1]   # launched from backward
            assert tl.hidden_s + tl.exposed_s == pytest.approx(tl.comm_s)
            assert 0.0 <= tl.hidden_share <= 1.0
        assert result["BucketedDDP"][0].hidden_share == 0.0             # blocking: nothing hidden
        naive, _, n_params = result["NaiveDDP"]
        assert len(naive.launch) == n_params and naive.hidden_share == 0.0
        assert min(naive.launch.values()) >= naive.backward[1]          # all after backward
    fig = plot_overlap([r["OverlappedDDP"][0] for r in results])
    assert isinstance(fig, Figure)


def test_record_overlap_needs_one_of_our_wrappers():
    from minimegatron.measure.overlap import record_overlap
    with pytest.raises(TypeError, match="needs a minimegatron.data_parallel.ddp wrapper"):
        record_overlap(torch.nn.Linear(2, 2), torch.zeros(()))
