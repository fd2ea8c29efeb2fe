"""Exercise 10: the references pass their graders; the stubs and typical mistakes fail precisely."""
import pytest

from exercises.ex10_training import (grade_rank_coordinates, grade_rank_groups, grade_replica_micro_batches,
                                     rank_coordinates, rank_groups, replica_micro_batches)
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
