"""Exercises 05.1–05.2: the package (wrapped) and hand-written solutions pass; the stubs, the package's
own functions and every wrong solution of the battery (exercises/_ex05_mistakes.py) fail with the
message that names the mistake."""
import pytest

from exercises import _ex05_mistakes as M
from exercises import ex05_sequence_parallel as ex05
from exercises.grading import GradingError
from minimegatron.mpu import mappings


def test_references_and_hand_written_solutions_pass():
    assert ex05.grade_gather_from_sequence_parallel(lambda x, s: mappings.gather_from_sequence_parallel_region(x, s)
                                                    ).startswith("✓")
    assert ex05.grade_gather_from_sequence_parallel(M.Gather).startswith("✓")
    assert ex05.grade_sequence_parallel_row_linear(M.row).startswith("✓")


def test_untouched_stubs_fail_and_the_package_itself_is_refused():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 05.1"):
        ex05.grade_gather_from_sequence_parallel(ex05.GatherFromSequenceParallelRegion)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 05.2"):
        ex05.grade_sequence_parallel_row_linear(ex05.sequence_parallel_row_linear)
    with pytest.raises(GradingError, match="Exercise 05.1: that is the reference itself"):
        ex05.grade_gather_from_sequence_parallel(mappings.gather_from_sequence_parallel_region)
    with pytest.raises(GradingError, match="Exercise 05.2: that is the reference itself"):
        ex05.grade_sequence_parallel_row_linear(ex05.package_sequence_parallel_row_linear)
    assert ex05.TIMEOUT <= 15


@pytest.mark.parametrize("entry", M.GATHER_BATTERY, ids=[b[0] for b in M.GATHER_BATTERY])
def test_every_gather_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"(?s)^Exercise 05.1 \(world \d, tp=\d\), rank \d: .*{entry[2]}"):
        ex05.grade_gather_from_sequence_parallel(entry[1])


@pytest.mark.parametrize("entry", M.ROW_BATTERY, ids=[b[0] for b in M.ROW_BATTERY])
def test_every_row_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"(?s)^Exercise 05.2 \(world \d, tp=\d\), rank \d: .*{entry[2]}"):
        ex05.grade_sequence_parallel_row_linear(entry[1])
