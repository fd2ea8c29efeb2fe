"""Exercise 15's grader internals: the usual wrong orders, each built as the code that makes it builds it.

Where a stage's order differs from the package's, :func:`interleaved_problem` / :func:`zb_problem` try
in turn: the shape of the items; the models of the usual mistakes on the same (stage, p, m[, v]) — the
first equal to the candidate's order is named; properties by micro-batch and chunk id (every unit once,
oldest first, the chunks last-to-first in the backward, W after its B); the forwards' and backwards'
orders; at last the first position that differs. :func:`deadlock` runs every stage's order on the ideal
machine (``schedules.simulate``) and says so when they deadlock. Kept apart from the exercise file."""
from __future__ import annotations

import operator
from typing import Any, Callable

from exercises.grading import GradingError, kind_of
from minimegatron import schedules


def as_order(where: str, got: Any, kinds: str) -> list[tuple]:
    """The candidate's order as a list of tuples (kind, int[, int]), or the GradingError that says why not."""
    shape = ("(kind, micro_batch, chunk) triples like [('F', 0, 0), ('B', 0, 0)]" if kinds == "FB" else
             "(kind, micro_batch) pairs like [('F', 0), ('B', 0), ('W', 0)]")
    problem = f"{where}: expected a list of {shape}, got "
    if not isinstance(got, (list, tuple)):
        raise GradingError(problem + kind_of(got))
    order = []
    for item in got:
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
            raise GradingError(f"{problem}an entry {kind_of(item)}")
        if not (isinstance(item[0], str) and item[0] in tuple(kinds)):
            raise GradingError(f"{problem}an entry {kind_of(item)}: the kinds are "
                               + " and ".join(map(repr, kinds)))
        try:
            order.append((item[0], *(operator.index(x) for x in item[1:])))
        except TypeError:
            raise GradingError(f"{problem}an entry {kind_of(item)}: micro-batch and chunk ids are "
                               "ints") from None
    return order


def show(order: list[tuple], limit: int = 48) -> str:
    """``F0.0 F1.0 B0.1 …`` (``F0 B0 W0`` for pairs), at most ``limit`` units."""
    text = " ".join(f"{u[0]}{u[1]}" + (f".{u[2]}" if len(u) == 3 else "") for u in order[:limit])
    return text + (f" … ({len(order)} units)" if len(order) > limit else "")


def orders_shown(got: list[tuple], expected: list[tuple]) -> str:  # noqa: D103
    return f"\n  yours:    {show(got)}\n  expected: {show(expected)}"


def deadlock(orders: dict[int, list], p: int, m: int) -> str:
    """A sentence if every stage running ``orders`` deadlocks on the ideal machine, else ''."""
    try:
        schedules.simulate(lambda s, _p, _m: orders[s], p, m)
    except ValueError as err:
        if "deadlock" in str(err):
            why = str(err).replace("the orders deadlock: ", "")
            return f"\n  Your orders DEADLOCK (schedules.simulate, every stage running yours): {why}"
    except Exception:  # noqa: BLE001 - an order the simulator cannot run says nothing about a deadlock
        pass
    return ""


def _first_out_of_order(order: list[tuple], kind: str) -> tuple | None:
    """(chunk, micro-batch, the first newer one run before it) where ``kind``'s units of a chunk go newest
    first; None if they all go oldest first."""
    seen: dict[int, list[int]] = {}
    for u in order:
        if u[0] == kind:
            c = u[2] if len(u) == 3 else 0
            newer = [k for k in seen.get(c, []) if k > u[1]]
            if newer:
                return c, u[1], newer[0]
            seen.setdefault(c, []).append(u[1])
    return None


def _build(forward: Callable, backward: Callable, warmup: int, total: int) -> list[tuple]:
    """The 1F1B shape over ``total`` units: ``warmup`` forwards, then F B in turn, then the rest of the Bs
    (as Megatron and the package write it; with ``warmup > total`` what forgetting the cap gives)."""
    order = [forward(i) for i in range(warmup)]
    for i in range(total - warmup):
        order += [forward(warmup + i), backward(i)]
    return order + [backward(i) for i in range(total - warmup, total)]


# --- 15.1 interleaved 1F1B ------------------------------------------------------------------------------

FORMULA = "w = min(2(p−s−1) + (v−1)·p, m·v)"
GROUPS = ("Megatron takes the micro-batches in groups of p: the i-th forward is micro-batch (i // pv)·p + "
          "i % p on chunk (i % pv) // p — p micro-batches through chunk 0, the same p through chunk 1, …, "
          "chunk v−1, then the next p")
BACKWARDS = ("the i-th backward is the i-th forward's micro-batch on chunk v−1−c: in each group of p, all p "
             "through chunk v−1 first, then chunk v−2, …, chunk 0 last")
MB_MAJOR = ("all v chunks of a micro-batch in a row (F(k, 0), F(k, 1), …, then micro-batch k+1): "
            + GROUPS + ". A micro-batch is back at this stage for its next chunk only after going round the "
            "p stages, and the stage runs the other p−1 of its group meanwhile")
ALL_M = ("all m micro-batches through chunk 0, then all m through chunk 1, …: " + GROUPS + ". Whole groups "
         "of m make the first backward (micro-batch 0 on chunk v−1) wait for (v−1)·m forwards instead of "
         "(v−1)·p — more memory, and the warm-up count no longer fits")
LAST_TO_FIRST = ("backwards go through the chunks last-to-first, as the gradient starts at the last "
                 "virtual stage — B(k, c) needs the gradient of virtual stage (c+1)·p + s, chunk c+1's "
                 "backward on this same stage. So " + BACKWARDS)
NOT_REVERSED = "the backward runs the chunks in the forward's order (chunk 0 first): " + LAST_TO_FIRST
LIFO = ("newest first (LIFO): a pipeline runs the backwards oldest first (FIFO), in the forwards' order — "
        "the gradients come back from the later stages in that order, and the oldest activations are "
        "freed first; " + BACKWARDS)


def megatron_maps(p: int, m: int, v: int, how: str = "groups of p") -> tuple[Callable, Callable]:
    """(forward(i), backward(i)): Megatron's, or a usual mistake's."""
    forwards = {"groups of p": lambda i: ("F", i // (p * v) * p + i % p, i % (p * v) // p),
                "micro-batch major": lambda i: ("F", i // v, i % v),
                "groups of m": lambda i: ("F", i % m, i // m)}
    forward = forwards.get(how, forwards["groups of p"])
    if how == "not reversed":
        return forward, lambda i: ("B", *forward(i)[1:])
    return forward, lambda i: ("B", forward(i)[1], v - 1 - forward(i)[2])


def _warmup_message(w2: int, s: int, p: int, m: int, v: int) -> str:
    w, raw, total = schedules.interleaved_warmup(s, p, m, v), 2 * (p - s - 1) + (v - 1) * p, m * v
    what = ("one warm-up forward too many" if w2 == w + 1 else "one warm-up forward too few" if w2 == w - 1
            else "the wrong warm-up count")
    text = f"{what}: {w2} on stage {s}, expected {FORMULA} = min({raw}, {total}) = {w}"
    if w2 == min(p - 1 - s, total):
        text += (f"; {w2} = p−1−s is plain 1F1B's warm-up — here stage s's first backward (micro-batch 0 "
                 "on its last chunk) comes after the first group's (v−1)·p forwards through the earlier "
                 "chunks, and its trip through the p−s−1 later stages and back takes 2(p−s−1) slots")
    if w2 == min(2 * s + (v - 1) * p, total) and 2 * s != 2 * (p - s - 1):
        text += (f"; {w2} is stage p−1−s = {p - 1 - s}'s count: the FIRST stage waits longest for its "
                 "first gradient, so the warm-up falls as s grows (the last stage: (v−1)·p)")
    return text


def interleaved_problem(got: list[tuple], s: int, p: int, m: int, v: int) -> str | None:
    """What is wrong with ``got`` as stage s's interleaved order (None: nothing)."""
    expected = schedules.interleaved_order(s, p, m, v)
    if got == expected:
        return None
    total, w, raw = m * v, schedules.interleaved_warmup(s, p, m, v), 2 * (p - s - 1) + (v - 1) * p
    padded = [u if len(u) == 3 else (*u, 0) for u in got]
    if padded == [(kind, k, 0) for kind, k in schedules.one_f_one_b_order(s, p, m)] != expected:
        if v > 1:
            return (f"that is plain 1F1B (one_f_one_b_order) with the chunks left out: each stage holds v = "
                    f"{v} model chunks and runs every micro-batch through each, m·v = {total} forwards and "
                    "as many backwards, items ('F', micro_batch, chunk); " + GROUPS)
        return (f"that is plain 1F1B, whose warm-up is p−1−s = {min(p - 1 - s, m)}: Megatron's interleaved "
                f"schedule warms up with {FORMULA} = {w} even with v = 1 (the same bubble, more memory)")
    if padded != got:
        return ("your items are pairs (kind, micro_batch): the interleaved schedule's are triples (kind, "
                "micro_batch, chunk) — ('F', 0, 0), …, ('B', 0, " + f"{v - 1}) — with v = 1 too")
    fwd, bwd = megatron_maps(p, m, v)
    cap = ("the warm-up is not capped: 2(p−s−1) + (v−1)·p = " + f"{raw} is more than the m·v = {total} "
           f"forwards stage {s} runs in all — {FORMULA}: with so few micro-batches all m·v forwards come "
           "first, then all the backwards")
    units = [fwd(i) for i in range(total)], [bwd(i) for i in range(total)]
    if raw > total and got in (_build(fwd, bwd, raw, total), units[0][:raw] + units[1][total - raw:]):
        return cap  # Megatron's loops without the min, or the same with slices
    for w2 in range(-1, total + 1):
        if _build(fwd, bwd, w2, total) == got:
            return _warmup_message(w2, s, p, m, v)
    for how, message in (("micro-batch major", MB_MAJOR), ("groups of m", ALL_M),
                         ("not reversed", NOT_REVERSED)):
        if _build(*megatron_maps(p, m, v, how), w, total) == got:
            return ("the forwards run " if how != "not reversed" else "") + message
    try:
        schedules.check_order(got, m, v, in_sequence=False)
    except ValueError as err:
        if raw > total and any(not 0 <= u[1] < m for u in got):  # what the uncapped loops give
            return cap
        return f"{err} — 2·m·v = {2 * total} units in all, one F and one B per (micro-batch, chunk)"
    bad = _first_out_of_order(got, "B")
    if bad:
        c, k, newer = bad
        return f"on chunk {c}, micro-batch {newer}'s backward runs before micro-batch {k}'s: " + LIFO
    where = {u: i for i, u in enumerate(got)}
    for k, c in ((k, c) for k in range(m) for c in range(v - 1)):
        if where[("B", k, c)] < where[("B", k, c + 1)]:
            return f"micro-batch {k}'s backward runs chunk {c} before chunk {c + 1}: " + LAST_TO_FIRST
    try:
        schedules.check_order(got, m, v)
    except ValueError as err:
        return f"{err}: a backward needs the activations its forward kept"
    for kind, what, rule in (("F", "forwards", GROUPS), ("B", "backwards", BACKWARDS)):
        mine, want = ([u for u in order if u[0] == kind] for order in (got, expected))
        if mine == want:
            continue
        for how, message in (("micro-batch major", MB_MAJOR), ("groups of m", ALL_M)):
            if mine == [megatron_maps(p, m, v, how)[kind == "B"](i) for i in range(total)]:
                return f"the {what} run " + message
        i = next(i for i, (a, e) in enumerate(zip(mine, want)) if a != e)
        return f"the {what} run in the wrong order: the {i}-th is {mine[i]}, expected {want[i]} — {rule}"
    i = next(i for i, (a, e) in enumerate(zip(got, expected)) if a != e)
    return (f"position {i} is {got[i]}, Megatron's order has {expected[i]} — after {FORMULA} = {w} warm-up "
            "forwards, one forward and one backward in turn, then the remaining backwards")


# --- 15.2 ZB-H1 -----------------------------------------------------------------------------------------

ZB_RULE = ("ZB-H1 runs stage s's W's s micro-batches late: after B(j) comes W(j − s) once j ≥ s; in the "
           "cool-down each B is followed by the next W, then the W's left over. The later the stage, the "
           "sooner its backwards are done while the gradients still travel back to stage 0: the more W's "
           "it keeps for that wait")


def zb_build(p: int, m: int, s: int, warmup: int, defer: int, cooldown: bool = True) -> list[tuple]:
    """1F1B's order with B for the backward and W(j − defer) after B(j); ``cooldown``: a W after each of
    the cool-down's Bs (else all the W's left over at the end)."""
    order, weights = [("F", k) for k in range(warmup)], 0
    for j in range(m - warmup):
        order += [("F", warmup + j), ("B", j)]
        if j >= defer:
            order, weights = order + [("W", weights)], weights + 1
    for k in range(m - warmup, m):
        order.append(("B", k))
        if cooldown:
            order, weights = order + [("W", weights)], weights + 1
    return order + [("W", k) for k in range(weights, m)]


def _cost_words(orders: dict[int, list], s: int, p: int, m: int) -> str:
    """What the order costs more than ZB-H1's: stage s's peak, the bubble (T_F = T_B = T_W) if it runs."""
    peak, peak_zb, words = schedules.peak_in_flight(orders[s]), min(p, m), ""
    if peak > peak_zb:
        words += (f" Stage {s} then holds {peak} micro-batches' activations at its peak (from F until W "
                  f"frees them) where ZB-H1 holds min(p, m) = {peak_zb}.")
    bubble_zb = schedules.bubble_fraction(schedules.simulate(schedules.zb_h1_order, p, m, 1, 1, 1))
    try:
        bubble = schedules.bubble_fraction(schedules.simulate(lambda r, _p, _m: orders[r], p, m, 1, 1, 1))
    except ValueError:  # other stages' orders incomplete, or deadlocked: no bubble to compare
        return words
    if bubble > bubble_zb + 1e-9:
        words += (f" The pipeline idles {bubble:.0%} of the step (T_F = T_B = T_W) where ZB-H1 idles "
                  f"{bubble_zb:.0%}.")
    return words


def zb_problem(got: list[tuple], orders: dict[int, list], s: int, p: int, m: int) -> str | None:
    """What is wrong with ``got`` (= ``orders[s]``) as stage s's ZB-H1 order (None: nothing)."""
    expected = schedules.zb_h1_order(s, p, m)
    if got == expected:
        return None
    if any(len(u) == 3 for u in got):
        return "your items are triples: ZB-H1's are pairs (kind, micro_batch), one model chunk per stage"
    if got == schedules.one_f_one_b_order(s, p, m):
        return ("that is plain 1F1B: ZB-H1 splits each backward in two — B(k), the gradient of the stage's "
                "input (what the previous stage waits for), and W(k), the gradient of the weights (what "
                "nobody waits for) — m of each. " + ZB_RULE)
    w = min(p - 1 - s, m)
    if zb_build(p, m, s, w, m, cooldown=False) == got:
        return (f"all the W's at the end: what a W needs stays held until the W runs, so the stage holds all "
                f"m = {m} micro-batches at its peak — the peak memory grows with m, where ZB-H1's stays at "
                f"min(p, m) = {min(p, m)}. " + ZB_RULE)
    if zb_build(p, m, s, w, 0) == got:
        return ("each W right after its B: that is plain 1F1B with the backward split in two, no bubble "
                f"filled.{_cost_words(orders, s, p, m)} " + ZB_RULE)
    for cooldown in (True, False):
        for d in range(m + 1):
            if zb_build(p, m, s, w, d, cooldown) == got:
                if d == s:
                    return "in the cool-down the W's wait until every B is done: " + ZB_RULE
                late = {s + 1: "one too many", s - 1: "one too few"}.get(d, "not s")
                turned = (f" (p − 1 − s: stage {p - 1 - s}'s count — the first stage defers least, the last "
                          "most)" if d == p - 1 - s else "")
                return (f"the W's run {d} micro-batch{'es' if d != 1 else ''} late (W(j − {d}) after B(j)) "
                        f"on stage {s} — {late}{turned}.{_cost_words(orders, s, p, m)} " + ZB_RULE)
    for w2 in range(m + 1):
        if zb_build(p, m, s, w2, s) == got:
            return (f"{w2} warm-up forwards on stage {s}, expected 1F1B's min(p − 1 − s, m) = {w}: ZB-H1 is "
                    "1F1B's order with B for the backward and the W's put in")
    try:
        schedules.check_order(got, m, in_sequence=False)
    except ValueError as err:
        return f"{err} — and one W per micro-batch: 3·m = {3 * m} units in all"
    missing = sorted(set(range(m)) - {u[1] for u in got if u[0] == "W"})
    if missing:
        return f"no W for micro-batch(es) {missing}: every micro-batch needs one F, one B and one W"
    for kind in "BWF":
        bad = _first_out_of_order(got, kind)
        if bad:
            what = {"B": "backward", "W": "W", "F": "forward"}[kind]
            return (f"micro-batch {bad[2]}'s {what} runs before micro-batch {bad[1]}'s: newest first (LIFO) "
                    "— ZB-H1 runs every kind oldest first (FIFO), as 1F1B: the i-th B (and W) is the "
                    "micro-batch of the i-th forward. " + ZB_RULE)
    done: set[tuple] = set()
    for u in got:
        before = {"B": ("F", u[1]), "W": ("B", u[1])}.get(u[0])
        if before and before not in done:
            if u[0] == "W":
                return (f"W {u[1]} comes before B {u[1]}: W k computes the weights' gradient from the "
                        "output gradient that B k received (and keeps for it) — always after its B. "
                        + ZB_RULE)
            return f"B {u[1]} comes before F {u[1]}: a backward needs the activations its forward kept"
        done.add(u)
    if [u for u in got if u[0] != "W"] != schedules.one_f_one_b_order(s, p, m):
        return (f"without the W's your order should be 1F1B's: {show(schedules.one_f_one_b_order(s, p, m))}"
                " — ZB-H1 is 1F1B's order with B for the backward and the W's put in. " + ZB_RULE)
    i = next(i for i, (a, e) in enumerate(zip(got, expected)) if a != e)
    return f"position {i} is {got[i]}, ZB-H1's order has {expected[i]}. " + ZB_RULE
