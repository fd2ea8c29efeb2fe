"""The trainer at ZeRO stages 2 and 3 (DeepSpeed's engines, pp = 1) on real gloo ranks.

The reference is the single-rank run (ZeRO-0, fp32): sharding gradients (stage 2) and weights
(stage 3) over the dp replicas changes where the numbers live, not which numbers: the per-step
losses, learning rates, gradient norms (before clipping) and evaluation losses agree to fp32
round-off, for GPT (its head multiplies by the embedding table outside the embedding's module:
ZeRO-3 must gather it there too), LLaMA, TP + SP, CP, recompute. Clipping is active at every step
(clip_grad = 0.05 < ‖g‖), so a norm counted wrongly over TP or DP changes the losses.

Checkpoints: a run saved at ZeRO-3 (its weights gathered from 1/dp pieces, its Adam state from
``DeepSpeedZeroOptimizer_Stage3``'s flat partitions) resumes at ZeRO-3, ZeRO-1 or TP2 with the losses
of the run that never stopped, and one saved at ZeRO-2 resumes at ZeRO-3; the plain model loaded from
the ZeRO-3 checkpoint reproduces the loss the run reported for the next batch. bf16 at stage 3:
finite, learning, and resumable.
"""
import math

import pytest
import torch

pytest.importorskip("deepspeed")
from minimegatron.checkpoint import load_model  # noqa: E402
from minimegatron.launch import launch  # noqa: E402
from minimegatron.training import TrainConfig, train_on_rank  # noqa: E402
from tests.training.runs import Runs  # noqa: E402
from minimegatron.training.data import SyntheticDataset  # noqa: E402

TINY = dict(steps=4, num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128, seq_len=16,
            micro_batch_size=2, global_batch_size=8, lr=3e-3, warmup_steps=2, clip_grad=0.05,
            progress=False)
SAME = 1e-6   # same layout: the same arithmetic
ATOL = 2e-5   # another layout: fp32 round-off, as in tests/test_train.py

pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")  # imported once, before any fork


run = Runs(TINY, require_clipping=True)  # every reference step is clipped


@pytest.fixture(scope="module")
def reference():
    """The single-rank run per model, evaluating every 2 steps."""
    return lambda model: run.once(model=model, eval_interval=2, eval_iters=1)


@pytest.mark.parametrize("model,layout", [
    ("gpt", dict(dp=2, zero_stage=2)),
    ("gpt", dict(dp=2, zero_stage=3)),                                        # the tied head
    ("llama", dict(dp=2, zero_stage=3, recompute="full")),                    # re-gathered in backward
    ("gpt", dict(tp=2, dp=2, sequence_parallel=True, zero_stage=3)),          # ‖g‖ over TP × DP
    ("llama", dict(tp=2, dp=2, sequence_parallel=True, zero_stage=2, num_kv_heads=2)),
    ("llama", dict(cp=2, dp=2, zero_stage=3)),                                # DP pieces over dp·cp
], ids=["gpt-dp2-zero2", "gpt-dp2-zero3", "llama-dp2-zero3-full", "gpt-tp2-dp2-sp-zero3",
        "llama-gqa-tp2-dp2-sp-zero2", "llama-cp2-dp2-zero3"])
def test_zero_stages_give_the_single_rank_run(reference, model, layout):
    history = run(model=model, eval_interval=2, eval_iters=1, **layout)
    expected = reference(model) if "num_kv_heads" not in layout else run(
        model=model, num_kv_heads=2, eval_interval=2, eval_iters=1)
    torch.testing.assert_close(history.loss, expected.loss, rtol=0, atol=ATOL)
    torch.testing.assert_close(history.lr, expected.lr, rtol=0, atol=0)  # the schedule, step by step
    torch.testing.assert_close(history.grad_norm, expected.grad_norm, rtol=1e-5, atol=0)
    assert history.eval_step == expected.eval_step == [1, 3]
    torch.testing.assert_close(history.eval_loss, expected.eval_loss, rtol=0, atol=ATOL)


def test_zero3_partitions_every_parameter_and_zero2_the_gradients():
    """What the engines hold on each of dp = 2 replicas: ZeRO-3 an empty Parameter and a piece of
    ⌈n/2⌉ elements per weight (the tied table too); ZeRO-2 whole weights and an fp32 partition of
    half the parameters."""
    def body(stage):
        seen = {}

        def on_start(engine, model):
            seen["optimizer"] = type(engine.optimizer).__name__
            params = dict(model.named_parameters())
            if stage == 3:
                seen["pieces"] = {n: (p.numel(), p.ds_tensor.numel(), p.ds_numel) for n, p in params.items()}
            else:
                seen["whole"] = all(p.numel() > 0 for p in params.values())
                seen["mine"] = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
                seen["total"] = sum(p.numel() for p in params.values())
        train_on_rank(TrainConfig(**{**TINY, "steps": 1, "dp": 2, "zero_stage": stage, "model": "gpt"}),
                      on_start=on_start)
        return seen

    for seen in launch(body, 2, 3, timeout=120):
        assert seen["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        assert "embedding.word_embeddings.weight" in seen["pieces"]
        for name, (here, piece, whole) in seen["pieces"].items():
            assert here == 0 and piece == math.ceil(whole / 2), name
    for seen in launch(body, 2, 2, timeout=120):
        assert seen["optimizer"] == "DeepSpeedZeroOptimizer" and seen["whole"]
        assert abs(seen["mine"] - seen["total"] / 2) <= 2 * 64  # up to alignment padding


# ---- checkpoints ------------------------------------------------------------------------------------
SAVED = {"gpt-dp2-zero3": dict(model="gpt", dp=2, zero_stage=3),
         "llama-dp2-zero2": dict(model="llama", dp=2, zero_stage=2),
         "llama-dp2-zero3-bf16": dict(model="llama", dp=2, zero_stage=3, dtype="bf16")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per layout: the uninterrupted 4-step run, which saved after steps 2 and 4, and its directory."""
    out = {}
    for name, layout in SAVED.items():
        directory = str(tmp_path_factory.mktemp(name))
        out[name] = run(save=directory, save_interval=2, **layout), directory
    return out


@pytest.mark.parametrize("name,layout,atol", [
    ("gpt-dp2-zero3", dict(dp=2, zero_stage=3), SAME),                   # ZeRO-3 -> ZeRO-3, exactly
    ("gpt-dp2-zero3", dict(dp=2, zero_stage=1), ATOL),                   # -> ZeRO-1 partitions
    ("gpt-dp2-zero3", dict(tp=2), ATOL),                                 # -> TP shards, no ZeRO
    ("llama-dp2-zero2", dict(tp=2, dp=2, zero_stage=3), ATOL),           # ZeRO-2 -> ZeRO-3 pieces
    ("llama-dp2-zero3-bf16", dict(dp=2, zero_stage=3, dtype="bf16"), SAME),  # bf16: its fp32 master
], ids=["zero3-to-zero3", "zero3-to-zero1", "zero3-to-tp2", "zero2-to-tp2-zero3", "bf16-zero3-to-zero3"])
def test_resume_gives_the_uninterrupted_losses(saved, name, layout, atol):
    full, directory = saved[name]
    resumed = run(load=directory, load_step=2, model=SAVED[name]["model"], **layout)
    assert resumed.step == [2, 3]
    torch.testing.assert_close(resumed.loss, full.loss[2:], rtol=0, atol=atol)
    torch.testing.assert_close(resumed.lr, full.lr[2:], rtol=0, atol=0)
    torch.testing.assert_close(resumed.grad_norm, full.grad_norm[2:], rtol=1e-4 if atol > SAME else 1e-6,
                               atol=0)


def test_zero3_checkpoint_holds_the_whole_weights(saved):
    """The plain model loaded from the ZeRO-3 checkpoint of step 2 gives the loss the run reported for
    step 2's batch: the weights were gathered whole, not 1/dp of them."""
    full, directory = saved["gpt-dp2-zero3"]
    cfg = TrainConfig(**TINY)
    data = SyntheticDataset(cfg.vocab_size, cfg.seq_len, cfg.steps * cfg.global_batch_size, cfg.seed)
    items = [data[i] for i in range(2 * cfg.global_batch_size, 3 * cfg.global_batch_size)]
    tokens, labels = (torch.stack([it[k] for it in items]) for k in ("tokens", "labels"))
    model = load_model(directory, step=2).eval()
    assert model.embedding.word_embeddings.weight.shape == (128, 32)
    with torch.no_grad():
        torch.testing.assert_close(float(model(tokens, labels)), full.loss[2], rtol=0, atol=ATOL)


def test_bf16_zero3_trains(saved):
    history, _ = saved["llama-dp2-zero3-bf16"]
    assert all(math.isfinite(x) for x in history.loss)
    longer = run(model="llama", dp=2, zero_stage=3, dtype="bf16", steps=6, lr=1e-2, clip_grad=1.0)
    assert all(math.isfinite(x) for x in longer.loss)
    assert longer.loss[-1] < longer.loss[0] - 0.05  # as tests/test_train.py's bf16 run
