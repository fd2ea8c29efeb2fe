"""A TEACHING executor: run any pipeline order on real ranks (DeepSpeed's engine is the real one).

:func:`run_schedule` runs this stage's order with point-to-point messages: activations forward,
gradients backward, parameter gradients accumulated over the micro-batches. It runs every order of
:mod:`minimegatron.schedules.orders`:

* **chunks**: ``stage`` may be a list of ``v`` modules, chunk ``c`` being virtual stage ``c·p + s``.
  Chunk c's output goes to chunk c on the next rank, and from the last rank to chunk c+1 on rank 0
  (the ring wraps); gradients go the other way.
* **split backward** (ZB-H1): for a unit with a ``W`` in the order, B computes only the input gradient,
  ``torch.autograd.grad(y, x, ∂L/∂y, retain_graph=True)``, and sends it; W later computes the
  parameter gradients, ``torch.autograd.backward(y, ∂L/∂y, inputs=parameters)``, which accumulates
  them in ``.grad`` and frees the graph. Autograd keeps no gradient between the two calls, so W walks
  the graph from y again: here W costs about B plus the weight products, where the paper's
  implementation stores the output gradient of each layer in B and W is only the weight products.
  The first stage has no one to send ∂L/∂x to: a floating-point input still gets it (so B costs the
  same on every stage), token ids have none (B is empty there and W runs the whole backward).

Sends are ``isend`` (with blocking sends 1F1B deadlocks: stage 0 sends F1's activation while stage 1
sends B0's gradient, each waiting for the other to receive; DeepSpeed orders its sends and receives so
that they pair up instead). Every message carries a tag naming its micro-batch, virtual stage and
direction, so that two messages between the same two ranks (activations and gradients both flow
from rank 0 to rank 1 when v > 1 and p = 2) cannot be taken for each other.

It records what it did: a :class:`~minimegatron.schedules.Slot` per unit of work (``perf_counter``
seconds; all stages start after a barrier, so the ranks' slots share one time axis) and the number of
units whose activations the stage holds, after each change — for the timelines and memory curves of
GPipe, 1F1B, interleaved 1F1B and ZB-H1 side by side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.mpu.state import ParallelState
from minimegatron.schedules.orders import Work, check_order, work_item
from minimegatron.schedules.simulate import Slot

__all__ = ["ScheduleResult", "run_schedule"]


@dataclass
class ScheduleResult:
    loss: float | None     # mean loss over the micro-batches (the last virtual stage's rank, else None)
    max_in_flight: int     # most (micro-batch, chunk) units whose activations this stage held at once
    timeline: list[Slot] = field(default_factory=list)  # this stage's F / B / W, in the order run
    in_flight: list[tuple[float, int]] = field(default_factory=list)  # (time, units held) per change


def _chunks(stage: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(stage, nn.Module) and not isinstance(stage, nn.ModuleList):
        return [stage]
    return list(stage)


def run_schedule(stage: nn.Module | Sequence[nn.Module], order: Sequence[Work],
                 micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], state: ParallelState,
                 activation_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> ScheduleResult:
    """Run one step's ``order`` on this pipeline stage (TEACHING; DeepSpeed's engine is the real one).

    ``stage``: this rank's module, or its list of ``v`` chunk modules (an ``nn.ModuleList`` counts as
    a list). ``micro_batches[k] = (inputs, labels)``: virtual stage 0 reads the inputs, the last one
    the labels. Every boundary carries activations of ``activation_shape``. Gradients of the loss
    ``mean_k loss_fn(out_k, labels_k)`` accumulate in ``.grad`` (each micro-batch's loss is scaled by
    ``1/m``); a module with tied weights (``get_tied_weights_and_groups``, as DeepSpeed's
    PipelineModule) gets them all-reduced at the end.
    """
    chunks, m = _chunks(stage), len(micro_batches)
    units = [work_item(w) for w in order]
    used = 1 + max((c for _, _, c in units), default=0)
    if used != len(chunks):
        raise ValueError(f"the order runs {used} model chunk(s) per stage but {len(chunks)} module(s) "
                         "were given: pass one module per chunk (chunk c is virtual stage c·p + s)")
    check_order(units, m, used)
    v, p, s = len(chunks), state.pp, state.pp_rank
    me, prev, nxt = state.pp_ranks[s], state.pp_ranks[(s - 1) % p], state.pp_ranks[(s + 1) % p]
    last = p * v - 1  # the last virtual stage
    split = {(k, c) for kind, k, c in units if kind == "W"}
    mailbox: dict[int, torch.Tensor] = {}  # p = 1 with chunks: chunk c+1 is on this rank too

    def tag(k: int, j: int, gradient: bool) -> int:  # message into virtual stage j
        return 2 * (j * m + k) + int(gradient)

    def send(tensor: torch.Tensor, dst: int, tag_: int) -> None:
        tensor = tensor.detach().contiguous()
        if dst == me:
            mailbox[tag_] = tensor
        else:
            sends.append((dist.isend(tensor, dst=dst, tag=tag_), tensor))  # keep the buffer until sent

    def recv(like: torch.Tensor, src: int, tag_: int) -> torch.Tensor:
        if src == me:
            return mailbox.pop(tag_)
        dist.recv(like, src=src, tag=tag_)
        return like

    held: dict[tuple[int, int], tuple] = {}  # (mb, chunk) -> (input, output[, ∂L/∂output])
    sends: list = []
    losses, slots, in_flight = [], [], []
    if p > 1:
        dist.barrier(group=state.pp_group)  # one time axis for every stage's slots
    in_flight.append((time.perf_counter(), 0))

    def note(held_now: int) -> None:
        in_flight.append((time.perf_counter(), held_now))

    for kind, k, c in units:
        j, module = c * p + s, chunks[c]
        if kind == "F":
            if j == 0:
                x = micro_batches[k][0]
                if (k, c) in split and x.is_floating_point():
                    x = x.detach().requires_grad_()  # so that B costs what it costs elsewhere
            else:
                x = recv(torch.empty(tuple(activation_shape), dtype=dtype), prev, tag(k, j, False))
                x.requires_grad_()
            start = time.perf_counter()
            y = module(x)
            if j == last:
                y = loss_fn(y, micro_batches[k][1]) / m  # ∂(mean over micro-batches)
                losses.append(y.detach() * m)
            slots.append(Slot(s, "F", k, start, time.perf_counter(), c))
            if j < last:
                send(y, nxt, tag(k, j + 1, False))
            held[(k, c)] = (x, y)
            note(len(held))
        elif kind == "B":
            x, y = held[(k, c)]
            grad = None if j == last else recv(torch.empty_like(y), nxt, tag(k, j, True))
            start = time.perf_counter()
            if (k, c) in split:  # input gradient only; keep the graph for W
                dx = torch.autograd.grad(y, x, grad, retain_graph=True)[0] if x.requires_grad else None
                held[(k, c)] = (x, y, grad)
            else:  # the whole backward: parameter gradients accumulate, the graph is freed
                y.backward(grad)
                dx = x.grad
                del held[(k, c)]
            slots.append(Slot(s, "B", k, start, time.perf_counter(), c))
            if j > 0:
                send(dx, prev, tag(k, j - 1, True))
            if (k, c) not in split:
                note(len(held))
        else:  # "W": the parameter gradients of this unit, accumulated into .grad
            x, y, grad = held.pop((k, c))
            params = [q for q in module.parameters() if q.requires_grad]
            start = time.perf_counter()
            if params:
                torch.autograd.backward(y, grad, inputs=params)
            slots.append(Slot(s, "W", k, start, time.perf_counter(), c))
            note(len(held))
    for handle, _ in sends:
        handle.wait()
    for module in chunks:  # e.g. GPT's embedding = LM head, first + last stage
        for weight, group in getattr(module, "get_tied_weights_and_groups", lambda: [])():
            if weight.grad is not None:
                dist.all_reduce(weight.grad, group=group)
    loss = float(torch.stack(losses).mean()) if losses else None
    return ScheduleResult(loss, max(n for _, n in in_flight), slots, in_flight)
