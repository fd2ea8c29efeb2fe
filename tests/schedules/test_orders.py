"""Interleaved 1F1B and ZB-H1 orders: complete, dependency-correct, and on the ideal machine exactly the
bubble formulas of minimegatron.measure; peak activations per schedule equal their formulas."""
import functools

import pytest

from minimegatron import schedules
from minimegatron.measure import interleaved_bubble_fraction, pipeline_bubble_fraction, zb_h1_bubble_fraction


def _forwards_before_first_backward(order):
    return next(i for i, w in enumerate(order) if w[0] == "B")


def test_interleaved_order_is_megatrons_for_p2_v2_m4():
    """Groups of p micro-batches go through chunk 0, then chunk 1; backward runs the chunks reversed."""
    order = [f"{kind}{k}.{c}" for kind, k, c in schedules.interleaved_order(0, 2, 4, 2)]
    assert " ".join(order) == ("F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 "
                               "B2.1 B3.1 B2.0 B3.0")
    order = [f"{kind}{k}.{c}" for kind, k, c in schedules.interleaved_order(1, 2, 4, 2)]
    assert " ".join(order) == ("F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 "
                               "F3.1 B3.1 B2.0 B3.0")


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("v", [1, 2, 3, 4])
def test_interleaved_bubble_and_memory_are_the_formulas(p, v):
    order_fn = functools.partial(schedules.interleaved_order, chunks=v)
    for m in (p, 2 * p, 3 * p, 8 * p):
        for s in range(p):
            order = order_fn(s, p, m)
            schedules.check_order(order, m, v)
            warmup = min(2 * (p - s - 1) + (v - 1) * p, m * v)
            assert schedules.interleaved_warmup(s, p, m, v) == warmup
            assert _forwards_before_first_backward(order) == min(warmup + 1, m * v)  # w, then F B ...
            assert schedules.peak_in_flight(order) == min(warmup + 1, m * v) == \
                schedules.peak_in_flight_formula("interleaved", s, p, m, v)
        for t_f, t_b in ((1.0, 2.0), (1.0, 1.0)):  # a stage's times; a chunk takes 1/v of them
            slots = schedules.simulate(order_fn, p, m, forward_time=t_f / v, backward_time=t_b / v)
            assert len(slots) == 2 * p * m * v
            assert max(x.end for x in slots) == pytest.approx((m + (p - 1) / v) * (t_f + t_b))
            assert schedules.bubble_fraction(slots) == pytest.approx(interleaved_bubble_fraction(p, m, v))


def test_interleaving_shrinks_the_bubble_by_v():
    p, m = 4, 8
    one = schedules.bubble_fraction(schedules.simulate(schedules.one_f_one_b_order, p, m))
    for v in (2, 4):
        slots = schedules.simulate(functools.partial(schedules.interleaved_order, chunks=v), p, m,
                                   forward_time=1 / v, backward_time=2 / v)
        bubble_time = max(x.end for x in slots) - m * 3.0
        assert bubble_time == pytest.approx((p - 1) * 3.0 / v)
        assert schedules.bubble_fraction(slots) < one == pytest.approx(pipeline_bubble_fraction(p, m))


def test_zb_h1_order_defers_stage_s_weights_by_s():
    fmt = lambda order: " ".join(f"{kind}{k}" for kind, k in order)  # noqa: E731
    assert fmt(schedules.zb_h1_order(0, 2, 4)) == "F0 F1 B0 W0 F2 B1 W1 F3 B2 W2 B3 W3"
    assert fmt(schedules.zb_h1_order(1, 2, 4)) == "F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3"
    assert fmt(schedules.zb_h1_order(3, 4, 3)) == "F0 B0 F1 B1 F2 B2 W0 W1 W2"


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_zb_h1_bubble_and_memory_are_the_formulas(p):
    for m in (p, p + 1, 2 * p, 4 * p):
        for s in range(p):
            order = schedules.zb_h1_order(s, p, m)
            schedules.check_order(order, m)
            assert sorted(k for kind, k in order if kind == "W") == list(range(m))
            # as 1F1B between F and B; 1F1B's stage-0 peak, min(p, m), between F and W on every stage
            assert schedules.peak_in_flight(order, until="B") == min(p - s, m)
            assert schedules.peak_in_flight(order) == min(p, m) == \
                schedules.peak_in_flight_formula("zb-h1", s, p, m)
        for t_f, t_b, t_w in ((1, 1, 1), (2, 3, 1), (3, 2, 2)):  # the paper's range: T_W <= T_F, T_B
            slots = schedules.simulate(schedules.zb_h1_order, p, m, t_f, t_b, t_w)
            assert len(slots) == 3 * p * m
            formula = zb_h1_bubble_fraction(p, m, t_f, t_b, t_w)
            assert schedules.bubble_fraction(slots) == pytest.approx(formula)


def test_zb_h1_is_a_third_of_1f1bs_bubble_time():
    p, m = 4, 8
    zb = schedules.simulate(schedules.zb_h1_order, p, m, 1.0, 1.0, 1.0)
    one = schedules.simulate(schedules.one_f_one_b_order, p, m, 1.0, 2.0)  # B + W = 1F1B's backward
    idle = lambda slots: max(x.end for x in slots) - m * 3.0  # noqa: E731
    assert idle(zb) == pytest.approx(idle(one) / 3) == pytest.approx(p - 1)


def test_gpipe_and_1f1b_peaks_are_their_formulas():
    p, m = 4, 8
    for s in range(p):
        assert schedules.peak_in_flight(schedules.gpipe_order(s, p, m)) == m == \
            schedules.peak_in_flight_formula("gpipe", s, p, m)
        assert schedules.peak_in_flight(schedules.one_f_one_b_order(s, p, m)) == p - s == \
            schedules.peak_in_flight_formula("1f1b", s, p, m)


def test_bad_inputs_are_one_line_errors():
    cases = [
        (lambda: schedules.interleaved_order(0, 2, 4, 0), "need chunks >= 1"),
        (lambda: schedules.interleaved_order(0, 2, 5, 2), r"m=5 is not a multiple of p; use m=6 or m=4"),
        (lambda: schedules.interleaved_order(0, 4, 3, 2), r"not a multiple of p; use m=4$"),
        (lambda: schedules.zb_h1_order(2, 2, 4), "0 <= stage < num_stages"),
        (lambda: schedules.check_order([("F", 0), ("F", 0), ("B", 0)], 1), "appears twice"),
        (lambda: schedules.check_order([("F", 0), ("W", 0), ("B", 0)], 1), r"\('W', 0\) comes before its B"),
        (lambda: schedules.check_order([("F", 0), ("B", 0)], 2), "lacks 2 unit"),
        (lambda: schedules.check_order([("F", 0, 2)], 1, 2), "out of range"),
        (lambda: schedules.work_item(("X", 0)), "unknown work"),
        (lambda: schedules.peak_in_flight_formula("pipedream", 0, 2, 4), "unknown schedule"),
        (lambda: schedules.simulate(lambda s, p, m: [("F", 0)], 2, 1), "stage 0: the order lacks"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    w_first = lambda s, p, m: [("F", 0), ("W", 0), ("B", 0)]  # noqa: E731
    with pytest.raises(ValueError, match="the orders deadlock"):
        schedules.simulate(w_first, 1, 1)


def test_formula_range_of_zb_h1_is_where_simulate_agrees():
    """Outside m >= p and T_W <= min(T_F, T_B) the schedule idles more than the in-range expression
    says, so the formula refuses there (simulate the order instead)."""
    def in_range_expression(p, m, t_f, t_b, t_w):
        bubble = (p - 1) * (t_f + t_b - t_w)
        return bubble / (m * (t_f + t_b + t_w) + bubble)
    for p, m, t_w in ((4, 2, 1), (4, 8, 2)):
        simulated = schedules.bubble_fraction(schedules.simulate(schedules.zb_h1_order, p, m, 1, 1, t_w))
        assert simulated > in_range_expression(p, m, 1, 1, t_w) + 0.05
        with pytest.raises(ValueError, match=r"holds for T_W <= min\(T_F, T_B\) and m >= p"):
            zb_h1_bubble_fraction(p, m, 1, 1, t_w)


def test_plot_schedule_draws_simulated_slots():
    import matplotlib

    matplotlib.use("Agg")
    slots = schedules.simulate(functools.partial(schedules.interleaved_order, chunks=2), 2, 4, 0.5, 1.0)
    ax = schedules.plot_schedule(slots)
    assert len(ax.patches) == len(slots) and "bubble 11.1%" in ax.get_title()
    assert {t.get_text() for t in ax.texts} >= {"F0.0", "B3.1"}
    with pytest.raises(ValueError, match="no slots"):
        schedules.plot_schedule([])
