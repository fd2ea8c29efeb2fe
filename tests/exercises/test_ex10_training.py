"""Exercise 10: the references pass their graders; the stubs and typical mistakes fail precisely."""
import pytest

from exercises.ex10_training import (choose_layout, grade_choose_layout, grade_rank_coordinates,
                                     grade_rank_groups, grade_replica_micro_batches, rank_coordinates,
                                     rank_groups, replica_micro_batches)
from exercises.grading import GradingError
from minimegatron.mpu.state import ParallelState, grid_groups
from minimegatron.training.args import TrainConfig


def reference_coordinates(rank, tp, pp, dp):
    s = ParallelState(tp=tp, pp=pp, dp=dp, rank=rank)
    return s.tp_rank, s.dp_rank, s.pp_rank


def reference_groups(rank, tp, pp, dp):
    groups = grid_groups(tp, pp, dp)
    return {k: sorted(next(g for g in groups[k] if rank in g)) for k in ("tp", "dp", "pp")}


def reference_micro_batches(step, dp_rank, g, b, dp):
    m = TrainConfig(global_batch_size=g, micro_batch_size=b, dp=dp).num_micro_batches
    first = step * g + dp_rank * (g // dp)
    return [list(range(first + k * b, first + (k + 1) * b)) for k in range(m)]


def test_references_pass():
    assert grade_rank_coordinates(reference_coordinates).startswith("✓")
    assert grade_rank_groups(reference_groups).startswith("✓")
    assert grade_replica_micro_batches(reference_micro_batches).startswith("✓")


@pytest.mark.parametrize("grade, stub, number", [
    (grade_rank_coordinates, rank_coordinates, "10.1"),
    (grade_rank_groups, rank_groups, "10.2"),
    (grade_replica_micro_batches, replica_micro_batches, "10.3"),
    (grade_choose_layout, choose_layout, "10.4"),
])
def test_untouched_stubs_fail(grade, stub, number):
    with pytest.raises(GradingError, match=f"Exercise {number} is not implemented"):
        grade(stub)


def test_pipeline_major_order_is_caught():
    def tp_then_pp(rank, tp, pp, dp):  # treats pp as the middle axis: rank = (dp_rank·pp + pp_rank)·tp + tp_rank
        return rank % tp, rank // (tp * pp), (rank // tp) % pp

    with pytest.raises(GradingError, match=r"rank_coordinates\(2, tp=2, pp=2, dp=2\) = \(0, 0, 1\), "
                                           r"expected \(0, 1, 0\): wrong dp_rank, pp_rank"):
        grade_rank_coordinates(tp_then_pp)


def test_unsorted_or_wrong_groups_are_named():
    def unsorted(rank, tp, pp, dp):
        groups = reference_groups(rank, tp, pp, dp)
        groups["dp"] = groups["dp"][::-1]
        return groups

    with pytest.raises(GradingError, match=r"\['dp'\] = \[1, 0\], expected \[0, 1\] \(sort the ranks"):
        grade_rank_groups(unsorted)

    def swapped(rank, tp, pp, dp):
        groups = reference_groups(rank, tp, pp, dp)
        groups["tp"], groups["dp"] = groups["dp"], groups["tp"]
        return groups

    with pytest.raises(GradingError, match=r"\['tp'\] = \[0\], expected \[0, 1\]"):
        grade_rank_groups(swapped)


def test_real_rank_check_reports_the_rank_and_its_process_group():
    from exercises.ex10_training import _check_groups_on_real_ranks

    def off_on_rank_5(rank, tp, pp, dp):
        groups = reference_groups(rank, tp, pp, dp)
        if rank == 5:
            groups["pp"] = [4, 5]
        return groups

    with pytest.raises(GradingError, match=r"rank 5: rank 5 joined the PP process group \[1, 5\], your "
                                           r"rank_groups says \[4, 5\]"):
        _check_groups_on_real_ranks(off_on_rank_5, tp=2, pp=2, dp=2)


def test_interleaved_replicas_are_caught():
    def strided(step, dp_rank, g, b, dp):  # replica d takes every dp-th sample instead of a contiguous block
        m = g // (b * dp)
        mine = list(range(step * g + dp_rank, step * g + g, dp))
        return [mine[k * b:(k + 1) * b] for k in range(m)]

    with pytest.raises(GradingError, match=r"dp_rank=0, global_batch_size=8, micro_batch_size=2, dp=2\): "
                                           r"micro-batch 0 is \[0, 2\], expected \[0, 1\]"):
        grade_replica_micro_batches(strided)


def test_wrong_micro_batch_count_is_explained():
    def one_batch(step, dp_rank, g, b, dp):
        per = g // dp
        return [list(range(step * g + dp_rank * per, step * g + (dp_rank + 1) * per))]

    with pytest.raises(GradingError, match=r"1 micro-batches, expected 4 = G / \(micro_batch_size · dp\)"):
        grade_replica_micro_batches(one_batch)


def test_exceptions_carry_the_traceback():
    with pytest.raises(GradingError, match=r"(?s)rank_coordinates\(0, tp=1, pp=1, dp=1\): your rank_coordinates "
                                           r"\(a lambda\) raised ZeroDivisionError.*rank // 0"):
        grade_rank_coordinates(lambda rank, tp, pp, dp: (rank // 0, 0, 0))


# ---- 10.4: choosing a layout, checked with the planner ------------------------------------------------
from minimegatron.plan import Layout  # noqa: E402

GPT, LLAMA = "gpt-1.3b/8xh100", "llama-13b/16xgaudi2"
# what a student reasons out: 1.3B fits on every H100 with ZeRO-1, so pure data parallelism; 13B needs
# its 208 GB of model states cut: two pipeline stages (half the layers each) and ZeRO-1 over dp = 8
HAND_CHOSEN = {GPT: Layout(dp=8, zero=1), LLAMA: Layout(pp=2, dp=8, zero=1)}


def test_hand_chosen_and_planner_layouts_pass():
    from exercises._ex10_planning import best_plan

    assert grade_choose_layout(HAND_CHOSEN.get).startswith("✓ Exercise 10.4")
    assert grade_choose_layout(lambda name: best_plan(name).layout).startswith("✓")


@pytest.mark.parametrize("wrong, message", [
    ((1, 2, 8), r"choose_layout\('llama-13b/16xgaudi2'\) returned a tuple.*expected a "
                r"minimegatron.plan.Layout"),
    (Layout(dp=8, zero=1), r"uses tp·pp·dp·cp = 1·1·8·1 = 8 devices, the cluster has 16"),
    (Layout(tp=16, zero=1), r"cannot run: tp=16 does not divide the 40 query heads"),
    (Layout(pp=16, zero=1), r"cannot run: pp=16 does not divide num_layers=40"),
    (Layout(dp=16, zero=1, micro_batch=32), r"global batch 256 is not divisible by dp·micro_batch = 16·32"),
    (Layout(pp=2, dp=8, zero=2), r"cannot run: ZeRO-2 with pp=2"),
    (Layout(dp=16, zero=0), r"needs 2\d\d.\d GB per device, 86.4 GB usable .* the largest part is optimizer "
                            r"\(\d+.\d GB\): shard the optimizer state"),
    (Layout(pp=4, dp=4, zero=1, micro_batch=8),
     r"the largest part is activations .*: recompute, a smaller micro"),
    (Layout(dp=16, zero=3),
     r"fits but reaches .* tokens/s, 4\d% of the best .* is data-parallel / ZeRO traffic — ZeRO-3 gathers"),
    (Layout(dp=16, zero=1, recompute="full"), r"fits but .* is compute — recomputation re-runs forward"),
    (Layout(tp=8, dp=2, zero=1), r"fits but .* is tensor-parallel traffic"),
])
def test_each_wrong_layout_is_rejected_with_its_own_message(wrong, message):
    answers = {**HAND_CHOSEN, LLAMA: wrong}
    with pytest.raises(GradingError, match=f"(?s){message}"):
        grade_choose_layout(answers.get)
