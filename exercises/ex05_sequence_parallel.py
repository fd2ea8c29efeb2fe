"""Exercise 05: sequence parallelism — the all-gather/reduce-scatter pair and the SP row layer.

05.1  GatherFromSequenceParallelRegion — sequence parallelism's ``g`` as a torch.autograd.Function::

          forward:  all-gather along dim 0      x (s/tp, b, h)  ->  X (s, b, h), the same on every rank
          backward: reduce-scatter along dim 0  ∂L/∂X (s, b, h) ->  ∂L/∂x (s/tp, b, h)

      Why a reduce-scatter and not a split: every rank feeds the *whole* gathered X into its own
      tensor-parallel branch (its heads, its slice of the MLP), so each rank holds a different, partial
      ∂L_r/∂X. The gradient of this rank's rows is the sum over ranks of those rows:
      ``∂L/∂x_r = Σ_q (∂L_q/∂X)[rows of r]`` — exactly a reduce-scatter.

05.2  sequence_parallel_row_linear(x, weight, bias, state) — RowParallelLinear's forward under SP
      (Korthikanti et al. 2022, §4.2.2, the ``ḡ`` after the row-parallel layer)::

          x (s, b, in/tp)  this rank's feature slice, whole sequence (the column layer's output)
          weight (out, in/tp), bias (out,) replicated
          Y_r = reduce_scatter_dim0(x·weightᵀ) + f(bias)       ->  (s/tp, b, out), this rank's rows

      Use ONE reduce-scatter (``reduce_scatter_to_sequence_parallel_region``, imported below, or your
      own Function): an all-reduce followed by a split gives the same numbers but moves twice the bytes
      — the grader counts them. Mind where the bias goes — and its gradient: every rank holds the whole
      bias but adds it to its own s/tp rows only, so ``∂L/∂b`` on rank r is a partial sum over those
      rows. ``f`` (``copy_to_tensor_model_parallel_region``, imported below: identity forward,
      all-reduce backward) sums it over TP — as the package does for the norms' weights too.

The collectives (torch renamed them in 2.13; the aliases below work on every version)::

    all_gather_single(out, x, group=state.tp_group)         out (tp·n, ...) <- every rank's x (n, ...)
    reduce_scatter_single(out, x, group=state.tp_group)     out (n/tp, ...) <- Σ_ranks x, chunk tp_rank

Grade with:  grade_gather_from_sequence_parallel(GatherFromSequenceParallelRegion)
             grade_sequence_parallel_row_linear(sequence_parallel_row_linear)
Both run your code on real gloo ranks — 2 ranks (tp=2), 4 ranks (tp=4) and 4 ranks split into two
TP groups of 2 (tp=2, dp=2) — and compare outputs AND gradients with the package
(``minimegatron.mpu.mappings.gather_from_sequence_parallel_region``, ``RowParallelLinear``).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: F401  (you will need it)

from exercises.battery import refuse_reference
from exercises.grading import (GradingError, assert_close, grader, passed,
                               run_graded)
from minimegatron.compat import all_gather_single, reduce_scatter_single  # noqa: F401
from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region,  # noqa: F401
                                       gather_from_sequence_parallel_region,
                                       reduce_scatter_to_sequence_parallel_region)
from minimegatron.mpu.state import ParallelState, initialize_model_parallel



class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Your code (05.1): forward all-gather dim 0, backward reduce-scatter dim 0, over state.tp_group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
        # Hint: out = torch.empty((state.tp * x.size(0), *x.shape[1:]), dtype=x.dtype); keep the state
        # for backward (ctx.state = state).
        raise NotImplementedError("Exercise 05.1: implement the forward — all-gather x (s/tp, b, h) "
                                  "along dim 0 over state.tp_group into (s, b, h)")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise NotImplementedError("Exercise 05.1: implement the backward — reduce-scatter the (s, b, h) "
                                  "gradient along dim 0 to (s/tp, b, h); return (grad_x, None)")


def sequence_parallel_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 state: ParallelState) -> torch.Tensor:
    """Your code (05.2): partial x·weightᵀ (s, b, out), reduce-scatter dim 0 -> (s/tp, b, out), + f(bias)."""
    raise NotImplementedError("Exercise 05.2: implement the sequence-parallel row-parallel forward — the "
                              "partial product, one reduce-scatter along the sequence, then f(bias)")


# --- grading -----------------------------------------------------------------------------------------

S, B, H, IN, OUT = 8, 2, 6, 12, 10
LAYOUTS = ((2, 2), (4, 4), (4, 2))  # (world size, tp): the last one has two TP groups of 2
TIMEOUT = 15.0  # s per layout: a few small tensors — a hang is reported well before a minute


def _as_callable(candidate: Any) -> Callable:
    if isinstance(candidate, type) and issubclass(candidate, torch.autograd.Function):
        return candidate.apply
    return candidate


def package_sequence_parallel_row_linear(x, weight, bias, state):
    """The package's RowParallelLinear(input_is_parallel, sequence_parallel) on the given tensors."""
    from minimegatron.mpu.layers import RowParallelLinear
    layer = RowParallelLinear(IN, OUT, state=state, input_is_parallel=True, sequence_parallel=True)
    return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))


def _forward_backward(fn: Callable, inputs: list[torch.Tensor], cotangent: torch.Tensor,
                      count_comm: bool) -> dict[str, Any]:
    """Forward (collectives counted), the loss <y, cotangent>, backward; output and input gradients."""
    from minimegatron.measure.comm import CommCounter
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    before = [t.detach().clone() for t in leaves]
    comm = CommCounter()
    with comm if count_comm else nullcontext():
        y = fn(*leaves)
    out: dict[str, Any] = {"output": y.detach().clone() if isinstance(y, torch.Tensor) else y,
                           "forward_ops": {op: (t.count, t.bytes) for op, t in comm.totals().items()}}
    if any(not torch.equal(a, b) for a, b in zip(before, leaves)):
        out["modified"] = True
        return out
    out["connected"] = isinstance(y, torch.Tensor) and y.requires_grad
    if out["connected"] and y.shape == cotangent.shape and y.dtype == cotangent.dtype:
        try:
            (y * cotangent).sum().backward()
        except RuntimeError as err:  # autograd rejects a gradient whose shape is not the input's
            if "invalid gradient" not in str(err):
                raise
            out["backward_error"] = str(err).splitlines()[0]
    out["grads"] = [None if t.grad is None else t.grad.clone() for t in leaves]
    return out


def _case(exercise: str, tp: int, candidate: Callable, reference: Callable, make_inputs: Callable
          ) -> dict[str, Any]:
    """On every rank: this rank's inputs and cotangent, through the candidate and the reference."""
    state = initialize_model_parallel(tp)
    g = torch.Generator().manual_seed(100 + state.dp_rank)  # the two TP groups of (4, 2) differ
    inputs, cotangent = make_inputs(state, g)
    count = exercise.endswith("05.2")
    return {"got": _forward_backward(lambda *a: candidate(*a, state), inputs, cotangent, count),
            "expected": _forward_backward(lambda *a: reference(*a, state), inputs, cotangent, count),
            "own_rows": cotangent.chunk(tp)[state.tp_rank] if cotangent.size(0) == S else None}


def _gather_inputs(state: ParallelState, g: torch.Generator):
    x = torch.randn(S, B, H, generator=g)                            # the full sequence
    cotangent = torch.randn(state.tp, S, B, H, generator=g)[state.tp_rank]  # each rank's own ∂L_r/∂X
    return [x.chunk(state.tp)[state.tp_rank]], cotangent             # x_r (s/tp, b, h)


def _row_inputs(state: ParallelState, g: torch.Generator):
    x, w = torch.randn(S, B, IN, generator=g), torch.randn(OUT, IN, generator=g)
    b = torch.randn(OUT, generator=g)
    cols = slice(state.tp_rank * IN // state.tp, (state.tp_rank + 1) * IN // state.tp)
    cotangent = torch.randn(S, B, OUT, generator=g).chunk(state.tp)[state.tp_rank]  # (s/tp, b, out)
    return [x[..., cols], w[:, cols], b], cotangent


def _partial_over_the_tp_group(results: list[dict], rank: int, tp: int) -> bool:
    """True if this rank's bias gradient is wrong but the sum over its TP group's ranks is right."""
    first = rank // tp * tp  # the TP group of ``rank``: ranks first … first + tp - 1
    grads = [results[q]["got"]["grads"][2] for q in range(first, first + tp)]
    expected = results[rank]["expected"]["grads"][2]
    if any(g is None or g.shape != expected.shape for g in grads):
        return False
    return (not torch.allclose(grads[rank - first], expected, rtol=1e-5, atol=1e-5)
            and torch.allclose(sum(grads), expected, rtol=1e-4, atol=1e-5))


def _check_common(where: str, got: dict, expected: dict, tp: int, world: int) -> None:
    if got.get("modified"):
        raise GradingError(f"{where}: your code modified its input in place; clone it first")
    out, exp = got["output"], expected["output"]
    if tp < world and isinstance(out, torch.Tensor) and out.shape != exp.shape:
        raise GradingError(f"{where}: wrong shape {tuple(out.shape)}, expected {tuple(exp.shape)} — with "
                           f"{world} ranks and tp={tp} there are {world // tp} TP groups: pass "
                           "group=state.tp_group to every collective (the default group is all ranks)")


@grader
def grade_gather_from_sequence_parallel(candidate: Any, timeout: float = TIMEOUT) -> str:
    """05.1: ``candidate.apply(x_r, state)`` (or a function) -> X on every rank; x_r.grad = Σ_q rows."""
    from minimegatron.mpu import mappings
    refuse_reference("Exercise 05.1", candidate, gather_from_sequence_parallel_region,
                     getattr(mappings, "_GatherFromSequenceParallelRegion", gather_from_sequence_parallel_region))
    fn = _as_callable(candidate)
    for world, tp in LAYOUTS:
        results = run_graded(_case, world, "Exercise 05.1", tp, fn, gather_from_sequence_parallel_region,
                             _gather_inputs, timeout=timeout)
        for rank, res in enumerate(results):
            got, expected = res["got"], res["expected"]
            where = f"Exercise 05.1 (world {world}, tp={tp}), rank {rank}"
            _check_common(where, got, expected, tp, world)
            out = got["output"]
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (S // tp, B, H * tp):
                raise GradingError(f"{where}: output shape {tuple(out.shape)} — you gathered the last "
                                   "dim; sequence parallelism gathers dim 0, the sequence: (s/tp, b, h) -> "
                                   "(s, b, h)")
            exp = expected["output"]
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (S // tp, B, H):
                raise GradingError(f"{where}: the output is this rank's own rows (s/tp, b, h): forward must "
                                   "all-gather every rank's rows along dim 0 into (s, b, h)")
            if isinstance(out, torch.Tensor) and out.shape == exp.shape and not torch.equal(out, exp) and \
                    torch.equal(out, torch.cat(exp.chunk(tp)[::-1])):
                raise GradingError(f"{where}: the gathered rows are in reverse rank order: rank r's rows are "
                                   "the r-th block of the sequence")
            assert_close(f"{where}, forward output (all-gather of every rank's rows, in rank order)",
                         out, expected["output"])
            if not got["connected"]:
                raise GradingError(f"{where}: the output is not connected to x's autograd graph — call "
                                   "your Function with .apply(x, state) and return a tensor made in forward")
            if "backward_error" in got:
                raise GradingError(f"{where}: autograd rejected your backward — {got['backward_error']}"
                                   f". ∂L/∂x must have x's shape {(S // tp, B, H)}: reduce-SCATTER (sum, "
                                   "then keep this rank's rows), not all-reduce")
            grad, grad_exp = got["grads"][0], expected["grads"][0]
            if grad is None:
                raise GradingError(f"{where}: no gradient reached x — backward must return (grad_x, None)")
            own = res["own_rows"]
            if grad.shape == own.shape and torch.allclose(grad, own) and not torch.allclose(grad, grad_exp):
                raise GradingError(f"{where}: ∂L/∂x is only this rank's rows of its *own* ∂L/∂X (a "
                                   "split) — every rank used the whole gathered X in its own TP branch, "
                                   "so the rows must be summed over ranks: reduce-scatter")
            assert_close(f"{where}, backward: gradient of x (reduce-scatter along dim 0: the sum over "
                         "ranks of each rank's ∂L/∂X, this rank's rows)", grad, grad_exp)
    return passed("Exercise 05.1: all-gather forward / reduce-scatter backward match the package on "
                  "tp=2, tp=4 and two TP groups of 2")


@grader
def grade_sequence_parallel_row_linear(candidate: Callable, timeout: float = TIMEOUT) -> str:
    """05.2: Y_r (s/tp, b, out) = my rows of Σ_q x_q·W_qᵀ + b, its gradients, and one reduce-scatter."""
    refuse_reference("Exercise 05.2", candidate, package_sequence_parallel_row_linear)
    import torch._dynamo  # noqa: F401 — CommCounter (a TorchDispatchMode) pulls it in on first use:
    # import it once here, so that the forked ranks inherit it instead of each importing it (seconds)
    names = ["x", "weight", "bias"]
    hints = {"x": "∂L/∂x = all-gather(∂L/∂Y_r) · weight: the reduce-scatter's backward all-gathers",
             "weight": "∂L/∂W_r = all-gather(∂L/∂Y_r)ᵀ · x_r",
             "bias": "the bias is added once, after the reduce-scatter, to each rank's rows: its "
                     "gradient is the sum of ∂L/∂Y over all rows, of every rank (f sums them)"}
    for world, tp in LAYOUTS:
        results = run_graded(_case, world, "Exercise 05.2", tp, candidate,
                             package_sequence_parallel_row_linear, _row_inputs, timeout=timeout)
        for rank, res in enumerate(results):
            got, expected = res["got"], res["expected"]
            where = f"Exercise 05.2 (world {world}, tp={tp}), rank {rank}"
            _check_common(where, got, expected, tp, world)
            out, exp = got["output"], expected["output"]
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (S, B, OUT):
                raise GradingError(f"{where}: output shape {tuple(out.shape)}, expected {tuple(exp.shape)}"
                                   " — under sequence parallelism each rank keeps only its s/tp rows of Y:"
                                   " reduce-scatter along dim 0 instead of all-reduce")
            if isinstance(out, torch.Tensor) and out.shape == exp.shape and out.dtype == exp.dtype:
                extra = out - exp
                if extra.abs().max() > 1e-3 and torch.allclose(extra, extra[:1, :1].expand_as(extra),
                                                               atol=1e-4):
                    raise GradingError(f"{where}: the output is off by a constant per feature — the bias "
                                       f"went in before the reduce-scatter and was summed {tp} times; "
                                       "add it once, after")
            assert_close(f"{where}, forward output Y_r = rows of reduce_scatter(x·Wᵀ) + b", out, exp,
                         rtol=1e-5, atol=1e-5)
            ops, want = got["forward_ops"], expected["forward_ops"]
            if ops != want:
                moved = ", ".join(f"{n}× {op} ({b:,} B)" for op, (n, b) in ops.items()) or "nothing"
                raise GradingError(f"{where}: the values are right, but the forward ran {moved}; "
                                   f"expected exactly {want['reduce_scatter'][0]} reduce_scatter of "
                                   f"{want['reduce_scatter'][1]:,} B — an all-reduce then a split moves "
                                   "twice the bytes of one reduce-scatter")
            if not got["connected"]:
                raise GradingError(f"{where}: the output is not connected to the autograd graph — a raw "
                                   "dist.reduce_scatter has no backward: use "
                                   "reduce_scatter_to_sequence_parallel_region (or your own Function)")
            if "backward_error" in got:
                raise GradingError(f"{where}: autograd rejected the backward — {got['backward_error']}")
            for name, g_got, g_exp in zip(names, got["grads"], expected["grads"]):
                if g_got is None and name != "bias" and got["grads"][2] is not None:
                    raise GradingError(f"{where}: no gradient reached {name}, only the bias's — the "
                                       "reduce-scatter is not in the autograd graph (a raw dist collective into "
                                       "a new tensor has no backward): use reduce_scatter_to_sequence_parallel_"
                                       "region, or your own Function whose backward all-gathers")
                if g_got is None:
                    raise GradingError(f"{where}: no gradient reached {name} — is it part of the "
                                       "computation, without .detach() or torch.no_grad()?")
                if name == "bias" and _partial_over_the_tp_group(results, rank, tp):
                    raise GradingError(f"{where}: the bias gradient is only this rank's partial sum over "
                                       "its s/tp rows (the TP group's partials add up to the right one) — "
                                       "every rank adds the whole bias to its own rows: pass it through f "
                                       "(copy_to_tensor_model_parallel_region), whose backward all-reduces "
                                       "∂L/∂b over TP")
                assert_close(f"{where}, backward: gradient of {name} ({hints[name]})", g_got, g_exp,
                             rtol=1e-5, atol=1e-5)
    return passed("Exercise 05.2: the sequence-parallel row layer matches RowParallelLinear on tp=2, "
                  "tp=4 and two TP groups of 2 — outputs, gradients and one reduce-scatter")
