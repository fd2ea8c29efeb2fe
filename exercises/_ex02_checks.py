"""Exercise 02's grader internals: 02.1 on 4 ranks (two TP groups of 2, each with its own weights and
input) against the MLP on one device, with the usual mistakes' results; 02.2's usual wrong row sets.

As in exercise 01 (whose ``run`` this reuses): each rank returns what the candidate gave and which
collectives it called; the parent recomputes the MLP on one device with plain autograd and names the
first mistake whose result the candidate's matches. Nothing here is the exercise (``ex02_parallel_mlp.py``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from exercises._ex01_checks import run
from exercises.grading import GradingError, assert_close
from exercises.watch import Collectives
from minimegatron.mpu.state import initialize_model_parallel

WORLD, TP, S, B, H = 4, 2, 6, 2, 16
FFN = 4 * H
NAMES = ["x", "w1", "b1", "w2", "b2"]
TOL = 1e-5


def group_data(group: int) -> dict[str, torch.Tensor]:
    """One TP group's full weights, input and (replicated) downstream gradient; pre-activations of order
    1, where GeLU is curved."""
    g = torch.Generator().manual_seed(20 + group)
    return {"x": torch.randn(S, B, H, generator=g), "w1": torch.randn(FFN, H, generator=g) * H ** -0.5,
            "b1": 0.1 * torch.randn(FFN, generator=g), "w2": torch.randn(H, FFN, generator=g) * FFN ** -0.5,
            "b2": 0.1 * torch.randn(H, generator=g), "c": torch.randn(S, B, H, generator=g)}


def shards(d: dict, r: int) -> list[torch.Tensor]:
    rows = slice(r * FFN // TP, (r + 1) * FFN // TP)
    return [d["x"], d["w1"][rows], d["b1"][rows], d["w2"][:, rows], d["b2"]]


def rank_case(candidate: Callable) -> dict:
    state = initialize_model_parallel(TP)
    group = state.tp_ranks[0] // TP
    d = group_data(group)
    log = Collectives()
    with log.watching(candidate):
        got = run(lambda *a: candidate(*a, state), shards(d, state.tp_rank), d["c"])
    return {"got": got, "tp_rank": state.tp_rank, "group": group, "calls": log.summary(state.tp_group)}


def dense(d: dict, r: int, variant: str = "right") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients of rank r's shards on one device; ``variant``: a usual mistake's."""
    x, w1, b1, w2, b2 = (d[k].clone().requires_grad_() for k in NAMES)
    approximate = "none" if variant == "exact_gelu" else "tanh"
    pre = F.linear(x, w1, None if variant in ("no_b1", "b1_after") else b1)
    act = F.gelu(pre, approximate=approximate) + (b1 if variant == "b1_after" else 0)
    rows = slice(r * FFN // TP, (r + 1) * FFN // TP)
    if variant == "no_reduce":
        y = F.linear(act[..., rows], w2[:, rows]) + b2
    else:
        y = F.linear(act, w2) + b2 * (TP if variant == "bias_tp" else 1)
    (y * d["c"]).sum().backward()
    x, w1, b1, w2, b2 = (t.grad if t.grad is not None else torch.zeros_like(t) for t in (x, w1, b1, w2, b2))
    grads = [x, w1[rows], b1[rows], w2[:, rows], b2]
    if variant == "no_f":  # x's gradient from this rank's slice of the ffn only
        xs = d["x"].clone().requires_grad_()
        part = F.linear(F.gelu(F.linear(xs, d["w1"][rows], d["b1"][rows]), approximate="tanh"), d["w2"][:, rows])
        (part * d["c"]).sum().backward()
        grads[0] = xs.grad
    if variant == "backward_reduce":  # a g whose backward all-reduces: everything before it tp×
        grads = [TP * g for g in grads[:4]] + [grads[4]]
    return y.detach(), grads


MISTAKES = [  # (variant, "output" or "grads", message)
    ("bias_tp", "output", f"b2 was added {TP} times (on every rank before the all-reduce): add it once, after g"),
    ("exact_gelu", "output", "the exact GeLU: GPT-2's MLP uses the tanh approximation, "
                             "F.gelu(·, approximate=\"tanh\")"),
    ("no_b1", "output", "b1 is missing: the column layer adds it before the GeLU"),
    ("b1_after", "output", "b1 was added after the GeLU: it belongs to the column layer, GeLU(X·A + b1)"),
    ("no_reduce", "output", "the row layer's partial products were not summed: all-reduce them with g "
                            "(reduce_from_tensor_model_parallel_region) before adding b2"),
    ("no_f", "grads", "x's gradient holds only this rank's share of the ffn: x must enter the TP region through f "
                      "(copy_to_tensor_model_parallel_region), whose backward all-reduces ∂L/∂x"),
    ("backward_reduce", "grads", f"the gradients before g are {TP}× (2× = tp×) too large: your g all-reduces "
                                 "in backward too — ∂L/∂Y is already the same on every TP rank")]
HINTS = {"x": "x must enter the TP region through f (copy_to_...): its backward all-reduces ∂L/∂x",
         "w1": "∂L/∂w1 needs the GeLU'(·) of your column output and ∂L/∂Y flowing back through g",
         "b1": "b1 belongs to the column layer: add it before the GeLU",
         "w2": "∂L/∂w2 = GeLU(h)ᵀ·∂L/∂Y on this rank's slice", "b2": "b2 is replicated: add it once, after g"}


def _close(a, b) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and \
        torch.allclose(a, b, rtol=TOL, atol=TOL)


def judge(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        got, calls, r = res["got"], res["calls"], res["tp_rank"]
        where = f"Exercise 02.1, rank {rank} (TP rank {r} of the TP group of ranks " \
                f"{', '.join(str(res['group'] * TP + i) for i in range(TP))})"
        if got.get("modified"):
            raise GradingError(f"{where}: your code modified one of its inputs in place; clone it first")
        if calls["ungrouped"]:
            raise GradingError(f"{where}: dist.{calls['ungrouped'][0]} without group=state.tp_group — it runs over "
                               f"every rank, here {WORLD} ranks in two TP groups with different weights: pass "
                               "group=state.tp_group (or use f and g)")
        if calls["tracked"]:
            raise GradingError(f"{where}: a raw dist.{calls['tracked'][0]} on a tensor autograd tracks: it has no "
                               "backward — use f and g (copy_to_/reduce_from_tensor_model_parallel_region)")
        d = group_data(res["group"])
        y, grads = dense(d, r)
        models = {v: dense(d, r, v) for v, _, _ in MISTAKES}
        if not _close(got["output"], y):
            for v, what, message in MISTAKES:
                if what == "output" and _close(got["output"], models[v][0]):
                    raise GradingError(f"{where}: {message}")
            assert_close(f"{where}, forward output Y = GeLU_tanh(X·A + b1)·B + b2", got["output"], y,
                         rtol=TOL, atol=TOL)
        for i, (name, g_got, g_exp) in enumerate(zip(NAMES, got["grads"], grads)):
            if g_got is None:
                raise GradingError(f"{where}: no gradient reached {name} — is it part of the computation, without "
                                   ".detach() or torch.no_grad()?")
            if _close(g_got, g_exp):
                continue
            for v, what, message in MISTAKES:
                if what == "grads" and _close(g_got, models[v][1][i]):
                    raise GradingError(f"{where}: {message}")
            assert_close(f"{where}, gradient of {name} ({HINTS[name]})", g_got, g_exp, rtol=TOL, atol=TOL)


# --- 02.2 the fused QKV rows ---------------------------------------------------------------------------

def qkv_mistakes(h: int, r: int, tp: int) -> list[tuple[torch.Tensor, str]]:
    """(rows, message) of the usual wrong answers for rank r."""
    n = h // tp

    def part(which, rank=r):
        return torch.arange(which * h + rank * n, which * h + (rank + 1) * n)

    return [
        (torch.arange(r * 3 * n, (r + 1) * 3 * n), "you took one contiguous block of 3h/tp rows; with stride 3 "
                                                   "each rank takes its 1/tp of Q, of K and of V (three blocks)"),
        (torch.cat([part(1), part(0), part(2)]), "the right rows in the wrong order: the rank stores its slice of "
                                                 "Q, then of K, then of V"),
        (torch.arange(r, 3 * h, tp), "every tp-th row (round-robin): a stride-3 split cuts each of Q, K, V into tp "
                                     "contiguous blocks of h/tp rows"),
        (torch.cat([part(w, r + 1) for w in range(3)]),
         "rank r+1's rows: ranks count from 0 — rank r's slice of Q is rows r·h/tp … (r+1)·h/tp - 1"),
        (part(0), "only the rank's slice of Q: the fused weight [W_Q; W_K; W_V] gives each rank its slice of all "
                  "three"),
        (torch.cat([part(w) for w in range(3)]) + 1, "row indices count from 0")]
