"""Exercise 01's grader internals: the data of every rank, the single-device computation, the mistakes.

The candidate runs on 4 ranks: two TP groups of 2, each with its own data (drawn from the group's
seed), so that a collective over every rank instead of the TP group gives other numbers. Each rank
returns what the candidate gave (output, gradients) and which collectives it called; the parent draws
the same data again and computes the expected result on one device with plain autograd — no parallel
code of the package — and, when the candidate's differs, the result of each usual mistake: the first
one it matches is named. Nothing here is the exercise (``ex01_tensor_parallel.py``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from exercises.grading import GradingError, assert_close
from exercises.watch import Collectives
from minimegatron.mpu.state import initialize_model_parallel

WORLD, TP = 4, 2
S, B, H, OUT = 4, 3, 8, 6
TOL = 1e-5
INPUT_NAMES = {"01.1": ["x"], "01.2": ["x"], "01.3": ["x", "weight_shard", "bias_shard"],
               "01.4": ["x_shard", "weight_shard", "bias"]}


def group_data(part: str, group: int) -> dict[str, torch.Tensor]:
    """The dense tensors of one TP group: the same on every rank of it, different in the other group."""
    g = torch.Generator().manual_seed(100 * int(part[-1]) + group)
    if part == "01.1":  # x replicated, every rank's downstream gradient its own
        return {"x": torch.randn(S, B, H, generator=g), "c": torch.randn(TP, S, B, H, generator=g)}
    if part == "01.2":  # every rank's partial result, the downstream gradient replicated
        return {"x": torch.randn(TP, S, B, H, generator=g), "c": torch.randn(S, B, H, generator=g)}
    return {"x": torch.randn(S, B, H, generator=g), "w": torch.randn(OUT, H, generator=g),
            "b": torch.randn(OUT, generator=g), "c": torch.randn(S, B, OUT, generator=g)}


def rank_inputs(part: str, d: dict, r: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(inputs, cotangent) of TP rank r from its group's dense tensors."""
    o, h = OUT // TP, H // TP
    if part == "01.1":
        return [d["x"]], d["c"][r]
    if part == "01.2":
        return [d["x"][r]], d["c"]
    if part == "01.3":
        return [d["x"], d["w"][r * o:(r + 1) * o], d["b"][r * o:(r + 1) * o]], d["c"]
    return [d["x"][..., r * h:(r + 1) * h], d["w"][:, r * h:(r + 1) * h], d["b"]], d["c"]


def run(fn: Callable, inputs: list[torch.Tensor], cotangent: torch.Tensor) -> dict[str, Any]:
    """Forward, the loss <y, cotangent>, backward; the output and every input's gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    before = [t.detach().clone() for t in leaves]
    y = fn(*leaves)
    if not isinstance(y, torch.Tensor):
        return {"output": y}
    out = {"output": y.detach().clone(), "modified": any(not torch.equal(a, b) for a, b in zip(before, leaves))}
    out["connected"] = y.requires_grad
    if y.shape == cotangent.shape and y.dtype == cotangent.dtype and y.requires_grad and not out["modified"]:
        (y * cotangent).sum().backward()
    out["grads"] = [None if t.grad is None else t.grad.clone() for t in leaves]
    return out


def rank_case(item: tuple[str, Callable]) -> dict:
    """On every rank: the candidate of exercise ``part`` on this rank's data, its collectives watched."""
    part, candidate = item
    state = initialize_model_parallel(TP)
    group = state.tp_ranks[0] // TP  # which TP group (they are consecutive ranks)
    inputs, cotangent = rank_inputs(part, group_data(part, group), state.tp_rank)
    log = Collectives()
    try:
        with log.watching(getattr(candidate, "__self__", candidate)):  # MyFunction.apply: MyFunction's module
            got = run(lambda *a: candidate(*a, state), inputs, cotangent)
    except RuntimeError as err:
        if "incorrect number of gradients" not in str(err):
            raise
        raise GradingError(f"Exercise {part}: backward must return one gradient per input of forward — "
                           f"(grad, None): None for state ({err})") from None
    return {"part": part, "got": got, "tp_rank": state.tp_rank, "group": group,
            "calls": log.summary(state.tp_group)}


# --- the single-device computation and the mistakes --------------------------------------------------

def dense(part: str, d: dict, r: int, variant: str = "right") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and input gradients on TP rank r, computed on one device; ``variant`` a usual mistake."""
    o, h, tp = OUT // TP, H // TP, TP
    if part == "01.1":
        x = d["x"]
        y = {"forward_reduce": tp * x}.get(variant, x)
        grad = {"identity": d["c"][r], "mean": d["c"].mean(0)}.get(variant, d["c"].sum(0))
        return y, [grad]
    if part == "01.2":
        y = {"identity": d["x"][r], "mean": d["x"].mean(0)}.get(variant, d["x"].sum(0))
        return y, [{"backward_reduce": tp * d["c"]}.get(variant, d["c"])]
    x, w, b = (d[k].clone().requires_grad_() for k in "xwb")
    if part == "01.3":
        y = F.linear(x, w, b)
        if variant == "reversed":
            y = torch.cat(y.split(o, -1)[::-1], -1)
        (y * d["c"]).sum().backward()
        gx = x.grad
        if variant == "no_f":  # x's gradient only from this rank's columns
            gx = d["c"][..., r * o:(r + 1) * o] @ d["w"][r * o:(r + 1) * o]
        return y.detach(), [gx, w.grad[r * o:(r + 1) * o], b.grad[r * o:(r + 1) * o]]
    cols = slice(r * h, (r + 1) * h)
    if variant == "no_reduce":
        y = F.linear(x[..., cols], w[:, cols], b)
    else:
        y = F.linear(x, w) + b * (tp if variant == "bias_before" else 0 if variant == "no_bias" else 1)
    (y * d["c"]).sum().backward()
    scale = tp if variant == "backward_reduce" else 1
    return y.detach(), [scale * x.grad[..., cols], scale * w.grad[:, cols], b.grad]


MISTAKES = {  # part -> [(variant, output or the gradients, message)]
    "01.1": [("forward_reduce", "output", "f's forward all-reduced x: the output is tp × x (here 2×) — f's forward "
              "is the identity, its backward the all-reduce"),
             ("identity", "grads", "f's backward returned the gradient unchanged: x fed every rank of the TP "
              "group, so ∂L/∂x is the SUM of their gradients — all-reduce it over state.tp_group in backward"),
             ("mean", "grads", "the gradient is the MEAN over the TP group: ∂L/∂x is the sum — no division by tp")],
    "01.2": [("identity", "output", "g's forward returned this rank's partial result: sum the TP group's "
              "partials — all-reduce a clone of x over state.tp_group"),
             ("mean", "output", "the output is the MEAN of the partials: g sums them (no division by tp)"),
             ("backward_reduce", "grads", "g's backward all-reduced too: ∂L/∂y is already the same on every "
              "TP rank, so summing it gives tp× (2× = tp×) the gradient — g's backward is the identity")],
    "01.3": [("reversed", "output", "the gathered slices are in the wrong order: rank i's X·W_iᵀ + b_i is the "
              "i-th block of the last dim"),
             ("no_f", "grads", "x's gradient holds only this rank's share (c_i·W_i): x must enter through f "
              "(copy_to_tensor_model_parallel_region), whose backward sums the TP group's shares")],
    "01.4": [("bias_before", "output", "the bias was added on every rank before the all-reduce: it is counted "
              "tp times — add it once, after g"),
             ("no_reduce", "output", "the partial products were not summed: this rank's X_i·W_iᵀ + b only — "
              "all-reduce them with g before adding the bias"),
             ("no_bias", "output", "the bias is missing: Y = Σ_i X_i·W_iᵀ + b"),
             ("backward_reduce", "grads", "the gradients of x_shard and weight_shard are tp× (2× = tp×) too "
              "large: your g all-reduces in backward too — g's backward is the identity")]}
HINTS = {"01.1": ("f's forward is the identity", "f's backward all-reduces: x fed every rank, so ∂L/∂x sums "
                  "the TP group"),
         "01.2": ("g's forward all-reduces (sums) the per-rank partial results", "g's backward is the identity: "
                  "∂L/∂y is already the same on every rank"),
         "01.3": ("Y = [X·W_0ᵀ+b_0, X·W_1ᵀ+b_1] gathered along the last dim", "x must enter through f so that "
                  "its gradient is all-reduced"),
         "01.4": ("all-reduce the partial products, then add the bias once", "g's backward is the identity")}


def _close(a: Any, b: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and \
        torch.allclose(a, b, rtol=TOL, atol=TOL)


def judge(part: str, results: list[dict]) -> None:
    """Raise the GradingError that names what is wrong, rank by rank; return None when right."""
    for rank, res in enumerate(results):
        got, calls, r = res["got"], res["calls"], res["tp_rank"]
        where = f"Exercise {part}, rank {rank} (TP rank {r} of the TP group of ranks " \
                f"{', '.join(str(res['group'] * TP + i) for i in range(TP))})"
        d = group_data(part, res["group"])
        y, grads = dense(part, d, r)
        if got.get("modified"):
            raise GradingError(f"{where}: your code modified its input in place (e.g. dist.all_reduce(x)); "
                               "clone it first: x = x.clone()")
        if calls["ungrouped"]:
            raise GradingError(f"{where}: dist.{calls['ungrouped'][0]} without group=state.tp_group — it runs "
                               f"over every rank (the default group), here {WORLD} ranks in two TP groups, and "
                               "mixes the groups' data: pass group=state.tp_group")
        if calls["tracked"]:
            raise GradingError(f"{where}: a raw dist.{calls['tracked'][0]} on a tensor autograd tracks — "
                               "torch.distributed's collectives have no backward: autograd treats them as the "
                               "identity, with a warning that this may be silently wrong and will be removed. "
                               "Put the collective in a torch.autograd.Function (your f/g, or the package's "
                               "mappings) that says what its backward is")
        models = {v: dense(part, d, r, v) for v, _, _ in MISTAKES[part]}
        forward, backward = HINTS[part]
        if not _close(got["output"], y):
            if isinstance(got["output"], torch.Tensor) and got["output"].shape[:-1] == y.shape[:-1] and \
                    got["output"].shape[-1] * TP == y.shape[-1] and part == "01.3":
                raise GradingError(f"{where}: the output is this rank's slice (…, out/tp): all-gather the TP "
                                   "group's slices along the last dim (gather_from_tensor_model_parallel_region)")
            for v, what, message in MISTAKES[part]:
                if what == "output" and _close(got["output"], models[v][0]):
                    raise GradingError(f"{where}: {message}")
            assert_close(f"{where}, forward output ({forward})", got["output"], y, rtol=TOL, atol=TOL)
        if not got["connected"]:
            raise GradingError(f"{where}: the output is not connected to the inputs' autograd graph "
                               "(no gradient flows back): did you use .detach(), .data or torch.no_grad()?")
        names = INPUT_NAMES[part]
        for i, (name, g_got, g_exp) in enumerate(zip(names, got["grads"], grads)):
            if g_got is None:
                raise GradingError(f"{where}: no gradient reached {name} — is the backward returning it?")
            if _close(g_got, g_exp):
                continue
            for v, what, message in MISTAKES[part]:
                if what == "grads" and models[v][1][i] is not None and _close(g_got, models[v][1][i]):
                    raise GradingError(f"{where}: {message}")
            assert_close(f"{where}, backward: gradient of {name} ({backward})", g_got, g_exp, rtol=TOL, atol=TOL)
