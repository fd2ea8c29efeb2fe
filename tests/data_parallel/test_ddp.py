"""Naive, bucketed and overlapped DDP against torch's DistributedDataParallel, DeepSpeed ZeRO-0 and one
process on the whole batch: gradients, losses over AdamW steps, messages and bytes, no_sync, errors."""
import contextlib
import math

import pytest
import torch
from torch import nn

from minimegatron import launch
from minimegatron.gpt import GPTModel
from minimegatron.llama import LLaMAModel
from minimegatron.measure import CommCounter, ring_wire_bytes
from tests.layers.hf_reference import VOCAB, tiny_gpt, tiny_llama

pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")

STEPS, MICRO, SEQ = 3, 2, 16                    # 3 AdamW steps, 2 sequences per rank per step
BUCKET_MB = 0.05                                # tiny GPT/LLaMA: ~10 buckets
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CONFIGS = {"gpt": tiny_gpt(), "llama": tiny_llama(num_kv_heads=2)}
OURS = ("naive", "bucketed", "overlapped")
TOL = dict(rtol=1e-5, atol=1e-6)


def _model(kind, state=None):
    return (GPTModel if kind == "gpt" else LLaMAModel)(CONFIGS[kind], state, init_seed=3)


def _batches(world, accumulate=1):
    """STEPS global batches of world·accumulate·MICRO sequences: rank r's micro-batches are its rows."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (world * accumulate * MICRO, SEQ + 1), generator=g) for _ in range(STEPS)]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _reference(kind, world):
    """One process, the whole batch: losses over STEPS AdamW steps and the first step's gradients."""
    model = _model(kind)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses, grads = [], None
    for batch in _batches(world):
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        grads = grads or _grads(model)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


def _wrap(variant, model, group):
    from minimegatron.data_parallel.ddp import BucketedDDP, NaiveDDP, OverlappedDDP
    if variant == "naive":
        return NaiveDDP(model, group)
    return (BucketedDDP if variant == "bucketed" else OverlappedDDP)(model, group, bucket_size_mb=BUCKET_MB)


def _train(variant, kind, state, group, rank_in_dp, world):
    """STEPS steps of one data-parallel variant on this rank's micro-batches."""
    import torch.distributed as dist

    model = _model(kind, state)
    if rank_in_dp != 0:  # the wrapper must broadcast the first rank's weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    if variant == "torch_ddp":
        ddp = nn.parallel.DistributedDataParallel(model, process_group=group)
    elif variant == "deepspeed":
        import deepspeed

        from minimegatron.deepspeed_glue import init_deepspeed_comm, quiet_deepspeed
        quiet_deepspeed()
        init_deepspeed_comm()
        config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
                  "steps_per_print": 10**9, "wall_clock_breakdown": False}
        ddp, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), **ADAMW),
                                       config=config)
    else:
        ddp = _wrap(variant, model, group)
    opt = None if variant == "deepspeed" else torch.optim.AdamW(model.parameters(), **ADAMW)
    out = {"losses": [], "weights0": [p.detach().clone() for p in model.parameters()]}
    for step, batch in enumerate(_batches(world)):
        mine = batch[rank_in_dp * MICRO:(rank_in_dp + 1) * MICRO]
        with CommCounter() as comm:
            loss = ddp(mine[:, :-1], mine[:, 1:])
            if variant == "deepspeed":
                ddp.backward(loss)
            else:
                loss.backward()
                if variant in OURS:
                    ddp.finish_grad_sync()
        if step == 0:
            out["grads"] = _grads(model)
            dp_ranks = tuple(dist.get_process_group_ranks(group))  # leave out TP's collectives
            out["messages"] = [(r.op, r.numel, r.bytes, r.wire_bytes, r.group_size) for r in comm.records
                               if r.ranks == dp_ranks and r.op != "barrier"]
        if variant == "deepspeed":
            ddp.step()
        else:
            opt.step()
            ddp.zero_grad() if variant in OURS else opt.zero_grad()
        out["losses"].append(loss.item())
    if variant in ("bucketed", "overlapped"):
        out["buckets"] = [[p.numel() for p in b.params] for b in ddp.buckets.buckets]
    out["tensors"] = [p.numel() for p in dict.fromkeys(model.parameters())]
    dist.barrier()
    return out


def _accumulate(variant, kind, world):
    """Two micro-batches per rank, the first inside no_sync(): the gradient of the whole batch."""
    import torch.distributed as dist

    rank, model = dist.get_rank(), _model(kind)
    ddp = _wrap(variant, model, None)
    batch = _batches(world, accumulate=2)[0]
    with CommCounter() as comm:
        for m in range(2):
            rows = batch[(2 * rank + m) * MICRO:(2 * rank + m + 1) * MICRO]
            with contextlib.nullcontext() if m == 1 else ddp.no_sync():
                (ddp(rows[:, :-1], rows[:, 1:]) / 2).backward()  # loss / M: the mean over 2 micro-batches
                ddp.finish_grad_sync()                          # a no-op inside no_sync
            if m == 0:
                silent = len(comm.select("all_reduce"))
    return {"grads": _grads(model), "silent": silent}


def _errors(kind):
    """An unused parameter and a second backward before finish_grad_sync: one clear line each."""
    messages = {}
    for variant in OURS:
        holder = nn.Module()
        holder.model, holder.unused = _model(kind), nn.Linear(3, 3)
        ddp = _wrap(variant, holder, None)
        ids = torch.randint(0, VOCAB, (MICRO, SEQ))
        holder.model(ids, ids).backward()
        try:
            ddp.finish_grad_sync()
        except RuntimeError as e:
            messages[variant] = str(e)
    ddp = _wrap("overlapped", _model(kind), None)
    ddp(ids, ids).backward()
    try:
        ddp(ids, ids).backward()
    except RuntimeError as e:
        messages["twice"] = str(e)
    ddp._wait()
    return messages


def _world(world, tp=1, kinds=("gpt", "llama"), variants=OURS + ("torch_ddp", "deepspeed")):
    import torch.distributed as dist

    from minimegatron.mpu import initialize_model_parallel
    state = initialize_model_parallel(tp)
    out = {}
    for kind in kinds:
        for variant in variants:
            out[kind, variant] = _train(variant, kind, state, state.dp_group, state.dp_rank, state.dp)
        if tp == 1 and world == 2:
            for variant in OURS:
                out[kind, variant, "accumulate"] = _accumulate(variant, kind, world)
    if tp == 1 and world == 2:
        out["errors"] = _errors("gpt")
    out["dp_ranks"] = state.dp_ranks
    dist.barrier()
    return out


def _expected_messages(sizes, n):
    return [("all_reduce", s, 4 * s, ring_wire_bytes("all_reduce", s, 4, n), n) for s in sizes]


def _check_messages(run, variant, n):
    sizes = run["tensors"] if variant == "naive" else [sum(b) for b in run["buckets"]]
    assert run["messages"] == _expected_messages(sizes, n)  # one per tensor / bucket, in bucket order
    psi = sum(run["tensors"])
    assert sum(m[2] for m in run["messages"]) == 4 * psi                                # Ψ·e
    wire = sum(m[3] for m in run["messages"])
    assert wire == sum(2 * (n - 1) * math.ceil(s / n) * 4 for s in sizes)              # the ring formula
    assert wire >= 2 * (n - 1) / n * psi * 4                                           # ≈ 2(N−1)/N·Ψ·e


@pytest.fixture(scope="module")
def world2():
    return launch(_world, 2, 2, timeout=240)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_every_variant_equals_torch_ddp_deepspeed_zero0_and_the_whole_batch(world2, kind):
    losses, grads = _reference(kind, 2)
    initial = [p.detach() for p in _model(kind).parameters()]
    for rank, result in enumerate(world2):
        torch_ddp, zero0 = result[kind, "torch_ddp"], result[kind, "deepspeed"]
        for variant in OURS + ("torch_ddp", "deepspeed"):
            run = result[kind, variant]
            for w, w0 in zip(run["weights0"], initial):
                if rank == 0:  # (the other rank's were perturbed; the wrapper broadcast rank 0's)
                    torch.testing.assert_close(w, w0, rtol=0, atol=0)
            for name, g in grads.items():
                torch.testing.assert_close(run["grads"][name], g, **TOL, msg=f"{variant} {name}")
                torch.testing.assert_close(run["grads"][name], torch_ddp["grads"][name], **TOL)
                torch.testing.assert_close(run["grads"][name], zero0["grads"][name], **TOL)
            torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(torch_ddp["losses"]), **TOL)
            torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(zero0["losses"]), **TOL)
        for variant in OURS:
            _check_messages(result[kind, variant], variant, 2)
        assert len(result[kind, "bucketed"]["buckets"]) > 3  # the bucket size really splits the model
    # the replicas' mean loss is the whole batch's loss, step for step
    mean = [sum(r[kind, "overlapped"]["losses"][s] for r in world2) / 2 for s in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_no_sync_accumulation_equals_the_whole_batch(world2, kind):
    model = _model(kind)
    batch = _batches(2, accumulate=2)[0]
    model(batch[:, :-1], batch[:, 1:]).backward()
    for result in world2:
        for variant in OURS:
            acc = result[kind, variant, "accumulate"]
            assert acc["silent"] == 0  # nothing moved inside no_sync
            for name, p in model.named_parameters():
                torch.testing.assert_close(acc["grads"][name], p.grad, **TOL, msg=f"{variant} {name}")


def test_unused_parameter_and_double_backward_are_one_clear_line(world2):
    for result in world2:
        errors = result["errors"]
        for variant in OURS:
            assert "'unused.weight'" in errors[variant] and "requires_grad_(False)" in errors[variant]
            assert "\n" not in errors[variant]
        assert "arrived twice" in errors["twice"] and "no_sync()" in errors["twice"]


def test_tp2_dp2_group_trains_at_the_whole_batch_losses():
    """World 4 = TP 2 × DP 2: each wrapper averages over ``state.dp_group`` only (ranks {0,2}, {1,3})."""
    losses, _ = _reference("gpt", 2)
    results = launch(_world, 4, 4, tp=2, kinds=("gpt",), variants=OURS + ("torch_ddp",), timeout=240)
    assert sorted(r["dp_ranks"] for r in results) == [[0, 2], [0, 2], [1, 3], [1, 3]]
    for variant in OURS + ("torch_ddp",):
        replicas = [results[i] for i in results[0]["dp_ranks"]]  # TP rank 0 of each replica
        mean = [sum(r["gpt", variant]["losses"][s] for r in replicas) / 2 for s in range(STEPS)]
        torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=1e-5, atol=1e-5,
                                   msg=variant)
    for result in results:
        for variant in OURS:
            _check_messages(result["gpt", variant], variant, 2)


def test_bad_wrapping_is_one_clear_error():
    from minimegatron.data_parallel.ddp import NaiveDDP, OverlappedDDP
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        NaiveDDP(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="wraps a torch.nn.Module"):
        OverlappedDDP(lambda x: x)
