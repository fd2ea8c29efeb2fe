"""Exercises 15.1–15.2: the package's and hand-written orders pass their graders; the stubs and every
usual mistake — each its own small function below — fail with the message that names it (and, where the
orders deadlock, says so)."""
import collections
import itertools

import pytest

from exercises import ex15_pipeline_schedules as ex15
from exercises.grading import GradingError
from minimegatron import schedules


# --- 15.1: hand-written interleaved orders (correct), and the pieces the mistakes are made of ------------

def warmup_count(s, p, m, v):
    return min(2 * (p - s - 1) + (v - 1) * p, m * v)


def lay_out(forwards, backwards, w):
    """1F1B's shape: w forwards, then one forward and one backward in turn, then the other backwards."""
    n = len(forwards)
    order = forwards[:w]
    for i in range(n - w):
        order += [forwards[w + i], backwards[i]]
    return order + backwards[n - w:]


def megatron_units(p, m, v):
    """(forwards, backwards) by nested loops: groups of p micro-batches, chunk by chunk."""
    forwards, backwards = [], []
    for group in range(m // p):
        for c in range(v):
            for k in range(group * p, (group + 1) * p):
                forwards.append(("F", k, c))
                backwards.append(("B", k, v - 1 - c))
    return forwards, backwards


def interleaved(s, p, m, v):
    return lay_out(*megatron_units(p, m, v), warmup_count(s, p, m, v))


def interleaved_by_queues(s, p, m, v):
    """Correct, written otherwise: pop from queues of pending forwards and backwards."""
    forwards = collections.deque(("F", g * p + k, c)
                                 for g in range(m // p) for c in range(v) for k in range(p))
    backwards = collections.deque(("B", k, v - 1 - c) for _, k, c in forwards)
    order = [forwards.popleft() for _ in range(warmup_count(s, p, m, v))]
    while forwards:
        order += [forwards.popleft(), backwards.popleft()]
    return order + list(backwards)


def test_references_and_hand_written_solutions_pass():
    for candidate in (ex15.package_interleaved_order, interleaved, interleaved_by_queues):
        assert ex15.grade_interleaved_order(candidate).startswith("✓ Exercise 15.1")
    for candidate in (ex15.package_zb_h1_order, zb_h1_by_queue, zb_h1_from_1f1b):
        assert ex15.grade_zb_h1_order(candidate).startswith("✓ Exercise 15.2")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="Exercise 15.1 is not implemented yet"):
        ex15.grade_interleaved_order(ex15.interleaved_order)
    with pytest.raises(GradingError, match="Exercise 15.2 is not implemented yet"):
        ex15.grade_zb_h1_order(ex15.zb_h1_order)


# --- 15.1: wrong interleaved orders ---------------------------------------------------------------------

def lifo_stack(s, p, m, v):  # each backward pops the newest forward
    forwards, _ = megatron_units(p, m, v)
    w, order, stack = warmup_count(s, p, m, v), [], []
    for i, (_, k, c) in enumerate(forwards):
        order.append(("F", k, c))
        stack.append((k, c))
        if i >= w:
            order.append(("B", *stack.pop()))
    return order + [("B", *unit) for unit in reversed(stack)]


def lifo_within_groups(s, p, m, v):  # in each group of p, the backwards take the newest micro-batch first
    forwards, _ = megatron_units(p, m, v)
    backwards = [("B", k - k % p + p - 1 - k % p, v - 1 - c) for _, k, c in forwards]
    return lay_out(forwards, backwards, warmup_count(s, p, m, v))


def chunks_not_reversed(s, p, m, v):  # the backward on chunk c, not v-1-c
    forwards, _ = megatron_units(p, m, v)
    return lay_out(forwards, [("B", k, c) for _, k, c in forwards], warmup_count(s, p, m, v))


def warmup_one_too_many(s, p, m, v):
    return lay_out(*megatron_units(p, m, v), min(2 * (p - s - 1) + (v - 1) * p + 1, m * v))


def warmup_one_too_few(s, p, m, v):
    return lay_out(*megatron_units(p, m, v), max(warmup_count(s, p, m, v) - 1, 0))


def warmup_of_1f1b(s, p, m, v):
    return lay_out(*megatron_units(p, m, v), min(p - 1 - s, m * v))


def warmup_mirrored(s, p, m, v):  # the formula with s for p-1-s: the first stage gets the shortest
    return lay_out(*megatron_units(p, m, v), warmup_count(p - 1 - s, p, m, v))


def warmup_uncapped(s, p, m, v):  # as Megatron's code writes it, without the min
    forwards = lambda i: ("F", i // (p * v) * p + i % p, i % (p * v) // p)  # noqa: E731
    w, total = 2 * (p - s - 1) + (v - 1) * p, m * v
    order = [forwards(i) for i in range(w)]
    for i in range(total - w):
        order += [forwards(w + i), ("B", forwards(i)[1], v - 1 - forwards(i)[2])]
    return order + [("B", forwards(i)[1], v - 1 - forwards(i)[2]) for i in range(total - w, total)]


def warmup_uncapped_sliced(s, p, m, v):  # the same with slices: backwards[n - w:] then drops some
    return lay_out(*megatron_units(p, m, v), 2 * (p - s - 1) + (v - 1) * p)


def micro_batch_major(s, p, m, v):  # all chunks of one micro-batch in a row
    forwards = [("F", k, c) for k in range(m) for c in range(v)]
    return lay_out(forwards, [("B", k, v - 1 - c) for _, k, c in forwards], warmup_count(s, p, m, v))


def all_m_per_chunk(s, p, m, v):  # every micro-batch through chunk 0, then chunk 1, ...
    forwards = [("F", k, c) for c in range(v) for k in range(m)]
    return lay_out(forwards, [("B", k, v - 1 - c) for _, k, c in forwards], warmup_count(s, p, m, v))


def plain_1f1b(s, p, m, v):
    return [(kind, k, 0) for kind, k in schedules.one_f_one_b_order(s, p, m)]


def pairs(s, p, m, v):
    return [(kind, k) for kind, k, _ in interleaved(s, p, m, v)]


def a_forward_twice(s, p, m, v):
    order = interleaved(s, p, m, v)
    return order[:1] + order


def the_last_backward_missing(s, p, m, v):
    return interleaved(s, p, m, v)[:-1]


def a_backward_before_its_forward(s, p, m, v):  # the second steady pair run B first
    order = interleaved(s, p, m, v)
    w = warmup_count(s, p, m, v)
    if m * v - w >= 2:
        order[w + 2], order[w + 3] = order[w + 3], order[w + 2]
    return order


def a_backward_early(s, p, m, v):  # one backward moved before the forward it should follow
    order = interleaved(s, p, m, v)
    w = warmup_count(s, p, m, v)
    if s == 0 and w >= 2 and m * v - w >= 2:
        order[w + 2], order[w + 3] = order[w + 3], order[w + 2]
    return order


DEADLOCKS = r".*Your orders DEADLOCK \(schedules.simulate, every stage running yours\): every stage waits"


@pytest.mark.parametrize("mistake, message", [
    (lifo_stack, r"stage=0, num_stages=1, num_micro_batches=2, chunks=2\): on chunk 0, micro-batch 1's "
                 r"backward runs before micro-batch 0's: newest first \(LIFO\).*oldest first \(FIFO\)"),
    (lifo_within_groups, r"num_stages=2, num_micro_batches=2, chunks=1\): on chunk 0, micro-batch 1's "
                         r"backward runs before micro-batch 0's: newest first \(LIFO\)"),
    (chunks_not_reversed, r"the backward runs the chunks in the forward's order \(chunk 0 first\): backwards "
                          r"go through the chunks last-to-first.*chunk v−1 first.*chunk 0 last" + DEADLOCKS),
    (warmup_one_too_many, r"one warm-up forward too many: \d+ on stage \d, expected "
                          r"w = min\(2\(p−s−1\) \+ \(v−1\)·p, m·v\)"),
    (warmup_one_too_few, r"chunks=2\): one warm-up forward too few: 0 on stage 0, expected "
                         r"w = min\(2\(p−s−1\) \+ \(v−1\)·p, m·v\) = min\(1, 2\) = 1" + DEADLOCKS),
    (warmup_of_1f1b, r"p−1−s is plain 1F1B's warm-up" + DEADLOCKS),
    (warmup_mirrored, r"is stage p−1−s = 1's count: the FIRST stage waits longest" + DEADLOCKS),
    (warmup_uncapped, r"stage=0, num_stages=3, num_micro_batches=3, chunks=1\): the warm-up is not capped: "
                      r"2\(p−s−1\) \+ \(v−1\)·p = 4 is more than the m·v = 3"),
    (warmup_uncapped_sliced, r"stage=0, num_stages=3, num_micro_batches=3, chunks=1\): the warm-up is not "
                             r"capped"),
    (micro_batch_major, r"num_stages=2, num_micro_batches=2, chunks=2\): the forwards run all v chunks of a "
                        r"micro-batch in a row.*groups of p"),
    (all_m_per_chunk, r"the forwards run all m micro-batches through chunk 0, then all m through chunk 1"),
    (plain_1f1b, r"chunks=2\): that is plain 1F1B \(one_f_one_b_order\) with the chunks left out"),
    (pairs, r"chunks=1\): your items are pairs \(kind, micro_batch\): the interleaved schedule's are "
            r"triples"),
    (a_forward_twice, r"\('F', 0, 0\) appears twice in the order"),
    (the_last_backward_missing, r"the order lacks 1 unit\(s\), e.g. \('B', 0, 0\)"),
    (a_backward_before_its_forward, r"chunks=1\): \('B', 1, 0\) comes before its F: a B needs the F of "
                                    r"the same micro-batch and chunk first" + DEADLOCKS),
    (a_backward_early, r"position \d+ is \('B', \d+, \d\), Megatron's order has \('F', \d+, \d\)"),
    (lambda s, p, m, v: iter(interleaved(s, p, m, v)), r"expected a list of \(kind, micro_batch, chunk\) "
                                                       r"triples .*got a list_iterator"),
    (lambda s, p, m, v: [("F", 0.0, 0)],
     r"an entry a tuple \('F', 0.0, 0\): micro-batch and chunk ids are ints"),
])
def test_interleaved_mistakes_are_named(mistake, message):
    with pytest.raises(GradingError, match=rf"(?s)Exercise 15\.1 interleaved_order\(.*{message}"):
        ex15.grade_interleaved_order(mistake)


# --- 15.2: hand-written ZB-H1 orders (correct), and wrong ones ------------------------------------------

def zb_h1_by_queue(s, p, m):
    """Correct, written otherwise: a queue of the Bs done, whose Ws wait until more than s are pending."""
    w = min(p - 1 - s, m)
    order, pending = [("F", k) for k in range(w)], collections.deque()
    for j in range(m):
        if w + j < m:
            order.append(("F", w + j))
        order.append(("B", j))
        pending.append(j)
        if len(pending) > s or w + j >= m:  # the cool-down: a W after each B
            order.append(("W", pending.popleft()))
    return order + [("W", k) for k in pending]


def zb_h1_from_1f1b(s, p, m):
    """Correct, from 1F1B's order: a W after B k once k >= s, and after each of the last w Bs."""
    order, weights, w = [], itertools.count(), min(p - 1 - s, m)
    for kind, k in schedules.one_f_one_b_order(s, p, m):
        order.append((kind, k))
        if kind == "B" and (k >= s or k >= m - w):
            order.append(("W", next(weights)))
    done = {k for kind, k in order if kind == "W"}
    return order + [("W", k) for k in range(m) if k not in done]


def zb(s, p, m, defer, warmup=None, cool_down=True):
    """The package's shape with W(j - defer) after B(j) (and the cool-down's W's at the end or not)."""
    w = min(p - 1 - s, m) if warmup is None else warmup
    order, weights = [("F", k) for k in range(w)], 0
    for j in range(m - w):
        order += [("F", w + j), ("B", j)]
        if j >= defer:
            order, weights = order + [("W", weights)], weights + 1
    for k in range(m - w, m):
        order.append(("B", k))
        if cool_down:
            order, weights = order + [("W", weights)], weights + 1
    return order + [("W", k) for k in range(weights, m)]


def w_right_after_b(s, p, m):
    return [u for kind, k in schedules.one_f_one_b_order(s, p, m)
            for u in ([(kind, k)] if kind == "F" else [("B", k), ("W", k)])]


def all_w_at_the_end(s, p, m):
    return schedules.one_f_one_b_order(s, p, m) + [("W", k) for k in range(m)]


def w_deferred_by_p_minus_1_minus_s(s, p, m):
    return zb(s, p, m, defer=p - 1 - s)


def w_deferred_by_s_plus_1(s, p, m):
    return zb(s, p, m, defer=s + 1)


def cool_down_ws_at_the_end(s, p, m):
    return zb(s, p, m, defer=s, cool_down=False)


def zb_warmup_of_p_minus_s(s, p, m):
    return zb(s, p, m, defer=s, warmup=min(p - s, m))


def w_before_its_b(s, p, m):
    return [u for kind, k in schedules.one_f_one_b_order(s, p, m)
            for u in ([(kind, k)] if kind == "F" else [("W", k), ("B", k)])]


def lifo_backward(s, p, m):  # each B takes the newest forward; the Ws as the package counts them
    order, stack, weights = [], [], 0
    for kind, k in schedules.zb_h1_order(s, p, m):
        if kind == "F":
            stack.append(k)
            order.append(("F", k))
        elif kind == "B":
            order.append(("B", stack.pop()))
        else:
            order.append(("W", weights))
            weights += 1
    return order


def no_w(s, p, m):
    return schedules.one_f_one_b_order(s, p, m)


def one_w_missing(s, p, m):
    return schedules.zb_h1_order(s, p, m)[:-1]


@pytest.mark.parametrize("mistake, message", [
    (w_right_after_b, r"stage=1, num_stages=2, num_micro_batches=6\): each W right after its B: that "
                      r"is plain 1F1B with the backward split in two, no bubble filled. The pipeline idles 10% "
                      r"of the step \(T_F = T_B = T_W\) where ZB-H1 idles 5%. ZB-H1 runs stage s's W's s "
                      r"micro-batches late"),
    (all_w_at_the_end, r"stage=0, num_stages=1, num_micro_batches=3\): all the W's at the end: .*holds all "
                       r"m = 3 micro-batches at its peak — the peak memory grows with m, where ZB-H1's stays "
                       r"at min\(p, m\) = 1"),
    (w_deferred_by_p_minus_1_minus_s, r"num_stages=2, num_micro_batches=6\): the W's run 1 micro-batch late "
                                      r".* on stage 0 — one too many \(p − 1 − s: stage 1's count.* Stage 0 "
                                      r"then holds 3 micro-batches' activations at its peak"),
    (w_deferred_by_s_plus_1, r"num_micro_batches=3\): the W's run 1 micro-batch late \(W\(j − 1\) after "
                             r"B\(j\)\) on stage 0 — one too many\. Stage 0 then holds 2"),
    (cool_down_ws_at_the_end, r"in the cool-down the W's wait until every B is done"),
    (zb_warmup_of_p_minus_s, r"warm-up forwards on stage 0, expected 1F1B's min\(p − 1 − s, m\)"),
    (w_before_its_b, r"num_stages=1, num_micro_batches=3\): W 0 comes before B 0: .*always after its B"
                     + DEADLOCKS),
    (lifo_backward, r"num_stages=2, num_micro_batches=6\): micro-batch 1's backward runs before micro-batch "
                    r"0's: newest first \(LIFO\)" + DEADLOCKS),
    (no_w, r"that is plain 1F1B: ZB-H1 splits each backward in two"),
    (one_w_missing, r"no W for micro-batch\(es\) \[2\]: every micro-batch needs one F, one B and one W"),
    (lambda s, p, m: [(kind, k, 0) for kind, k in schedules.zb_h1_order(s, p, m)],
     r"your items are triples: ZB-H1's are pairs"),
    (lambda s, p, m: None, r"expected a list of \(kind, micro_batch\) pairs .*got None"),
    (lambda s, p, m: [("X", 0)], r"an entry a tuple \('X', 0\): the kinds are 'F' and 'B' and 'W'"),
    (lambda s, p, m: [("", 0)], r"an entry a tuple \('', 0\): the kinds are 'F' and 'B' and 'W'"),
])
def test_zb_h1_mistakes_are_named(mistake, message):
    with pytest.raises(GradingError, match=rf"(?s)Exercise 15\.2 zb_h1_order\(.*{message}"):
        ex15.grade_zb_h1_order(mistake)
