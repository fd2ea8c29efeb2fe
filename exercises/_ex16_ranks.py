"""Exercise 16's grader, on each rank: the student's class on this rank's micro-batch, beside the
independent reference — one model on the whole batch (its gradient; torch.optim.AdamW) — with every
collective and hook call recorded (``_ex16_mistakes.CommLog``). Each case returns a dict of tensors and
records that the parent compares (``ex16_data_parallel.grade_*``). Data parallel only: tp = pp = 1."""
from __future__ import annotations

from typing import Any

import torch

from exercises import _ex16_mistakes as M
from minimegatron.mpu.state import initialize_model_parallel

DDP_STEPS = 2


def _setup() -> tuple[Any, int, int, slice]:
    state = initialize_model_parallel(1, 1)  # every rank a data-parallel replica
    r = state.dp_rank
    return state, state.dp, r, slice(r * M.LOCAL_B, (r + 1) * M.LOCAL_B)


def _kept(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def ddp_case(candidate_cls: type) -> dict:
    """16.1: gradients after finish_grad_sync vs the whole batch's, and every all-reduce."""
    state, dp, _, mine = _setup()
    model, ref = M.tiny_model(), M.tiny_model()
    buckets = M.reverse_buckets(model)
    ddp = candidate_cls(model, buckets, state.dp_group)
    seen = [0] * len(buckets)  # hook calls per bucket this step: how full the bucket is
    index = {sum(p.numel() for p in b): i for i, b in enumerate(buckets)}  # the buckets' sizes differ

    def note(numel: int) -> dict:
        i = index.get(numel)
        return dict(bucket=None, ready=0, full=0) if i is None else \
            dict(bucket=i, ready=seen[i], full=len(buckets[i]))

    rec = M.CommLog(state.dp_group, note)
    bucket_of, hook = {p: i for i, b in enumerate(buckets) for p in b}, ddp.on_grad_ready

    def counted(param: torch.nn.Parameter) -> None:
        seen[bucket_of[param]] += 1
        hook(param)

    ddp.on_grad_ready = counted  # the scaffold's hooks look it up at every call
    out: dict = {"grads": [], "expected": []}
    with rec.patched(candidate_cls):
        for step in range(DDP_STEPS):
            x, y = M.batch(step, dp)
            rec.step, seen[:] = step, [0] * len(buckets)
            ddp.zero_grad()
            rec.phase = "backward"
            M.loss_fn(model(x[mine]), y[mine]).backward()
            rec.phase = "sync"
            ddp.finish_grad_sync()
            rec.phase = "after"
            out["grads"].append([_kept(p.grad) for p in model.parameters()])
            ref.zero_grad()
            M.loss_fn(ref(x), y).backward()  # one model, the whole batch
            out["expected"].append([p.grad.clone() for p in ref.parameters()])
    out["calls"] = rec.calls
    return out


def zero2_case(candidate_cls: type) -> dict:
    """16.2: weights and this rank's exp_avg after each step vs AdamW on the whole batch; collectives;
    which full gradients are still alive after backward."""
    state, dp, r, mine = _setup()
    model, ref = M.tiny_model(), M.tiny_model()
    opt = candidate_cls(M.reverse_buckets(model), **M.ADAM, group=state.dp_group)
    ref_opt = torch.optim.AdamW(ref.parameters(), **M.ADAM)
    names = {p: n for n, p in model.named_parameters()}
    rec = M.CommLog(state.dp_group)
    out: dict = {k: [] for k in ("params", "expected", "exp_avg", "expected_exp_avg", "alive")}
    with rec.patched(candidate_cls):
        for step in range(M.STEPS):
            x, y = M.batch(step, dp)
            rec.step = step
            opt.zero_grad()
            rec.phase = "backward"
            M.loss_fn(model(x[mine]), y[mine]).backward()
            out["alive"].append([names[p] for p in model.parameters() if p.grad is not None])
            rec.phase = "step"
            opt.step()
            rec.phase = "after"
            ref_opt.zero_grad()
            M.loss_fn(ref(x), y).backward()
            ref_opt.step()
            out["params"].append(M.flat(list(model.parameters())))
            out["expected"].append(M.flat(list(ref.parameters())))
            out["exp_avg"].append(_kept(opt.exp_avg))
            slices = []
            for bucket in M.reverse_buckets(ref):
                size = M.padded(sum(p.numel() for p in bucket), dp)
                m = M.flat([ref_opt.state[p]["exp_avg"] for p in bucket], size)
                slices.append(m[r * size // dp:(r + 1) * size // dp])
            out["expected_exp_avg"].append(torch.cat(slices))
    out["calls"] = rec.calls
    return out


def zero3_case(candidate_cls: type) -> dict:
    """16.3: the weights each forward used and this rank's shards after each step vs AdamW on the whole
    batch; the units whose full parameters were alive at each gather."""
    state, dp, r, mine = _setup()
    model = candidate_cls(M.tiny_model(), **M.ADAM, group=state.dp_group)
    ref = M.tiny_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), **M.ADAM)
    ref_units = [m for m in ref if list(m.parameters())]
    rec = M.CommLog(state.dp_group)  # here only the phase and step the checks name
    record: dict = {"alive": [], "used": [[] for _ in range(M.STEPS)]}
    M.watch_zero3(model, rec, record)
    out: dict = {"shards": [], "expected": [], "used_expected": []}
    for step in range(M.STEPS):
        x, y = M.batch(step, dp)
        rec.step = step
        out["used_expected"].append([M.flat(list(m.parameters())) for m in ref_units])
        model.zero_grad()
        rec.phase = "forward"
        loss = M.loss_fn(model(x[mine]), y[mine])
        rec.phase = "backward"
        loss.backward()
        rec.phase = "step"
        model.step()
        ref_opt.zero_grad()
        M.loss_fn(ref(x), y).backward()
        ref_opt.step()
        out["shards"].append([_kept(u.shard) for u in model.units])
        out["expected"].append([M.flat(list(m.parameters()), u.padded).chunk(dp)[r]
                                for m, u in zip(ref_units, model.units)])
    out["record"] = record
    return out
