"""Exercise 09.1: the reference passes its grader; the stub and typical mistakes fail precisely."""

import numpy as np
import pytest

from exercises import _ex09_mistakes as M
from exercises.ex09_data import build_sample_index, grade_build_sample_index
from exercises.grading import GradingError
from minimegatron.data.samples import build_sample_index as reference


def test_reference_and_a_hand_written_loop_pass_the_reference_itself_is_refused():
    assert grade_build_sample_index(lambda lengths, seq_len: reference(lengths, seq_len)).startswith("✓")
    assert grade_build_sample_index(M.sample_index).startswith("✓")
    with pytest.raises(GradingError, match="Exercise 09.1: that is the reference itself"):
        grade_build_sample_index(reference)


@pytest.mark.parametrize("entry", M.BATTERY, ids=[b[0] for b in M.BATTERY])
def test_every_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"^case '.*' \(lengths=.*\): .*{entry[2]}"):
        grade_build_sample_index(entry[1])


def test_untouched_stub_fails():
    with pytest.raises(GradingError, match="Exercise 09.1 is not implemented"):
        grade_build_sample_index(build_sample_index)


def test_wrong_number_of_rows_is_explained():
    def no_end_row(lengths, seq_len):
        return reference(lengths, seq_len)[:-1]

    with pytest.raises(GradingError, match=r"the end row is missing"):
        grade_build_sample_index(no_end_row)
    with pytest.raises(GradingError, match=r"got 1 rows, expected 3: 9 tokens hold n = \(9 - 1\) // 4 = 2"):
        grade_build_sample_index(lambda lengths, seq_len: reference(lengths, seq_len)[:1])


def test_first_wrong_row_is_reported():
    def boundary_off_by_one(lengths, seq_len):  # a token on a document boundary given to the previous doc
        starts = np.concatenate([[0], np.cumsum(lengths)])
        rows = []
        for position in range(0, (int(starts[-1]) - 1) // seq_len * seq_len + 1, seq_len):
            d = 0
            while d + 1 < len(lengths) and starts[d + 1] < position:  # should be <=
                d += 1
            rows.append([d, position - starts[d]])
        return np.array(rows)

    with pytest.raises(GradingError, match=r"case 'samples straddle documents'.*a token on a document boundary "
                                           r"was given to the document before it"):
        grade_build_sample_index(boundary_off_by_one)


def test_pointing_into_an_empty_document_is_named():
    def lands_on_empty(lengths, seq_len):
        rows = reference(lengths, seq_len).copy()
        if list(lengths[:2]) == [0, 0]:
            rows[0] = [0, 0]
        return rows

    with pytest.raises(GradingError, match=r"case 'empty documents in between'.*row 0 .*document 0 is empty"):
        grade_build_sample_index(lands_on_empty)


def test_exceptions_carry_the_traceback():
    def broken(lengths, seq_len):
        return 1 / 0

    with pytest.raises(GradingError, match=r"(?s)case 'one document, two samples'.*: your broken raised "
                                           r"ZeroDivisionError: division by zero\n.*return 1 / 0"):
        grade_build_sample_index(broken)
