"""Exercise 07: ZeRO stage 1 — the optimizer state partitioned over the data-parallel ranks.

07.1  zero1_partition(numel, dp, dp_rank, alignment=2) -> (start, stop): which slice of the flat
      parameter vector does data-parallel rank ``dp_rank`` own (keep Adam's state for, and update)?
      DeepSpeed's rule: pad the flat vector with zeros to a multiple of ``alignment · dp`` elements,
      cut it into ``dp`` equal, contiguous slices; rank r owns the r-th. ``stop`` may run past ``numel``
      into the padding. Graded for many sizes against DeepSpeed's rule (which the notebook checks on
      a real ZeRO-1 engine).

07.2  Zero1AdamW.step() — one AdamW step the ZeRO-1 way. ``__init__`` (given) flattens the
      parameters, pads them to ``self.padded`` elements and keeps only this rank's slice
      ``[self.start, self.stop)``: the fp32 master ``self.master`` and Adam's ``self.exp_avg``,
      ``self.exp_avg_sq`` (1/dp of the full state each). Every rank has just run backward on its own
      micro-batch, so every ``p.grad`` is this replica's local gradient. The contract:

        * afterwards every rank's parameters equal what ``torch.optim.AdamW`` (same hyper-parameters,
          step count ``t = self.step_count``) gives on one model trained on the *whole* batch — the
          mean of the replicas' gradients;
        * this rank updates, and keeps state for, its slice only: nothing of size ``padded`` may stay
          on the optimizer besides what ``__init__`` made;
        * per step, per rank, it moves no more than one all-reduce of the gradients would (2·padded
          elements, counted by the grader): which two collectives add up to an all-reduce, and which
          one belongs before the update and which after? (``reduce_scatter_tensor`` and
          ``all_gather_into_tensor`` are imported below.)

      Graded on 2 and 4 real ranks, each with a different micro-batch, against torch.optim.AdamW
      on one model and the whole batch: the parameters after every step, and this rank's exp_avg
      against the matching slice of the full one. The grader builds Zero1AdamW with the reference
      partition, so 07.2 does not depend on 07.1.

Grade with:  grade_zero1_partition(zero1_partition)    grade_zero1_adamw(Zero1AdamW)
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist  # noqa: F401  (you may need it)
from torch import nn

from exercises import _ex07_checks as C
from exercises.battery import refuse_reference
from exercises.grading import (GradingError, assert_close, call_candidate, grader, kind_of, passed, run_graded,
                               run_isolated)
from exercises.watch import Collectives
from minimegatron.collectives import all_gather_into_tensor, reduce_scatter_tensor  # noqa: F401
from minimegatron.mpu.state import ParallelState, initialize_model_parallel


def zero1_partition(numel: int, dp: int, dp_rank: int, alignment: int = 2) -> tuple[int, int]:
    """Your code (07.1): [start, stop) of rank ``dp_rank``'s slice of the padded flat vector."""
    raise NotImplementedError("Exercise 07.1: pad numel up to a multiple of alignment·dp, cut it into dp "
                              "equal slices, return (start, stop) of slice dp_rank")


class Zero1AdamW:
    """AdamW whose state (fp32 master, m, v) lives on the data-parallel ranks in 1/dp slices."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, state: ParallelState,
                 partition: Callable[[int, int, int], tuple[int, int]] | None = None) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay, self.state = lr, betas, eps, weight_decay, state
        self.numel = sum(p.numel() for p in self.params)
        self.start, self.stop = (partition or zero1_partition)(self.numel, state.dp, state.dp_rank)
        self.padded = (self.stop - self.start) * state.dp
        flat = torch.zeros(self.padded, dtype=torch.float32)  # (padded,)
        flat[:self.numel] = torch.cat([p.detach().reshape(-1).float() for p in self.params])
        self.master = flat[self.start:self.stop].clone()       # (padded/dp,) this rank's fp32 master
        self.exp_avg = torch.zeros_like(self.master)           # (padded/dp,) Adam's m, this slice only
        self.exp_avg_sq = torch.zeros_like(self.master)        # (padded/dp,) Adam's v, this slice only
        self.step_count = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Your code (07.2): one AdamW step that keeps, and updates, this rank's slice only."""
        self.step_count += 1
        raise NotImplementedError("Exercise 07.2: implement the ZeRO-1 step (the contract is in the module "
                                  "docstring)")


# --- grading -----------------------------------------------------------------------------------------

PARTITION_TIMEOUT = 10.0  # s: ~1,500 small calls in one process
ADAMW_TIMEOUT = 15.0  # s per world size: 3 steps of a 63-parameter model

def reference_zero1_partition(numel: int, dp: int, dp_rank: int, alignment: int = 2) -> tuple[int, int]:
    """DeepSpeed's ZeRO-1/2 partition (``flatten_dense_tensors_aligned`` to ``alignment · dp``, then
    ``get_data_parallel_partitions``: equal contiguous slices)."""
    padded = -(-numel // (alignment * dp)) * alignment * dp
    size = padded // dp
    return dp_rank * size, (dp_rank + 1) * size


class ReferenceZero1AdamW(Zero1AdamW):
    """The reference step (what the grader compares against, with torch.optim.AdamW)."""

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        st, dp, t = self.state, self.state.dp, self.step_count
        grad = torch.zeros(self.padded, dtype=torch.float32)  # (padded,)
        grad[:self.numel] = torch.cat([p.grad.reshape(-1).float() for p in self.params])
        g = torch.empty_like(self.master)                      # (padded/dp,)
        if dp > 1:
            reduce_scatter_tensor(g, grad, group=st.dp_group)
            g /= dp
        else:
            g.copy_(grad)
        (b1, b2), lr = self.betas, self.lr
        self.master.mul_(1 - lr * self.weight_decay)
        self.exp_avg.mul_(b1).add_(g, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.exp_avg_sq / (1 - b2 ** t)).sqrt_().add_(self.eps)
        self.master.addcdiv_(self.exp_avg, denom, value=-lr / (1 - b1 ** t))
        flat = torch.empty(self.padded, dtype=torch.float32)   # (padded,)
        if dp > 1:
            all_gather_into_tensor(flat, self.master, group=st.dp_group)
        else:
            flat.copy_(self.master)
        offset = 0
        for p in self.params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


@grader
def grade_zero1_partition(candidate: Callable[..., tuple[int, int]],
                          timeout: float = PARTITION_TIMEOUT) -> str:
    """07.1 for numel in 1..103 and a GPT-sized count, dp in 1, 2, 3, 4, 8, every rank.

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    refuse_reference("Exercise 07.1", candidate, reference_zero1_partition)
    return run_isolated(_grade_zero1_partition, candidate, timeout=timeout, role="zero1_partition")


def _as_pair(where: str, got) -> tuple[int, int]:
    problem = f"{where}: expected a pair (start, stop) of ints, got {kind_of(got)}"
    if got is None or isinstance(got, (str, bytes, dict)):
        raise GradingError(problem)
    try:
        start, stop = got
        if isinstance(start, (str, bytes)) or isinstance(stop, (str, bytes)) or \
                int(start) != start or int(stop) != stop:
            raise ValueError
        return int(start), int(stop)
    except Exception:  # noqa: BLE001 - not a pair, or not of integers
        raise GradingError(problem) from None


def _grade_zero1_partition(candidate: Callable) -> str:
    got, wrong = {}, []  # every case first: a mistake is named by the pattern of all the wrong answers
    for numel in list(range(1, 104)) + [169_472]:
        for dp in (1, 2, 3, 4, 8):
            for r in range(dp):
                where = f"Exercise 07.1 (numel={numel}, dp={dp}, rank {r})"
                got[numel, dp, r] = _as_pair(where, call_candidate(where, candidate, numel, dp, r,
                                                                   exercise="Exercise 07.1"))
                if got[numel, dp, r] != reference_zero1_partition(numel, dp, r):
                    wrong.append((numel, dp, r))
    if not wrong:
        return passed("Exercise 07.1: your slices are DeepSpeed's ZeRO-1 partition for every size and dp")
    numel, dp, r = wrong[0]
    where = f"Exercise 07.1 (numel={numel}, dp={dp}, rank {r})"
    (start, stop), (e_start, e_stop) = got[wrong[0]], reference_zero1_partition(numel, dp, r)
    for i, (_, message) in enumerate(C.partition_mistakes(numel, dp, r)):
        if all(got[key] == C.partition_mistakes(*key)[i][0] for key in wrong):
            raise GradingError(f"{where}: got ({start}, {stop}), expected ({e_start}, {e_stop}) — {message}")
    padded = e_stop * dp // (r + 1)
    if stop - start != e_stop - e_start:
        raise GradingError(f"{where}: your slice has {stop - start} elements; DeepSpeed pads {numel} up to "
                           f"{padded} (a multiple of alignment·dp = {2 * dp}) and gives every rank {padded // dp}")
    raise GradingError(f"{where}: got ({start}, {stop}), expected ({e_start}, {e_stop}): slice r starts at "
                       f"r·{padded // dp}")


D_IN, D_HID, D_OUT, LOCAL_B, STEPS = 5, 7, 3, 4, 3   # 63 parameters: not a multiple of 2·dp
ADAM = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def _batch(step: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(dp * LOCAL_B, D_IN, generator=g), torch.randn(dp * LOCAL_B, D_OUT, generator=g)


def _zero1_case(candidate_cls: type) -> dict:
    state = initialize_model_parallel(1, 1)  # every rank a data-parallel replica
    dp, r = state.dp, state.dp_rank
    model, ref = _model(), _model()
    opt = candidate_cls(model.parameters(), **ADAM, state=state, partition=reference_zero1_partition)
    ref_opt = torch.optim.AdamW(ref.parameters(), **ADAM)
    out = {"params": [], "expected": [], "exp_avg": None, "expected_exp_avg": None}
    log = Collectives()
    for step in range(STEPS):
        x, y = _batch(step, dp)
        mine = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
        opt.zero_grad()
        ((model(x[mine]) - y[mine]) ** 2).mean().backward()   # this replica's micro-batch only
        with log.watching(candidate_cls):
            opt.step()
        ref_opt.zero_grad()
        ((ref(x) - y) ** 2).mean().backward()                # one model, the whole batch
        ref_opt.step()
        out["params"].append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        out["expected"].append(torch.cat([p.detach().reshape(-1) for p in ref.parameters()]))
    full_m = torch.zeros(opt.padded)
    full_m[:opt.numel] = torch.cat([ref_opt.state[p]["exp_avg"].reshape(-1) for p in ref.parameters()])
    out["expected_exp_avg"] = full_m[opt.start:opt.stop]
    out["exp_avg"] = opt.exp_avg.detach().clone() if isinstance(opt.exp_avg, torch.Tensor) else opt.exp_avg
    out["calls"] = log.summary(state.dp_group)
    if r == 0:  # the usual wrong AdamWs on the whole batch, for the parent to name
        out["variants"] = C.adam_variants(_model, [_batch(s, dp) for s in range(STEPS)], ADAM, STEPS)
    return out


@grader
def grade_zero1_adamw(candidate_cls: type, timeout: float = ADAMW_TIMEOUT) -> str:
    """07.2 on 2 and 4 ranks against torch.optim.AdamW on the whole batch, for 3 steps."""
    import torch._dynamo  # noqa: F401  (AdamW's first step imports it: once here, not in every rank)

    refuse_reference("Exercise 07.2", candidate_cls, ReferenceZero1AdamW)
    for dp in (2, 4):
        results = run_graded(_zero1_case, dp, candidate_cls, timeout=timeout)
        if "all_reduce" in results[0]["calls"]["names"]:
            raise GradingError(f"Exercise 07.2 (dp={dp}): your step all-reduces: every rank then receives (and "
                               "holds) the whole gradient — ZeRO-1 reduce-SCATTERS it, each rank keeping only the "
                               "1/dp slice it updates (reduce_scatter_tensor, then all_gather_into_tensor)")
        for step in range(STEPS):
            params = [res["params"][step] for res in results]
            where = f"Exercise 07.2 (dp={dp}, after step {step + 1})"
            if any(not torch.equal(params[0], q) for q in params[1:]):
                raise GradingError(f"{where}: the ranks hold different weights — each rank updated only its "
                                   "slice: all-gather the updated master slices and copy them into every "
                                   "parameter")
            if not torch.allclose(params[0], results[0]["expected"][step], rtol=1e-5, atol=1e-6):
                for variant, trajectory in results[0]["variants"].items():
                    if torch.allclose(params[0], trajectory[step], rtol=1e-5, atol=1e-6):
                        raise GradingError(f"{where}: {C.ADAM_MESSAGES[variant]}")
            assert_close(f"{where}, parameters (vs torch.optim.AdamW on the whole batch)", params[0],
                         results[0]["expected"][step], rtol=1e-5, atol=1e-6)
        for r, res in enumerate(results):
            got, expected = res["exp_avg"], res["expected_exp_avg"]
            where = f"Exercise 07.2 (dp={dp}, rank {r})"
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and \
                    torch.allclose(got, dp * expected, rtol=1e-4, atol=1e-7):
                raise GradingError(f"{where}: exp_avg is {dp}× Adam's — the reduce-scatter sums the "
                                   f"replicas' gradients: divide by dp = {dp} for the mean")
            assert_close(f"{where}, exp_avg: Adam's m for this rank's slice [{r}/{dp}] only", got, expected,
                         rtol=1e-5, atol=1e-7)
    return passed("Exercise 07.2: ZeRO-1 AdamW on 2 and 4 ranks equals AdamW on the whole batch, "
                  "with 1/dp of the state per rank")
