"""ZeRO stage 3 (minimegatron.data_parallel.zero3) on 2 and 4 gloo ranks, every rank its own micro-batch:
step for step equal to AdamW on the whole batch, DeepSpeed's ZeRO-3 engine and torch FSDP2
(``fully_shard`` per layer + root); the full weights alive only inside their unit; memory and
communication = the formulas; a stale shard is caught."""
import pytest
import torch

from minimegatron import launch
from minimegatron.measure.zero import deepspeed_optimizer_state_bytes, zero_comm, zero_fp32_bytes
from tests.data_parallel.zero_cases import (ADAMW, STEPS, TOL, build, deepspeed_run, flat, mean_loss,
                                            my_batch, reference)

pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")


def _unit_modules(model):
    """The units as the test sees them: embedding, each layer, final norm, the untied head."""
    mods = [("embedding", model.embedding)] + [(f"layers.{i}", m) for i, m in enumerate(model.layers)]
    mods.append(("final_norm", model.final_norm))
    if not model.config.tie_embeddings:
        mods.append(("lm_head", model.lm_head))
    return mods


def _alive(model) -> int:
    """Bytes of full parameters alive now, read off the parameters' own storages (each once)."""
    seen = {}
    for p in model.parameters():
        s = p.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _ours(name: str) -> dict:
    from minimegatron.data_parallel.zero3 import Zero3AdamW
    from minimegatron.measure import CommCounter
    from minimegatron.measure.zero import zero_state_bytes

    model = build(name)
    units = _unit_modules(model)
    sizes = [sum(p.numel() for p in m.parameters()) for _, m in units]
    opt = Zero3AdamW(model, **ADAMW)
    trace = []  # (where, bytes of full weights alive)
    for unit, module in units + ([("head", model.lm_head)] if model.config.tie_embeddings else []):
        module.register_forward_hook(lambda m, a, o, u=unit: trace.append((f"in {u}", _alive(model))),
                                     prepend=True)  # before Zero3AdamW's own hook frees the unit
        module.register_forward_hook(lambda m, a, o, u=unit: trace.append((f"after {u}", _alive(model))))
    for p in model.parameters():  # after Zero3AdamW's hook: the unit may just have been reduced
        p.register_post_accumulate_grad_hook(lambda p: trace.append(("backward", _alive(model))))
    out = {"params": [], "losses": [], "sizes": sizes, "flat_numels": opt.flat_numels()}
    for step in range(STEPS):
        ids = my_batch(step)
        trace.clear()
        with CommCounter() as comm:
            loss = model(ids, labels=ids)
            loss.backward()
            if step == STEPS - 1:
                out["memory"] = zero_state_bytes(model, opt)
                out["full_grads"] = sum(p.grad is not None for p in model.parameters())
            opt.step()
        opt.zero_grad()
        out["comm"], out["trace"] = comm.totals(), list(trace)
        out["losses"].append(mean_loss(loss))
        with opt.gathered_parameters():
            out["params"].append(flat(model.parameters()))
    out["after_gathered"] = _alive(model)
    return out


def _fsdp2(name: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from minimegatron.compat import fsdp2_gloo_sums_gradients
    from minimegatron.training.engine import param_groups

    dp = torch.distributed.get_world_size()
    scale = 1 / dp if fsdp2_gloo_sums_gradients() else 1.0  # torch < 2.8: gloo sums for AVG
    model = build(name)
    mesh = init_device_mesh("cpu", (dp,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embedding, final norm, head (the tie stays in one group)
    opt = torch.optim.AdamW(param_groups(model, ADAMW["weight_decay"]), **ADAMW)
    out = {"params": [], "losses": []}
    for step in range(STEPS):
        ids = my_batch(step)
        loss = model(ids, labels=ids)
        (loss * scale).backward()
        opt.step()
        opt.zero_grad()
        out["losses"].append(mean_loss(loss))
        out["params"].append(flat(p.full_tensor() for p in model.parameters()))
    return out


def _stale_shard() -> str:
    from minimegatron.data_parallel.zero3 import Zero3AdamW

    class ForgetsTheWriteBack(Zero3AdamW):
        def write_back(self, u) -> None:
            pass  # the bug: the master moves, the shard the next forward gathers does not

    model = build("llama")
    opt = ForgetsTheWriteBack(model, **ADAMW)
    for step in range(2):
        ids = my_batch(step)
        model(ids, labels=ids).backward()
        try:
            opt.step()
        except RuntimeError as e:
            return f"step {step + 1}: {e}"
        opt.zero_grad()
    return "not caught"


def _case():
    out = {name: {"ours": _ours(name), "deepspeed": deepspeed_run(name, 3), "fsdp2": _fsdp2(name)}
           for name in ("gpt", "llama")}
    out["groups"] = {name: [[p.numel() for p in g] for g in _groups(name)] for name in ("gpt", "llama")}
    out["stale"] = _stale_shard()
    return out


def _groups(name):
    from minimegatron.training.engine import param_groups

    return [g["params"] for g in param_groups(build(name), ADAMW["weight_decay"])]


@pytest.mark.parametrize("dp", [2, 4])
def test_zero3_matches_adamw_deepspeed_and_fsdp2_with_the_formulas(dp):
    results = launch(_case, dp, timeout=240)
    for name in ("gpt", "llama"):
        ref, tied = reference(name, dp), name == "gpt"
        for engine in ("ours", "deepspeed", "fsdp2"):
            for rank, res in enumerate(results):
                run, where = res[name][engine], f"{name} {engine} ZeRO-3 dp={dp} rank {rank}"
                for step in range(STEPS):
                    after = f"{where}, parameters after step {step + 1}"
                    torch.testing.assert_close(run["params"][step], ref["params"][step], **TOL,
                                               msg=lambda m, w=after: f"{w}: {m}")
                assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5), where
        for res in results:  # DeepSpeed's ZeRO-3 optimizer state: each parameter padded to dp, a master copy
            expected = deepspeed_optimizer_state_bytes(res["groups"][name], dp, 3)
            assert res[name]["deepspeed"]["optimizer"] == expected
        for rank, res in enumerate(results):
            run, where = res[name]["ours"], f"{name} ours dp={dp} rank {rank}"
            sizes = run["sizes"]
            assert run["flat_numels"] == sizes, where  # the units the test expects
            assert any(n % (2 * dp) for n in sizes)   # the padding is exercised
            padded = {u: -(-n // (2 * dp)) * 2 * dp * 4 for u, n in zip(
                ["embedding"] + [f"layers.{i}" for i in range(len(sizes) - 2 - (not tied))]
                + ["final_norm"] + ([] if tied else ["lm_head"]), sizes)}
            padded["head"] = padded["embedding"]  # the tied head computes with the embedding unit
            # forward: each unit's full weights exist inside its forward only, and nothing else does
            forward = [(w, b) for w, b in run["trace"] if w != "backward"]
            assert forward == [x for u in padded if u != "head" or tied
                               for x in ((f"in {u}", padded[u]), (f"after {u}", 0))], where
            backward = [b for w, b in run["trace"] if w == "backward"]
            biggest = sorted(padded[u] for u in padded if u not in ("embedding", "head"))[-2:]
            bound = sum(biggest) + padded["embedding"]  # a unit, the one before it (+ the tied table)
            assert max(backward) <= bound < sum(padded.values()) and backward[-1] == 0, where
            assert run["full_grads"] == 0 and run["after_gathered"] == 0, where
            assert run["memory"] == zero_fp32_bytes(sizes, dp, 3), where
            gathers = [2 if tied else 1] + [1] * (len(sizes) - 1)  # the tied table: embedding + head
            assert run["comm"] == zero_comm(sizes, dp, 3, forward_gathers=gathers), where
            three_psi = sum((g + 2) * p for g, p in zip(gathers, [padded[u] for u in padded if u != "head"]))
            assert sum(t.bytes for t in run["comm"].values()) == three_psi, where
        assert results[0]["stale"].startswith("step 2:") and "stale" in results[0]["stale"]


def test_zero3_refuses_recompute_and_partial_units():
    def bad():
        from minimegatron.data_parallel.zero3 import Unit, Zero3AdamW

        errors = []
        model = build("llama")
        model.recompute = "full"
        partial = [Unit("embedding", (model.embedding,), list(model.embedding.parameters()))]
        for kwargs in ({}, {"units": partial}):
            try:
                Zero3AdamW(model, **kwargs)
            except ValueError as e:
                errors.append(str(e))
            model.recompute = "none"
        return errors

    errors = launch(bad, 1, timeout=60)[0]
    assert "recompute='none'" in errors[0] and "exactly one unit" in errors[1]
