"""Exercise 06.2's grader internals: toy stages that log WHICH micro-batch each forward and backward
ran on, the unsplit model's step, and the checks with their messages.

A stage's forward recognises its micro-batch by its input (the unsplit model's input of that stage,
computed beforehand on every rank), and its backward by the graph it backpropagates (the forward's
micro-batch, kept in the autograd context): the log is [("F", k), ("B", k), ...], compared with the
order given — so a LIFO stash (backward pops the newest forward) is caught even where its gradients
come out right. Nothing here is the exercise (``ex06_pipeline.py``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from exercises.grading import GradingError, assert_close, kind_of
from minimegatron.mpu.state import initialize_model_parallel

H, MB, M = 8, 2, 4  # width of the toy stages, micro-batch size, micro-batches per step


class _Tick(torch.autograd.Function):
    """Identity that logs ("F", k) when the stage's forward ends and ("B", k) when its backward starts."""

    @staticmethod
    def forward(ctx, x, log, k):
        ctx.log, ctx.k = log, k
        log.append(("F", k))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(("B", ctx.k))
        return grad, None, None


class ToyStage(nn.Module):
    """Stage s of the toy pipeline: Linear(H, H) + tanh, drawn from seed 100 + s. ``inputs``: the
    unsplit model's input of this stage for each micro-batch (how a forward knows its micro-batch)."""

    def __init__(self, s: int, inputs: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        torch.manual_seed(100 + s)
        self.linear = nn.Linear(H, H)
        self.inputs = inputs or []
        self.log: list[tuple[str, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = next((j for j, ref in enumerate(self.inputs)
                  if ref.shape == x.shape and torch.allclose(x.detach(), ref, rtol=1e-5, atol=1e-6)), -1)
        return _Tick.apply(torch.tanh(self.linear(x)), self.log, k)


def toy_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(MB, H, generator=g), torch.randn(MB, H, generator=g)) for _ in range(M)]


def loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return ((out - labels) ** 2).mean()


def schedule_case(candidate: Callable, p: int, schedule: str) -> dict:
    """On each rank: the unsplit model's step (loss, this stage's gradients and inputs), then the
    candidate's step on this stage."""
    from minimegatron import schedules

    state = initialize_model_parallel(1, p)
    s, data = state.pp_rank, toy_data()
    dense = nn.ModuleList(ToyStage(i) for i in range(p))
    losses, inputs = [], []
    for x, y in data:
        for i, layer in enumerate(dense):
            if i == s:
                inputs.append(x.detach().clone())
            x = layer(x)
        losses.append(loss_fn(x, y))
    torch.stack(losses).mean().backward()
    last = nn.ModuleList(ToyStage(i) for i in range(p))  # the last micro-batch's gradient alone
    x = data[-1][0]
    for layer in last:
        x = layer(x)
    (loss_fn(x, data[-1][1]) / M).backward()
    order = getattr(schedules, schedule)(s, p, M)
    stage = ToyStage(s, inputs)
    loss = candidate(stage, order, data, loss_fn, state, (MB, H))
    if isinstance(loss, torch.Tensor):
        loss = loss.detach().reshape(()) if loss.numel() == 1 else loss.detach()
    grads = {n: (None if q.grad is None else q.grad.clone()) for n, q in stage.named_parameters()}
    return {"loss": loss, "expected_loss": torch.stack(losses).mean().detach(), "grads": grads,
            "expected_grads": {n: q.grad.clone() for n, q in dense[s].named_parameters()},
            "last_grads": {n: q.grad.clone() for n, q in last[s].named_parameters()},
            "log": stage.log, "order": list(order), "losses": [float(x.detach()) for x in losses]}


def _shown(log: list[tuple[str, int]]) -> str:
    return " ".join(f"{c}{k if k >= 0 else '?'}" for c, k in log)


def order_problem(log: list[tuple[str, int]], order: list[tuple[str, int]]) -> str | None:
    if log == order:
        return None
    given = f"the order was {_shown(order)}, the stage ran {_shown(log)} (F k: a forward on micro-batch k " \
            "ended; B k: the backward of micro-batch k's graph started)"
    if [c for c, _ in log] != [c for c, _ in order]:
        return f"{given}: run the work in the order given"
    i = next(i for i, (a, b) in enumerate(zip(log, order)) if a != b)
    (kind, k), (_, ran) = order[i], log[i]
    if kind == "B":
        pending = [j for c, j in log[:i] if c == "F"]
        pending = [j for j in pending if ("B", j) not in log[:i]]
        if pending and ran == pending[-1] and ran != k:
            return (f"{given}: at ('B', {k}) your code backpropagated micro-batch {ran}'s graph, the NEWEST "
                    "pending forward — a LIFO stash (a stack: stash.pop()). ('B', k) must backpropagate micro-"
                    "batch k's own (input, output): keep them by micro-batch, stash[k]")
        return f"{given}: at ('B', {k}) your code backpropagated micro-batch {ran}'s graph — use micro-batch {k}'s"
    return (f"{given}: ('F', {k}) ran on micro-batch {ran if ran >= 0 else 'of no known'}'s input — the first "
            f"stage reads micro_batches[{k}][0], the others receive micro-batch {k}'s activation")


def judge(name: str, p: int, results: list[dict]) -> None:
    for s, res in enumerate(results):
        where = f"Exercise 06.2 ({name}, p={p}, stage {s})"
        problem = order_problem(res["log"], res["order"])
        if problem:
            raise GradingError(f"{where}: {problem}")
        if s == p - 1:
            loss = res["loss"]
            if loss is None:
                raise GradingError(f"{where}: the last stage must return the mean loss, got None")
            if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
                loss = float(loss)
            if not isinstance(loss, (int, float)) or isinstance(loss, bool):
                raise GradingError(f"{where}: the last stage must return the mean loss as a float, got "
                                   f"{kind_of(loss)}")
            if abs(loss - sum(res["losses"])) < 1e-5 and M > 1:
                raise GradingError(f"{where}: the returned loss {loss:.6g} is the SUM of the {M} micro-batches' "
                                   f"losses: return their mean")
            assert_close(f"{where}, loss (mean over the {M} micro-batches)",
                         torch.tensor(float(loss), dtype=torch.float32), res["expected_loss"], rtol=1e-5, atol=1e-6)
        for n, expected in res["expected_grads"].items():
            got = res["grads"][n]
            if got is None:
                raise GradingError(f"{where}: no gradient reached {n} — did backward run on this stage (from "
                                   "the received gradient, or from the loss on the last stage)?")
            if torch.allclose(got, M * expected, rtol=1e-4, atol=1e-7):
                raise GradingError(f"{where}: gradient of {n} is {M}× too large — divide each micro-batch's "
                                   f"loss by m = {M} (the step's loss is the mean)")
            if M > 1 and torch.allclose(got, res["last_grads"][n], rtol=1e-5, atol=1e-7):
                raise GradingError(f"{where}: gradient of {n} is the last micro-batch's alone: the gradients "
                                   "must ACCUMULATE over the micro-batches — no zero_grad() (nor p.grad = None) "
                                   "between them, only before the step")
            assert_close(f"{where}, gradient of {n} (accumulated over the micro-batches)", got, expected,
                         rtol=1e-5, atol=1e-6)
