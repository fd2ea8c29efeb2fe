"""The orders: which unit of work each pipeline stage runs when, for GPipe, 1F1B, interleaved 1F1B, ZB-H1.

A unit of work is ``(kind, micro_batch)`` or, with several model chunks per stage, ``(kind, micro_batch,
chunk)`` (chunk 0 when left out). Kinds: ``"F"`` forward; ``"B"`` backward — the whole backward, or
only the gradient of the input when the order also has a ``"W"`` for that micro-batch; ``"W"`` the
gradient of the weights. Stage ``s`` of ``p`` holds chunks ``c = 0 .. v-1``; chunk ``c`` is *virtual
stage* ``j = c·p + s`` of a ``p·v``-stage pipeline (the ring wraps: chunk c on the last stage feeds
chunk c+1 on stage 0). The data dependencies are fixed; a schedule is only the order on each stage::

    F(k, j) needs F(k, j-1)          B(k, j) needs B(k, j+1), or F(k, j) on the last virtual stage
    W(k, j) needs B(k, j) (same stage)

:func:`check_order` checks one stage's order on its own (every unit exactly once, F before B before
W); :func:`minimegatron.schedules.simulate` checks that the stages' orders fit together (no deadlock).
"""
from __future__ import annotations

from typing import Sequence, Union

__all__ = ["Work", "work_item", "check_order", "gpipe_order", "one_f_one_b_order", "interleaved_warmup",
           "interleaved_order", "zb_h1_order", "deepspeed_order", "peak_in_flight",
           "peak_in_flight_formula"]

Work = Union[tuple[str, int], tuple[str, int, int]]  # ("F" | "B" | "W", micro-batch[, chunk])
KINDS = ("F", "B", "W")


def work_item(item: Sequence) -> tuple[str, int, int]:
    """``("F", k)`` -> ``("F", k, 0)``; ``("F", k, c)`` as it is; anything else is a ValueError."""
    if isinstance(item, (str, bytes)) or len(item) not in (2, 3) or item[0] not in KINDS:
        raise ValueError(f"unknown work {item!r}: use (kind, micro_batch) or (kind, micro_batch, chunk) "
                         f"with kind in {KINDS}")
    return (item[0], int(item[1]), int(item[2]) if len(item) == 3 else 0)


def check_order(order: Sequence[Work], num_micro_batches: int, chunks: int = 1,
                in_sequence: bool = True) -> None:
    """One stage's order: F and B of every (micro-batch, chunk) exactly once, W at most once, and
    (``in_sequence``) F before B before W. Raises a ValueError naming the first problem."""
    seen: dict[tuple[str, int, int], int] = {}
    for i, item in enumerate(order):
        kind, k, c = unit = work_item(item)
        if not (0 <= k < num_micro_batches and 0 <= c < chunks):
            raise ValueError(f"{item!r}: micro-batch or chunk out of range (m={num_micro_batches}, "
                             f"v={chunks})")
        if unit in seen:
            raise ValueError(f"{item!r} appears twice in the order (positions {seen[unit]} and {i})")
        before = {"B": "F", "W": "B"}.get(kind)
        if in_sequence and before and (before, k, c) not in seen:
            raise ValueError(f"{item!r} comes before its {before}: a {kind} needs the {before} of the "
                             "same micro-batch and chunk first")
        seen[unit] = i
    missing = [(kind, k, c) for kind in "FB" for k in range(num_micro_batches) for c in range(chunks)
               if (kind, k, c) not in seen]
    if missing:
        raise ValueError(f"the order lacks {len(missing)} unit(s), e.g. {missing[0]}: every micro-batch "
                         "needs one F and one B on every chunk")


def _check(stage: int, num_stages: int, num_micro_batches: int) -> None:
    if num_stages < 1 or num_micro_batches < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"need num_stages >= 1, num_micro_batches >= 1 and 0 <= stage < num_stages; got "
                         f"stage={stage}, num_stages={num_stages}, num_micro_batches={num_micro_batches}")


def gpipe_order(stage: int, num_stages: int, num_micro_batches: int) -> list[Work]:
    """GPipe (Huang et al. 2019): all ``m`` forwards, then all ``m`` backwards (same on every stage)."""
    _check(stage, num_stages, num_micro_batches)
    return ([("F", k) for k in range(num_micro_batches)] + [("B", k) for k in range(num_micro_batches)])


def one_f_one_b_order(stage: int, num_stages: int, num_micro_batches: int) -> list[Work]:
    """1F1B: ``w = min(p-1-s, m)`` warm-up forwards, then alternate F and B, then the remaining Bs."""
    _check(stage, num_stages, num_micro_batches)
    warmup = min(num_stages - 1 - stage, num_micro_batches)
    order = [("F", k) for k in range(warmup)]
    for k in range(warmup, num_micro_batches):  # steady state: F k, then the oldest backward
        order += [("F", k), ("B", k - warmup)]
    order += [("B", k) for k in range(num_micro_batches - warmup, num_micro_batches)]  # cool-down
    return order


def _check_interleaved(stage: int, num_stages: int, num_micro_batches: int, chunks: int) -> None:
    _check(stage, num_stages, num_micro_batches)
    if chunks < 1:
        raise ValueError(f"need chunks >= 1 (model chunks per stage, Megatron's virtual pipeline size); "
                         f"got v={chunks}")
    if num_micro_batches % num_stages:
        lo = num_micro_batches // num_stages * num_stages
        raise ValueError(f"interleaved 1F1B runs the micro-batches in groups of p={num_stages}: "
                         f"m={num_micro_batches} is not a multiple of p; use m={lo + num_stages}"
                         + (f" or m={lo}" if lo else ""))


def interleaved_warmup(stage: int, num_stages: int, num_micro_batches: int, chunks: int) -> int:
    """Megatron's warm-up forwards on stage ``s``: ``min(2(p - s - 1) + (v - 1)·p, m·v)``."""
    _check_interleaved(stage, num_stages, num_micro_batches, chunks)
    p, s = num_stages, stage
    return min(2 * (p - s - 1) + (chunks - 1) * p, num_micro_batches * chunks)


def interleaved_order(stage: int, num_stages: int, num_micro_batches: int, chunks: int) -> list[Work]:
    """Megatron's interleaved 1F1B (Narayanan et al. 2021, §2.2): ``v = chunks`` model chunks per stage.

    Each stage runs ``m·v`` forwards and ``m·v`` backwards of chunk size. The i-th forward is
    micro-batch ``k = (i // pv)·p + i % p`` on chunk ``c = (i % pv) // p``: p micro-batches through
    chunk 0, the same p through chunk 1, …, then the next group of p (so ``m`` must be a multiple of
    ``p``). The i-th backward is the same micro-batch on chunk ``v - 1 - c`` (backward runs the chunks
    the other way). Then, as 1F1B: ``w`` warm-up forwards, ``m·v - w`` times (one forward, one
    backward), the remaining ``w`` backwards, with

        w = min(2(p - s - 1) + (v - 1)·p,  m·v)

    Why: the first backward on stage s is micro-batch 0 on its last chunk, virtual stage
    ``(v-1)p + s``. Before micro-batch 0 gets there, stage s runs the first group through chunks
    ``0 .. v-2``: ``(v - 1)·p`` forwards, then micro-batch 0's forward on the last chunk. That goes on
    through the ``p - s - 1`` later stages and its gradient comes back through them: ``2(p - s - 1)``
    slots, one per stage each way, which stage s fills with forwards (one chunk-sized unit per slot
    when ``t_b = t_f``; with ``t_b = 2 t_f`` the trip is longer and stage s waits a little, which the
    bubble below already counts). So the later the stage, the shorter its warm-up (the last:
    ``(v-1)p``).

    Memory: a stage holds at most ``min(w + 1, m·v)`` chunks' activations (the steady state's forward
    comes before its backward), each ``1/v`` of the stage. Time: with per-chunk times ``t_f/v`` and
    ``t_b/v`` the fill and drain cost ``(p - 1)(t_f + t_b)/v``, so the bubble is
    ``(p - 1)/(v·m + p - 1)`` (:func:`~minimegatron.measure.interleaved_bubble_fraction`;
    :func:`~minimegatron.schedules.simulate` gives exactly it). ``v = 1`` is 1F1B with Megatron's
    doubled warm-up: same bubble, more memory. (Older Megatron versions ran all ``m·v`` forwards
    first when ``m = p``; current Megatron-core just caps the count, as here, which never deadlocks.)
    """
    p, m, v = num_stages, num_micro_batches, chunks
    warmup = interleaved_warmup(stage, p, m, v)

    def forward(i: int) -> Work:
        return ("F", (i // (p * v)) * p + i % p, (i % (p * v)) // p)

    def backward(i: int) -> Work:
        _, k, c = forward(i)
        return ("B", k, v - 1 - c)

    order = [forward(i) for i in range(warmup)]
    for i in range(m * v - warmup):  # steady state
        order += [forward(warmup + i), backward(i)]
    order += [backward(i) for i in range(m * v - warmup, m * v)]  # cool-down
    return order


def zb_h1_order(stage: int, num_stages: int, num_micro_batches: int) -> list[Work]:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with the backward split.

    ``B k`` computes only the gradient of the stage's input — all the previous stage waits for — and
    ``W k`` the gradient of the weights, which nobody waits for. The paper's memory-efficient
    handcrafted schedule is 1F1B's order with B for the backward, except that stage s runs its W's
    ``s`` micro-batches late::

        warm-up      w = min(p - 1 - s, m) forwards                          (as 1F1B)
        steady       j = 0 .. m-w-1:  F(w + j)  B(j)  [W(j - s) once j >= s]
        cool-down    the last w backwards, each followed by the next W; then the remaining W's

    So the gradient flows back at ``T_B`` per stage instead of ``T_B + T_W``, and the deferred W's run
    when stage s would wait for gradients in 1F1B's drain. Per stage the idle time falls from
    ``(p - 1)(T_F + T_B + T_W)`` to ``(p - 1)(T_F + T_B - T_W)``: a third with equal times
    (:func:`~minimegatron.measure.zb_h1_bubble_fraction`; :func:`~minimegatron.schedules.simulate`
    gives exactly it when ``m >= p`` and ``T_W <= min(T_F, T_B)``, and more outside that range).

    Memory: ``p - s`` micro-batches between F and B, as 1F1B; between F and W (what W still needs,
    the smaller part, ``M_W < M_B`` in the paper's Table 1) ``min(p, m)`` on every stage, which is
    1F1B's peak on stage 0: the peak over the pipeline stays 1F1B's (the paper's "same memory").
    """
    _check(stage, num_stages, num_micro_batches)
    p, m, s = num_stages, num_micro_batches, stage
    warmup = min(p - 1 - s, m)
    order: list[Work] = [("F", k) for k in range(warmup)]
    weights = 0
    for j in range(m - warmup):
        order += [("F", warmup + j), ("B", j)]
        if j >= s:
            order.append(("W", weights))
            weights += 1
    for k in range(m - warmup, m):
        order += [("B", k), ("W", weights)]
        weights += 1
    return order + [("W", k) for k in range(weights, m)]


def deepspeed_order(stage: int, num_stages: int, num_micro_batches: int) -> list[Work]:
    """The F/B order of DeepSpeed's ``TrainSchedule`` (the k-th ForwardPass is micro-batch k)."""
    from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, TrainSchedule

    _check(stage, num_stages, num_micro_batches)
    order, count = [], {"F": 0, "B": 0}
    for step in TrainSchedule(micro_batches=num_micro_batches, stages=num_stages, stage_id=stage):
        for cmd in step:
            kind = "F" if isinstance(cmd, ForwardPass) else "B" if isinstance(cmd, BackwardPass) else None
            if kind:
                order.append((kind, count[kind]))
                count[kind] += 1
    return order


def peak_in_flight(order: Sequence[Work], until: str = "freed") -> int:
    """Most (micro-batch, chunk) units whose activations the stage holds at once, running ``order``.

    A unit is held from its F until its activations are freed: its W if the order has one, else its B
    (``until="freed"``); ``until="B"`` counts only up to the B (what 1F1B's memory bound is about)."""
    units = [work_item(w) for w in order]
    split = {(k, c) for kind, k, c in units if kind == "W"} if until == "freed" else set()
    live = best = 0
    for kind, k, c in units:
        if kind == "F":
            live += 1
            best = max(best, live)
        elif (kind == "W") or (kind == "B" and (k, c) not in split):
            live -= 1
    return best


def peak_in_flight_formula(schedule: str, stage: int, num_stages: int, num_micro_batches: int,
                           chunks: int = 1) -> int:
    """The peak of :func:`peak_in_flight` per schedule: GPipe ``m``; 1F1B ``min(p - s, m)``;
    interleaved ``min(w + 1, m·v)`` chunks (w: :func:`interleaved_warmup`); ZB-H1 ``min(p, m)``."""
    p, m, s = num_stages, num_micro_batches, stage
    formulas = {"gpipe": lambda: m, "1f1b": lambda: min(p - s, m), "zb-h1": lambda: min(p, m),
                "interleaved": lambda: min(interleaved_warmup(s, p, m, chunks) + 1, m * chunks)}
    if schedule not in formulas:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {sorted(formulas)}")
    _check(stage, num_stages, num_micro_batches)
    return formulas[schedule]()
