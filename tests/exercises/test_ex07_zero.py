"""Exercises 07.1–07.2: the references pass their graders (and are DeepSpeed's partition); stubs and
typical mistakes fail precisely."""
import pytest
import torch

from exercises import _ex07_mistakes as M
from exercises import ex07_zero as ex07
from exercises.grading import GradingError


_SumNotMean = M.step_with(mean=False)   # the battery's plain step with one switch flipped
_NoAllGather = M.step_with(gather=False)


def test_references_pass():
    assert ex07.grade_zero1_partition(lambda *a: ex07.reference_zero1_partition(*a)).startswith("✓")
    assert ex07.grade_zero1_partition(M.partition).startswith("✓")
    assert ex07.grade_zero1_adamw(type("Mine", (ex07.ReferenceZero1AdamW,), {"step": ex07.ReferenceZero1AdamW.step,
                                                                           "__doc__": "the reference's step, "
                                                                           "renamed"})).startswith("✓")
    assert ex07.grade_zero1_adamw(M.Student).startswith("✓")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 07.1"):
        ex07.grade_zero1_partition(ex07.zero1_partition)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 07.2"):
        ex07.grade_zero1_adamw(ex07.Zero1AdamW)


def test_partition_mistakes_are_explained():
    def unpadded(numel, dp, r):  # ceil(numel / dp) per rank, no alignment
        size = -(-numel // dp)
        return r * size, (r + 1) * size

    with pytest.raises(GradingError, match=r"numel=1, dp=1, rank 0\): got \(0, 1\), expected \(0, 2\) — you "
                                           r"padded to a multiple of dp = 1 only"):
        ex07.grade_zero1_partition(unpadded)
    with pytest.raises(GradingError, match=r"numel=1, dp=1, rank 0\): your slice has 3 elements; DeepSpeed "
                                           r"pads 1 up to 2 \(a multiple of alignment·dp = 2\)"):
        ex07.grade_zero1_partition(lambda numel, dp, r: (3 * r, 3 * r + 3))

    def reversed_ranks(numel, dp, r):
        return ex07.reference_zero1_partition(numel, dp, dp - 1 - r)

    with pytest.raises(GradingError, match=r"numel=1, dp=2, rank 0\): got \(2, 4\), expected \(0, 2\)"):
        ex07.grade_zero1_partition(reversed_ranks)
    with pytest.raises(GradingError, match="expected a pair \\(start, stop\\) of ints"):
        ex07.grade_zero1_partition(lambda n, dp, r: None)


def test_summed_gradients_are_caught_through_adams_state():
    # Adam is almost invariant to the gradient's scale, so the weights pass; m does not
    with pytest.raises(GradingError, match=r"dp=2, rank 0\): exp_avg is 2× Adam's .* divide by dp"):
        ex07.grade_zero1_adamw(_SumNotMean)


def test_missing_all_gather_is_named():
    with pytest.raises(GradingError,
                       match=r"dp=2, after step 1\): the ranks hold different weights .*all-gather"):
        ex07.grade_zero1_adamw(_NoAllGather)


def test_reference_partition_is_deepspeeds_zero1_engine():
    """The partition the graders use is the one a real DeepSpeed ZeRO-1 engine keeps (fp32 master)."""
    from minimegatron import launch
    from minimegatron.training.loop import preload

    preload()

    def rank():
        import deepspeed

        from minimegatron.deepspeed_glue import init_deepspeed_comm

        init_deepspeed_comm()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))  # 63 parameters
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                  "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()))
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        dp, r = torch.distributed.get_world_size(), torch.distributed.get_rank()
        start, stop = ex07.reference_zero1_partition(flat.numel(), dp, r)
        flat = torch.cat([flat, torch.zeros(stop * dp // (r + 1) - flat.numel())])
        master = engine.optimizer.single_partition_of_fp32_groups[0]
        return torch.equal(master, flat[start:stop])

    assert launch(rank, 2, timeout=120) == [True, True]


def test_the_references_themselves_are_refused():
    with pytest.raises(GradingError, match="Exercise 07.1: that is the reference itself"):
        ex07.grade_zero1_partition(ex07.reference_zero1_partition)
    with pytest.raises(GradingError, match="Exercise 07.2: that is the reference itself"):
        ex07.grade_zero1_adamw(ex07.ReferenceZero1AdamW)
    assert ex07.PARTITION_TIMEOUT <= 10 and ex07.ADAMW_TIMEOUT <= 15


@pytest.mark.parametrize("entry", M.PARTITION_BATTERY, ids=[b[0] for b in M.PARTITION_BATTERY])
def test_every_partition_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"^Exercise 07.1 \(numel=\d+, dp=\d, rank \d\): .*({entry[2]})"):
        ex07.grade_zero1_partition(entry[1])


@pytest.mark.parametrize("entry", M.STEP_BATTERY, ids=[b[0] for b in M.STEP_BATTERY])
def test_every_step_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"^Exercise 07.2 \(dp=2.*{entry[2]}"):
        ex07.grade_zero1_adamw(entry[1])
