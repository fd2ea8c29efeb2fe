"""Pipeline schedules by hand: GPipe and 1F1B orders, an ideal timing model, a teaching executor.

A training step on pipeline stage ``s`` of ``p`` runs ``2m`` units of work for ``m`` micro-batches:
``("F", k)``, the forward of micro-batch ``k``, and ``("B", k)``, its backward. A *schedule* is just the
order in which each stage runs them (the data dependencies are fixed: ``F k`` on stage ``s`` needs
``F k`` of stage ``s-1``; ``B k`` needs ``B k`` of stage ``s+1``, or ``F k`` on the last stage)::

    GPipe (Huang et al. 2019)        F0 F1 … F(m-1)  B0 B1 … B(m-1)           all forwards, then all backwards
    1F1B  (Narayanan et al. 2021)    F0 … F(w-1) │ Fw B0 F(w+1) B1 … │ … B(m-1)    w = min(p-1-s, m)
                                     warm-up      steady: one F, one B     cool-down

With uniform times both last ``(m + p - 1)(t_f + t_b)``: each stage idles ``(p - 1)/(m + p - 1)`` of the
step (the *bubble*). What 1F1B saves is memory: stage ``s`` holds the activations of at most ``p - s``
micro-batches at once instead of ``m``. DeepSpeed's ``PipelineEngine`` runs 1F1B
(``deepspeed.runtime.pipe.schedule.TrainSchedule``); :func:`deepspeed_order` reads its order back.

:func:`run_schedule` is a TEACHING executor (DeepSpeed's engine is the real one): it runs any such
order on this rank with point-to-point messages, activations forward and gradients backward, and
accumulates the parameter gradients over the micro-batches. Sends are ``isend``: with blocking sends
1F1B deadlocks (stage 0 sends F1's activation while stage 1 sends B0's gradient, each waiting for the
other to receive); DeepSpeed orders its sends and receives so that they pair up instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.mpu.state import ParallelState

__all__ = ["Work", "Slot", "gpipe_order", "one_f_one_b_order", "deepspeed_order", "simulate",
           "simulated_bubble_fraction", "stage_bubble_fractions", "ScheduleResult", "run_schedule"]

Work = tuple[str, int]  # ("F" | "B", micro-batch)


def _check(stage: int, num_stages: int, num_micro_batches: int) -> None:
    if num_stages < 1 or num_micro_batches < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"need num_stages >= 1, num_micro_batches >= 1 and 0 <= stage < num_stages; got "
                         f"stage={stage}, num_stages={num_stages}, num_micro_batches={num_micro_batches}")


def gpipe_order(stage: int, num_stages: int, num_micro_batches: int) -> list[Work]:
    """GPipe: all ``m`` forwards, then all ``m`` backwards (same on every stage)."""
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


# ---- an ideal machine: uniform times, free communication -------------------------------------------
@dataclass
class Slot:
    """One unit of work placed in time by :func:`simulate`."""

    stage: int
    kind: str          # "F" | "B"
    micro_batch: int
    start: float
    end: float


def simulate(order_fn: Callable[[int, int, int], Sequence[Work]], num_stages: int, num_micro_batches: int,
             forward_time: float = 1.0, backward_time: float = 2.0) -> list[Slot]:
    """Place every stage's order in time: each unit starts as soon as its stage is free and its input
    (activation from stage s-1, or gradient from stage s+1) is ready. Raises if the orders deadlock."""
    p, m = num_stages, num_micro_batches
    orders = [list(order_fn(s, p, m)) for s in range(p)]
    done: dict[tuple[int, str, int], float] = {}  # (stage, kind, mb) -> end time
    free, nxt, slots = [0.0] * p, [0] * p, []
    while any(nxt[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while nxt[s] < len(orders[s]):
                kind, k = orders[s][nxt[s]]
                dep = ((s - 1, "F", k) if s > 0 else None) if kind == "F" else \
                      ((s + 1, "B", k) if s < p - 1 else (s, "F", k))
                if dep is not None and dep not in done:
                    break  # waits for another stage (or for its own forward)
                start = max(free[s], done[dep] if dep else 0.0)
                end = start + (forward_time if kind == "F" else backward_time)
                done[(s, kind, k)] = free[s] = end
                slots.append(Slot(s, kind, k, start, end))
                nxt[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: orders[s][nxt[s]] for s in range(p) if nxt[s] < len(orders[s])}
            raise ValueError(f"the orders deadlock: every stage waits for work no stage can do next "
                             f"(next unit per stage: {stuck}); check that B k comes after F k and that "
                             "stages run the micro-batches in the same order")
    return slots


def stage_bubble_fractions(busy: Mapping[int, float], span: float) -> dict[int, float]:
    """The bubble of each stage, ``1 - busy / span``: the share of the step's span it sat idle.

    The one formula behind both bubbles: :func:`simulated_bubble_fraction` (slots of a simulated
    schedule) and :func:`minimegatron.measure.measured_bubble_fraction` (recorded DeepSpeed events);
    their mean over stages is what ``(p - 1) / (m + p - 1)`` predicts."""
    return {s: 1.0 - b / span for s, b in sorted(busy.items())}


def simulated_bubble_fraction(slots: Sequence[Slot]) -> float:
    """Mean over stages of ``1 - busy / span`` (span: the first start to the last end)."""
    span = max(x.end for x in slots) - min(x.start for x in slots)
    busy = {s: sum(x.end - x.start for x in slots if x.stage == s) for s in {x.stage for x in slots}}
    fractions = stage_bubble_fractions(busy, span)
    return sum(fractions.values()) / len(fractions)


# ---- a teaching executor on real ranks --------------------------------------------------------------
@dataclass
class ScheduleResult:
    loss: float | None     # mean loss over the micro-batches (last stage only, else None)
    max_in_flight: int     # most micro-batches whose activations this stage held at once


def run_schedule(stage: nn.Module, order: Sequence[Work],
                 micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], state: ParallelState,
                 activation_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> ScheduleResult:
    """Run one step's ``order`` on this pipeline stage (TEACHING; DeepSpeed's engine is the real one).

    ``micro_batches[k] = (inputs, labels)``: the first stage reads the inputs, the last the labels.
    Stage ``s`` receives activations ``activation_shape`` from ``s-1`` and sends its outputs to ``s+1``;
    backward the other way round. Gradients of the loss ``mean_k loss_fn(out_k, labels_k)`` accumulate
    in ``.grad`` (each micro-batch's loss is scaled by ``1/m``); a module with tied weights
    (``get_tied_weights_and_groups``, as DeepSpeed's PipelineModule) gets them all-reduced at the end.
    """
    m = len(micro_batches)
    prev = state.pp_ranks[state.pp_rank - 1] if not state.is_first_stage else None
    nxt = state.pp_ranks[state.pp_rank + 1] if not state.is_last_stage else None
    in_flight: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # mb -> (stage input, stage output)
    sends, losses, peak = [], [], 0
    for kind, k in order:
        if kind == "F":
            if prev is None:
                x = micro_batches[k][0]
            else:
                x = torch.empty(tuple(activation_shape), dtype=dtype)
                dist.recv(x, src=prev)
                x.requires_grad_()
            y = stage(x)
            if nxt is None:
                y = loss_fn(y, micro_batches[k][1]) / m  # ∂(mean over micro-batches)
                losses.append(y.detach() * m)
            else:
                out = y.detach().contiguous()
                sends.append((dist.isend(out, dst=nxt), out))  # keep the buffer alive until sent
            in_flight[k] = (x, y)
            peak = max(peak, len(in_flight))
        elif kind == "B":
            x, y = in_flight.pop(k)  # frees this micro-batch's activations after its backward
            if nxt is None:
                y.backward()
            else:
                grad = torch.empty_like(y)
                dist.recv(grad, src=nxt)
                y.backward(grad)
            if prev is not None:
                sends.append((dist.isend(x.grad.contiguous(), dst=prev), x.grad))
        else:
            raise ValueError(f"unknown work {kind!r}: use ('F', k) or ('B', k)")
    for handle, _ in sends:
        handle.wait()
    if hasattr(stage, "get_tied_weights_and_groups"):  # e.g. GPT's embedding = LM head, first + last stage
        for weight, group in stage.get_tied_weights_and_groups():
            if weight.grad is not None:
                dist.all_reduce(weight.grad, group=group)
    loss = float(torch.stack(losses).mean()) if losses else None
    return ScheduleResult(loss, peak)
