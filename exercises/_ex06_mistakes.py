"""Exercise 06's battery: plausible wrong solutions, each with the message its grader must give.

06.1: (name, order function, message regex). 06.2: (name, runner, message regex, alone) — ``alone``:
it hangs (a blocking send in 1F1B) and is graded by itself with a short timeout; the others are graded
together, one launch per (p, order). A runner is :func:`runner` with its mistakes as switches.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


# --- 06.1 the 1F1B order ------------------------------------------------------------------------------

def order_with(warmup, steady_f_first=False, lifo=False):
    """An order from a warm-up rule ``warmup(s, p, m)`` (forwards before the steady state): steady
    state one backward then one forward (or F then B), then the remaining backwards."""
    def order(s, p, m):
        w = min(max(warmup(s, p, m), 0), m)
        out, pending = [("F", k) for k in range(w)], list(range(w))
        for k in range(w, m):
            if steady_f_first:
                out.append(("F", k))
                pending.append(k)
            if pending:
                out.append(("B", pending.pop(-1 if lifo else 0)))
            if not steady_f_first:
                out.append(("F", k))
                pending.append(k)
        return out + [("B", j) for j in (pending[::-1] if lifo else pending)]
    order.__name__ = "one_f_one_b_order"
    return order


def gpipe(s, p, m):
    return [("F", k) for k in range(m)] + [("B", k) for k in range(m)]


def no_min_with_m(s, p, m):
    w = p - s
    return [("F", k) for k in range(w)] + order_with(lambda s, p, m: p - s)(s, p, m)[min(w, m):]


ORDER_BATTERY = [
    ("GPipe", gpipe, r"that is GPipe"),
    ("a warm-up one too many", order_with(lambda s, p, m: p - s + 1),
     r"forwards before the first backward, expected \d = min\(p - stage, m\).*One warm-up forward too many"),
    ("a warm-up one too many (F before B in the steady state)", order_with(lambda s, p, m: p - s,
                                                                            steady_f_first=True),
     r"One warm-up forward too many"),
    ("a warm-up one too few", order_with(lambda s, p, m: p - s - 1), r"One warm-up forward too few"),
    ("the same warm-up on every stage", order_with(lambda s, p, m: p), r"the same on every stage"),
    ("the warm-up counted from the wrong end", order_with(lambda s, p, m: s + 1), r"counted from the wrong end"),
    ("LIFO backwards", order_with(lambda s, p, m: p - s, lifo=True), r"a stage backpropagates its OLDEST"),
    ("no min(…, m)", no_min_with_m, r"more warm-up forwards than micro-batches"),
]


# --- 06.2 running an order ----------------------------------------------------------------------------

def runner(stage, order, micro_batches, loss_fn, state, shape, *, blocking=False, scale=True, lifo=False,
           zero_each=False, total=False, own_order=None):
    """A plain runner, with the usual mistakes as switches."""
    m, sends, stash, losses = len(micro_batches), [], {}, []
    prev = None if state.is_first_stage else state.pp_ranks[state.pp_rank - 1]
    nxt = None if state.is_last_stage else state.pp_ranks[state.pp_rank + 1]

    def send(t, dst):
        if blocking:
            dist.send(t, dst)
        else:
            sends.append((dist.isend(t, dst), t))

    for kind, k in (own_order(order) if own_order else order):
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
            stash[k] = (x, y)
        else:
            x, y = stash.pop(max(stash) if lifo else k)
            if zero_each:
                stage.zero_grad()
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
    if not losses:
        return None
    losses = torch.stack(losses).detach()
    return float(losses.sum()) if total else float(losses.mean())


def switched(**switches):
    def run_schedule(*args):
        return runner(*args, **switches)
    return run_schedule


RUN_BATTERY = [
    ("LIFO stash", switched(lifo=True), r"GPipe, p=2, stage \d\): .*backpropagated micro-batch 3's graph, the "
                                        r"NEWEST pending forward — a LIFO stash", False),
    ("no 1/m", switched(scale=False), r"gradient of linear.weight is 4× too large", False),
    ("the loss summed", switched(total=True), r"the returned loss .* is the SUM of the 4 micro-batches'", False),
    ("zero_grad each micro-batch", switched(zero_each=True), r"is the last micro-batch's alone: the gradients "
                                                             r"must ACCUMULATE", False),
    ("always GPipe", switched(own_order=lambda order: sorted(order, key=lambda w: w[0] == "B")),
     r"1F1B, p=2, stage 0\): the order was F0 F1 B0 F2 B1 F3 B2 B3, the stage ran F0 F1 F2 F3 B0 B1 B2 B3.*run "
     r"the work in the order given", False),
    ("blocking send", switched(blocking=True), r"(?s)1F1B, p=2\): timeout.*send with dist.isend", True),
]
