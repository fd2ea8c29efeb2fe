"""Exercises 06.1–06.2: references and hand-written solutions pass; the untouched stubs and every wrong
solution of the battery (exercises/_ex06_mistakes.py) fail with the message that names the mistake —
a warm-up one too many is not called GPipe, a LIFO stash is caught by the micro-batch ids it ran."""
import re

import pytest

from exercises import _ex06_mistakes as M
from exercises import ex06_pipeline as ex06
from exercises.grading import GradingError
from minimegatron import schedules


def my_order(s, p, m):
    """DeepSpeed's layout written out: w = min(p - s, m) forwards, then B/F pairs, then the rest."""
    w = min(p - s, m)
    order = [("F", k) for k in range(w)]
    for k in range(m - w):
        order += [("B", k), ("F", k + w)]
    return order + [("B", k) for k in range(m - w, m)]


def test_references_and_hand_written_orders_pass():
    assert ex06.grade_one_f_one_b_order(my_order).startswith("✓ Exercise 06.1")
    assert ex06.grade_one_f_one_b_order(lambda s, p, m: schedules.deepspeed_order(s, p, m)).startswith("✓")


def test_the_order_stub_and_the_reference_itself_fail():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 06.1"):
        ex06.grade_one_f_one_b_order(ex06.one_f_one_b_order)
    with pytest.raises(GradingError, match=r"Exercise 06.1: that is the reference itself \(minimegatron.schedules"):
        ex06.grade_one_f_one_b_order(schedules.one_f_one_b_order)


@pytest.mark.parametrize("entry", M.ORDER_BATTERY, ids=[b[0] for b in M.ORDER_BATTERY])
def test_every_order_mistake_is_named(entry):
    _, candidate, message = entry
    with pytest.raises(GradingError, match=rf"(?s)^Exercise 06.1 \(stage \d of p=\d, m=\d micro-batches\): "
                                           rf".*{message}") as err:
        ex06.grade_one_f_one_b_order(candidate)
    if "GPipe" not in entry[0]:
        assert "that is GPipe" not in str(err.value)


def test_wrong_shapes_of_orders_are_explained():
    with pytest.raises(GradingError, match=r"every micro-batch 0..0 needs exactly one B"):
        ex06.grade_one_f_one_b_order(lambda s, p, m: [("F", k) for k in range(m)])
    with pytest.raises(GradingError, match=r"\('B', 0\) comes before \('F', 0\)"):
        ex06.grade_one_f_one_b_order(lambda s, p, m: [("B", 0), ("F", 0)])
    with pytest.raises(GradingError, match="expected a list of \\(kind, micro_batch\\) pairs"):
        ex06.grade_one_f_one_b_order(lambda s, p, m: 3)


# --- 06.2: the whole battery in one launch per (p, order) ----------------------------------------------

BATCHED = [b for b in M.RUN_BATTERY if not b[3]]
GOOD = [lambda *a: schedules.run_schedule(*a).loss, M.runner]


@pytest.fixture(scope="module")
def run_verdicts():
    return ex06.battery_verdicts([b[1] for b in BATCHED] + GOOD + [ex06.run_schedule])


def test_runners_pass_and_the_stub_fails(run_verdicts):
    assert run_verdicts[len(BATCHED):] == ["✓ Exercise 06.2"] * len(GOOD) + [run_verdicts[-1]]
    assert re.match(r"not implemented yet: .*Exercise 06.2", run_verdicts[-1])


@pytest.mark.parametrize("index", range(len(BATCHED)), ids=[b[0] for b in BATCHED])
def test_every_runner_mistake_is_named(run_verdicts, index):
    _, _, message, _ = BATCHED[index]
    assert re.search(rf"^Exercise 06.2 .*{message}", run_verdicts[index], re.S), run_verdicts[index]


def test_blocking_sends_deadlock_in_1f1b_and_the_reference_is_refused():
    """The public grader: GPipe p=2 passes, 1F1B p=2 hangs and is reported within the timeout."""
    name, candidate, message, _ = next(b for b in M.RUN_BATTERY if b[3])
    with pytest.raises(GradingError, match=message):
        ex06.grade_run_schedule(candidate, timeout=6)
    with pytest.raises(GradingError, match=r"Exercise 06.2: that is the reference itself"):
        ex06.grade_run_schedule(schedules.run_schedule)
    assert ex06.SCHEDULE_TIMEOUT <= 15 and ex06.ORDER_TIMEOUT <= 10
