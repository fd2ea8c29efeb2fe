"""Exercises 06.1–06.2: the references pass their graders; stubs and typical mistakes fail precisely."""
import pytest
import torch
import torch.distributed as dist

from exercises import ex06_pipeline as ex06
from exercises.grading import GradingError
from minimegatron import schedules


def _student(stage, order, micro_batches, loss_fn, state, shape, blocking=False, scale=True):
    """A plain solution, with the two classic mistakes as switches."""
    m, sends, live, losses = len(micro_batches), [], {}, []
    prev = None if state.is_first_stage else state.pp_ranks[state.pp_rank - 1]
    nxt = None if state.is_last_stage else state.pp_ranks[state.pp_rank + 1]

    def send(t, dst):
        if blocking:
            dist.send(t, dst)
        else:
            sends.append((dist.isend(t, dst), t))

    for kind, k in order:
        if kind == "F":
            x = micro_batches[k][0] if prev is None else torch.empty(shape)
            if prev is not None:
                dist.recv(x, prev)
                x.requires_grad_()
            y = stage(x)
            if nxt is None:
                losses.append(loss_fn(y, micro_batches[k][1]))
                y = losses[-1] / m if scale else losses[-1]
            else:
                send(y.detach(), nxt)
            live[k] = (x, y)
        else:
            x, y = live.pop(k)
            if nxt is None:
                y.backward()
            else:
                g = torch.empty_like(y)
                dist.recv(g, nxt)
                y.backward(g)
            if prev is not None:
                send(x.grad, prev)
    for h, _ in sends:
        h.wait()
    return float(torch.stack(losses).mean()) if losses else None


def test_references_pass():
    assert ex06.grade_one_f_one_b_order(schedules.one_f_one_b_order).startswith("✓")
    assert ex06.grade_run_schedule(lambda *a: schedules.run_schedule(*a).loss).startswith("✓")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 06.1"):
        ex06.grade_one_f_one_b_order(ex06.one_f_one_b_order)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 06.2"):
        ex06.grade_run_schedule(ex06.run_schedule)


def test_wrong_orders_are_explained():
    with pytest.raises(GradingError, match=r"stage 0 of p=1, m=2.*that is GPipe"):
        ex06.grade_one_f_one_b_order(schedules.gpipe_order)

    def too_few_warmup(s, p, m):
        return schedules.one_f_one_b_order(min(s + 1, p - 1), p, m)

    with pytest.raises(GradingError,
                       match=r"stage 0 of p=2, m=2.*1 forwards .*expected 2 = min\(p - stage, m\)"):
        ex06.grade_one_f_one_b_order(too_few_warmup)
    with pytest.raises(GradingError, match=r"every micro-batch 0..0 needs exactly one B"):
        ex06.grade_one_f_one_b_order(lambda s, p, m: [("F", k) for k in range(m)])
    with pytest.raises(GradingError, match=r"\('B', 0\) comes before \('F', 0\)"):
        ex06.grade_one_f_one_b_order(lambda s, p, m: [("B", 0), ("F", 0)])
    with pytest.raises(GradingError, match="expected a list of \\(kind, micro_batch\\) pairs"):
        ex06.grade_one_f_one_b_order(lambda s, p, m: 3)


def test_a_correct_student_solution_passes():
    assert ex06.grade_run_schedule(_student).startswith("✓")


def test_missing_one_over_m_is_named():
    with pytest.raises(GradingError,
                       match=r"GPipe, p=2, stage 0\): gradient of linear.weight is 4× too large"):
        ex06.grade_run_schedule(lambda *a: _student(*a, scale=False))


def test_blocking_sends_deadlock_in_1f1b():
    with pytest.raises(GradingError, match=r"(?s)1F1B, p=2\): timeout.*send with dist.isend"):
        ex06.grade_run_schedule(lambda *a: _student(*a, blocking=True), timeout=6)


def test_ignoring_the_order_is_caught():
    def always_gpipe(stage, order, *rest):
        return _student(stage, sorted(order, key=lambda w: w[0] == "B"), *rest)

    with pytest.raises(GradingError,
                       match=r"1F1B, p=2, stage 0\): the stage ran FFFFBBBB .* order was FFBFBFBB"):
        ex06.grade_run_schedule(always_gpipe)
