"""ZeRO stages 1 and 2 (minimegatron.data_parallel.zero) on 2 and 4 gloo ranks, every rank its own
micro-batch: step for step equal to AdamW on the whole batch and to DeepSpeed's ZeRO-1/2 engines;
memory per rank and communication per step equal to the formulas exactly."""
import pytest
import torch

from minimegatron import launch
from minimegatron.measure.memory import storage_bytes
from minimegatron.measure.zero import deepspeed_optimizer_state_bytes, zero_comm, zero_fp32_bytes
from tests.data_parallel.zero_cases import (ADAMW, STEPS, TOL, build, deepspeed_run, flat, mean_loss,
                                            my_batch, reference)

pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")
BUCKET = 400  # elements: stage 2 runs with several buckets per group


def _ours(name: str, stage: int) -> dict:
    from minimegatron.data_parallel.zero import ZeroAdamW
    from minimegatron.measure import CommCounter
    from minimegatron.measure.zero import zero_state_bytes
    from minimegatron.training.engine import param_groups

    model = build(name)
    opt = ZeroAdamW(param_groups(model, ADAMW["weight_decay"]), **ADAMW, stage=stage,
                    reduce_bucket_size=BUCKET if stage == 2 else 500_000_000)
    out = {"params": [], "losses": [], "flat_numels": opt.flat_numels()}
    for step in range(STEPS):
        ids = my_batch(step)
        with CommCounter() as comm:
            loss = model(ids, labels=ids)
            loss.backward()
            if step == STEPS - 1:  # after backward, before the step: what the formula counts
                out["memory"] = zero_state_bytes(model, opt)
                out["full_grads"] = storage_bytes(p.grad for p in model.parameters())
            opt.step()
        opt.zero_grad()
        out["comm"] = comm.totals()
        out["losses"].append(mean_loss(loss))
        out["params"].append(flat(model.parameters()))
    out["shard_exp_avg"] = [s.exp_avg.clone() for s in opt.shards]
    return out


def _case():
    """Every check's raw results on this rank, for both models (one launch per world size)."""
    out = {}
    for name in ("gpt", "llama"):
        for stage in (1, 2):
            out[name, "ours", stage] = _ours(name, stage)
            out[name, "deepspeed", stage] = deepspeed_run(name, stage)
        out[name, "groups"] = [[p.numel() for p in g["params"]] for g in _groups(name)]
        out[name, "numel"] = sum(p.numel() for p in build(name).parameters())
    return out


def _groups(name):
    from minimegatron.training.engine import param_groups

    return param_groups(build(name), ADAMW["weight_decay"])


@pytest.mark.parametrize("dp", [2, 4])
def test_zero1_and_zero2_match_adamw_and_deepspeed_with_the_formulas(dp):
    results = launch(_case, dp, timeout=240)
    for name in ("gpt", "llama"):
        ref = reference(name, dp)
        groups, numel = results[0][name, "groups"], results[0][name, "numel"]
        for stage in (1, 2):
            for engine in ("ours", "deepspeed"):
                for rank, res in enumerate(results):
                    run, where = res[name, engine, stage], f"{name} {engine} ZeRO-{stage} dp={dp} rank {rank}"
                    for step in range(STEPS):  # every replica holds the whole-batch AdamW weights
                        after = f"{where}, parameters after step {step + 1}"
                        torch.testing.assert_close(run["params"][step], ref["params"][step], **TOL,
                                                   msg=lambda m, w=after: f"{w}: {m}")
                    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5), where
            # DeepSpeed's optimizer state per rank = its partition rule, byte for byte
            for res in results:
                assert res[name, "deepspeed", stage]["optimizer"] == \
                    deepspeed_optimizer_state_bytes(groups, dp, stage)
            ours = [res[name, "ours", stage] for res in results]
            layout = ours[0]["flat_numels"]
            assert sum(layout) == numel
            if stage == 1:  # one flat vector per param group: DeepSpeed's layout exactly
                assert layout == [sum(g) for g in groups]
            else:           # several buckets, each at most BUCKET elements unless one parameter is larger
                assert len(layout) > len(groups)
            assert any(n % (2 * dp) for n in layout)  # the padding is exercised
            for rank, run in enumerate(ours):
                where = f"{name} ZeRO-{stage} dp={dp} rank {rank}"
                assert run["memory"] == zero_fp32_bytes(layout, dp, stage), where
                assert run["full_grads"] == (4 * numel if stage == 1 else 0), where  # stage 2 freed them
                assert run["comm"] == zero_comm(layout, dp, stage), where
                paper = 2 * sum(-(-n // (2 * dp)) * 2 * dp for n in layout) * 4  # 2Ψ (padded), bytes
                assert sum(t.bytes for t in run["comm"].values()) == paper, where
            # rank r's Adam m is slice r of the whole-batch m (flat layout, padded): 1/dp each
            assert [m.numel() for m in ours[0]["shard_exp_avg"]] == \
                   [-(-n // (2 * dp)) * 2 for n in layout]


def test_stage_and_bucket_errors_name_the_fix():
    def bad():
        from minimegatron.data_parallel.zero import ZeroAdamW

        model = torch.nn.Linear(3, 2)
        errors = []
        for kwargs in (dict(stage=3), dict(stage=2, reduce_bucket_size=0)):
            try:
                ZeroAdamW(model.parameters(), **kwargs)
            except ValueError as e:
                errors.append(str(e))
        try:
            ZeroAdamW(model.parameters(), stage=2).step()  # no backward ran
        except RuntimeError as e:
            errors.append(str(e))
        return errors

    errors = launch(bad, 1, timeout=60)[0]
    assert "Zero3AdamW" in errors[0] and "reduce_bucket_size" in errors[1] and "not reduced" in errors[2]
