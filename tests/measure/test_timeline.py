"""The bubble measured on DeepSpeed's real pipeline engine vs (p-1)/(m+p-1)."""
import pytest
import torch

from minimegatron import launch
from minimegatron.measure.timeline import (FixedTimeLayer, PipeEvent, PipelineTimeline, idle_intervals,
                                           measured_bubble_fraction, pipeline_bubble_fraction,
                                           plot_timeline)

# Fixed forward/backward time per micro-batch per stage (see FixedTimeLayer). The formula ignores
# the send/recv latency, which on a loaded 2-core machine running 4 ranks is a few ms per hop: the
# compute must dwarf it for a 5-point agreement.
T_F, T_B = 0.08, 0.16


def _preload_deepspeed():
    """Import DeepSpeed and torch._dynamo in this (parent) process before the ranks fork.

    ``deepspeed.initialize`` imports its Muon optimizer, whose ``@torch.compile`` pulls in
    torch._dynamo (``torch.optim``'s constructor does too): ~2 s of CPU per rank. Imported once here,
    every forked rank inherits it.
    """
    from minimegatron.compat import preload_deepspeed

    preload_deepspeed()


def _record(stages, micro_batches):
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from minimegatron.deepspeed_glue import init_deepspeed_comm

    init_deepspeed_comm()
    torch.manual_seed(0)
    module = PipelineModule([FixedTimeLayer(T_F, T_B) for _ in range(stages)], num_stages=stages,
                            loss_fn=lambda out, y: ((out - y) ** 2).mean(), partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "steps_per_print": 10**9, "optimizer": {"type": "SGD", "params": {"lr": 0.01}}}
    engine, *_ = deepspeed.initialize(model=module, config=config,
                                      model_parameters=list(module.parameters()))
    data = iter(lambda: (torch.randn(1, 4), torch.randn(1, 4)), None)
    engine.train_batch(data)  # warm-up: the first step also exchanges tensor shapes
    out = {}
    for m in micro_batches:
        engine.set_train_batch_size(m)
        with PipelineTimeline(engine) as timeline:
            engine.train_batch(data)
        out[m] = timeline.events
    assert "_INSTRUCTION_MAP" not in engine.__dict__  # detached: the engine is untouched
    return out


@pytest.mark.parametrize("stages, micro_batches", [(2, [1, 4, 8]), (4, [2, 4, 8])])
def test_measured_bubble_matches_the_formula(stages, micro_batches):
    _preload_deepspeed()
    per_rank = launch(_record, stages, stages, micro_batches, timeout=120)
    for m in micro_batches:
        events = [e for rank in per_rank for e in rank[m]]
        measured, theory = measured_bubble_fraction(events), pipeline_bubble_fraction(stages, m)
        assert abs(measured - theory) < 0.05, (
            f"p={stages} m={m}: measured {measured:.3f}, theory {theory:.3f}")
        forwards = [e for e in events if e.kind == "forward"]
        assert len(forwards) == stages * m and {e.micro_batch for e in forwards} == set(range(m))
        assert {e.stage for e in events} == set(range(stages))


def _toy_events():
    """Two stages, two micro-batches, unit times: F0 F1 B0 B1 on stage 1 shifted by one slot."""
    ev = []
    for stage, slots in ((0, [("forward", 0, 0), ("forward", 1, 1), ("backward", 0, 3), ("backward", 1, 5)]),
                         (1, [("forward", 0, 1), ("backward", 0, 2), ("forward", 1, 3), ("backward", 1, 4)])):
        for kind, mb, t in slots:
            ev.append(PipeEvent(stage, stage, kind, float(t), t + 1.0, 0, mb))
    return ev


def test_bubble_arithmetic_and_plot():
    events = _toy_events()
    assert measured_bubble_fraction(events, per_stage=True) == {0: pytest.approx(1 / 3),
                                                                 1: pytest.approx(1 / 3)}
    assert pipeline_bubble_fraction(2, 2) == pytest.approx(1 / 3)
    assert idle_intervals(events, rank=0) == [(2.0, 3.0), (4.0, 5.0)]
    import matplotlib
    matplotlib.use("Agg")
    ax = plot_timeline(events)
    assert "33.3%" in ax.get_title()


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="not a DeepSpeed PipelineEngine"):
        PipelineTimeline(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no pipeline events"):
        measured_bubble_fraction([])
    with pytest.raises(ValueError, match="micro_batches >= 1"):
        pipeline_bubble_fraction(4, 0)


def test_plot_labels_only_boxes_their_label_fits_and_no_two_overlap():
    """A live run has forwards far shorter than their backwards: their labels must not pile up."""
    import matplotlib
    matplotlib.use("Agg")
    events = [PipeEvent(0, 0, "forward", 0.001 * k, 0.001 * k + 0.0008, 0, k) for k in range(8)]
    events += [PipeEvent(0, 0, "backward", 0.01 + 0.2 * k, 0.01 + 0.2 * k + 0.19, 0, k) for k in range(8)]
    ax = plot_timeline(events)
    labels = [t for t in ax.texts if t.get_text()[:1] in "FB"]
    assert sorted(t.get_text() for t in labels) == [f"B{k}" for k in range(8)]  # forwards: 0.05 % wide each
    renderer = ax.figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
