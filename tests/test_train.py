"""The training loop on real gloo ranks: every layout trains the same model to the same losses.

The reference is the run on one rank (tp = pp = dp = 1, fp32, no dropout). Tensor, pipeline and data
parallelism, ZeRO-1, sequence parallelism and activation recomputation change where the numbers are
computed, not which numbers: the per-step losses agree to fp32 round-off. Bad layouts fail in the
parent process, before any rank starts.
"""
import json
import math
import os
import re

import pytest
import torch

pytest.importorskip("deepspeed")
from minimegatron.compat import load_deepspeed_checkpoint  # noqa: E402
from minimegatron.launch import launch  # noqa: E402
from minimegatron.train import main  # noqa: E402
from minimegatron.training import TrainConfig, train, train_on_rank, validate  # noqa: E402
from tests.training.runs import Runs  # noqa: E402
from minimegatron.training.data import SyntheticDataset, micro_batches  # noqa: E402
from minimegatron.training.schedule import lr_at  # noqa: E402

TINY = dict(steps=4, num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128, seq_len=16,
            micro_batch_size=2, global_batch_size=8, lr=3e-3, warmup_steps=2, clip_grad=0.0,
            progress=False)
ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")  # imported once, before any fork


run = Runs(TINY)


@pytest.fixture(scope="module")
def reference():
    """Single-rank losses per (model, clip_grad)."""
    return lambda model, clip_grad=0.0: run.once(model=model, clip_grad=clip_grad).loss


@pytest.mark.parametrize("layout", [
    dict(pp=2),
    dict(tp=2, pp=2),
    dict(dp=2, zero_stage=1),
    # ZeRO-2 reduces gradients inside backward: the SP norms' and row biases' f must already have summed
    dict(tp=2, dp=2, sequence_parallel=True, zero_stage=2),
], ids=["pp2", "tp2-pp2", "dp2-zero1", "tp2-dp2-sp-zero2"])
def test_gpt_layouts_give_the_same_losses(reference, layout):
    history = run(model="gpt", **layout)
    torch.testing.assert_close(history.loss, reference("gpt"), rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", [
    dict(tp=2, pp=2, sequence_parallel=True),
    dict(pp=2, dp=2, zero_stage=1),
    dict(tp=2, sequence_parallel=True, recompute="selective"),
    dict(pp=2, recompute="full"),
], ids=["tp2-pp2-sp", "pp2-dp2-zero1", "tp2-sp-selective", "pp2-full"])
def test_llama_layouts_give_the_same_losses(reference, layout):
    history = run(model="llama", **layout)
    torch.testing.assert_close(history.loss, reference("llama"), rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", [dict(pp=2), dict(pp=2, zero_stage=1)], ids=["zero0", "zero1"])
def test_gradient_clipping_is_layout_independent(reference, layout):
    """clip_grad = 0.05 is active every step: the global norm over all stages must be right."""
    history = run(model="gpt", clip_grad=0.05, **layout)
    torch.testing.assert_close(history.loss, reference("gpt", 0.05), rtol=0, atol=ATOL)
    assert reference("gpt", 0.05) != reference("gpt")
    assert all(n > 0.05 for n in history.grad_norm)  # the norm before clipping, reported


def test_zero1_shards_the_optimizer_state():
    """ZeRO-1 over dp = 2: each replica's fp32 master partition holds half of the parameters."""
    def body():
        seen = {}

        def on_step(engine, step, history):
            seen["optimizer"] = type(engine.optimizer).__name__
            seen["mine"] = sum(p.numel() for p in engine.optimizer.single_partition_of_fp32_groups)
            seen["total"] = sum(p.numel() for p in engine.module.parameters())
        cfg = TrainConfig(**{**TINY, "steps": 1, "dp": 2, "zero_stage": 1, "model": "llama"})
        train_on_rank(cfg, on_step=on_step)
        return seen

    for seen in launch(body, 2, timeout=120):
        assert seen["optimizer"] == "DeepSpeedZeroOptimizer"
        assert abs(seen["mine"] - seen["total"] / 2) <= 2 * 64  # up to alignment padding


def test_bf16_trains():
    history = run(model="llama", pp=2, dp=2, zero_stage=1, dtype="bf16", steps=6, lr=1e-2)
    assert all(math.isfinite(x) for x in history.loss)
    assert history.loss[-1] < history.loss[0] - 0.05


def test_cli_writes_log_and_curve_and_learns(tmp_path):
    out = tmp_path / "run"
    history = main(["--model", "gpt", "--tp", "2", "--steps", "16", "--num-layers", "2",
                    "--hidden-size", "32", "--num-attention-heads", "4", "--vocab-size", "64",
                    "--seq-len", "16", "--lr", "1e-2", "--warmup-steps", "3", "--eval-interval", "8",
                    "--eval-iters", "1", "--no-progress", "--out-dir", str(out)])
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(16))
    assert [r["step"] for r in records if "eval_loss" in r] == [7, 15]
    assert os.path.getsize(out / "loss.png") > 1000
    assert json.loads((out / "config.json").read_text())["deepspeed"]["zero_optimization"] == {"stage": 0}
    assert history.loss[-1] < history.loss[0] - 0.3  # the synthetic language is learnable
    assert history.eval_loss[-1] < history.eval_loss[0]
    assert history.lr[0] == pytest.approx(1e-2 / 3) and history.lr[2] == pytest.approx(1e-2)


@pytest.mark.parametrize("overrides,message", [
    (dict(global_batch_size=10, micro_batch_size=2, dp=2), "not divisible by micro_batch_size·dp"),
    (dict(num_layers=2, pp=4), "num_layers=2 < pp=4"),
    (dict(zero_stage=2, pp=2), "supports only ZeRO stage 0 or 1"),
    (dict(zero_stage=3, pp=2), "supports only ZeRO stage 0 or 1"),
    (dict(zero_stage=4), "ZeRO has stages 0"),
    (dict(num_attention_heads=4, tp=8, hidden_size=64), "not divisible by tensor-parallel size 8"),
    (dict(tp=2, sequence_parallel=True, seq_len=15), "must be a multiple of 2"),
    (dict(recompute="some"), "recompute='some'"),
    (dict(dtype="fp16"), "dtype='fp16'"),
    (dict(model="bert"), "model='bert'"),
    (dict(data="/nonexistent/prefix"), "build one with python -m minimegatron.data.preprocess"),
])
def test_bad_configurations_fail_before_spawning(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(**{**TINY, **overrides}))
    with pytest.raises(ValueError, match=message):  # train() itself: no rank is ever started
        train(TrainConfig(**{**TINY, **overrides}), timeout=0.001)


def test_world_size_must_match_the_launcher(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="WORLD_SIZE=8 ranks but tp·cp·pp·dp"):
        validate(TrainConfig(**{**TINY, "tp": 2, "pp": 2}))


def test_cli_reports_bad_layouts_without_traceback(capsys):
    """Bad input: status 2 (argparse's), one line naming the problem (tests/training/test_cli_errors.py
    checks every other case)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--pp", "4", "--num-layers", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == ("python -m minimegatron.train: error: num_layers=2 < pp=4: every pipeline stage needs at "
                   "least one transformer layer; use more layers or fewer stages\n")


def test_cli_reports_a_timeout_with_the_ranks_stacks(tmp_path, capsys):
    """--timeout is one deadline for the whole run: past it, one line with the flag to raise; the
    ranks' stacks go to --out-dir/timeout_stacks.txt (stderr stays one line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "50", "--num-layers", "2", "--hidden-size", "32", "--vocab-size", "64",
              "--seq-len", "16", "--no-progress", "--out-dir", str(tmp_path), "--timeout", "0.01"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"python -m minimegatron.train: error: the run did not finish within --timeout 0.01 s; "
                        r"raise --timeout \(or look for a hang\): ranks \[0\] were killed; where each one "
                        r"was: .*timeout_stacks.txt\n", err), err
    stacks = (tmp_path / "timeout_stacks.txt").read_text()
    assert "did not finish within --timeout 0.01 s" in stacks and "--- rank 0 was here ---" in stacks


def test_learning_rate_schedule():
    lrs = [lr_at(t, 1.0, 0.1, 4, 20) for t in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, first step already moves
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # cosine decay
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_at(12, 1.0, 0.1, 4, 20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_each_replica_reads_its_share_of_the_global_batch():
    data = SyntheticDataset(vocab_size=50, seq_len=8, num_samples=64, seed=3)
    cfg = TrainConfig(**{**TINY, "dp": 2, "micro_batch_size": 2, "global_batch_size": 8})
    shares = [torch.cat([t for t, _ in micro_batches(data, 8, cfg, d)]) for d in range(2)]
    whole = torch.stack([data[i]["tokens"] for i in range(8, 16)])
    torch.testing.assert_close(torch.cat(shares), whole)  # replicas 0 and 1: samples 8-11, 12-15
    item = data[5]
    torch.testing.assert_close(item["tokens"][1:], item["labels"][:-1])  # labels = tokens shifted
    assert all(int(y) in data.successors[int(x)] for x, y in zip(item["tokens"], item["labels"]))
    torch.testing.assert_close(data[5]["tokens"], SyntheticDataset(50, 8, 64, seed=3)[5]["tokens"])


def test_trains_on_an_indexed_dataset(tmp_path):
    """--data PREFIX: Megatron .bin/.idx samples; the same losses with pp = 2 as on one rank."""
    import numpy as np

    from minimegatron.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "corpus")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for _ in range(40):
            builder.add_document(rng.integers(0, 128, rng.integers(20, 60)))
    cfg = dict(model="llama", data=prefix, split="80,20,0", eval_interval=2, eval_iters=1, steps=3)
    one, two = run(**cfg), run(pp=2, **cfg)
    torch.testing.assert_close(two.loss, one.loss, rtol=0, atol=ATOL)
    torch.testing.assert_close(two.eval_loss, one.eval_loss, rtol=0, atol=ATOL)
    assert one.best_possible_loss is None and len(one.eval_loss) == 2


def test_hooks_save_and_resume_with_deepspeed_checkpoints(tmp_path):
    """on_step saves a DeepSpeed checkpoint after step 1; on_start loads it in a new run, which
    continues at step 2 with the same losses as the uninterrupted run (pp = 2, ZeRO-1, dp = 2)."""
    layout = dict(model="gpt", pp=2, dp=2, zero_stage=1, clip_grad=1.0)
    ckpt = str(tmp_path / "ckpt")

    def save(engine, step, history):
        if step == 1:
            engine.save_checkpoint(ckpt, tag="step1")

    def load(engine, model):
        load_deepspeed_checkpoint(engine, ckpt, tag="step1")  # engine.load_checkpoint, any version

    full = train(TrainConfig(**{**TINY, **layout}), on_step=save)
    resumed = train(TrainConfig(**{**TINY, **layout}), on_start=load)
    assert resumed.step == [2, 3]
    torch.testing.assert_close(resumed.loss, full.loss[2:], rtol=0, atol=ATOL)
    torch.testing.assert_close(resumed.lr, full.lr[2:])


def test_trains_on_a_torch_dataset():
    """Any map-style Dataset of {"tokens", "labels"} works; tp = 2 gives the one-rank losses."""
    data = SyntheticDataset(vocab_size=128, seq_len=16, num_samples=16, seed=5)  # read twice over
    valid = SyntheticDataset(vocab_size=128, seq_len=16, num_samples=8, seed=5, offset=10**6)
    cfg = dict(model="gpt", data=data, valid_data=valid, eval_interval=4, eval_iters=1)
    one, two = run(**cfg), run(tp=2, **cfg)
    torch.testing.assert_close(two.loss, one.loss, rtol=0, atol=ATOL)
    assert one.config["data"] == "SyntheticDataset" and len(one.eval_loss) == 1
    with pytest.raises(ValueError, match="needs valid_data"):
        run(model="gpt", data=data, eval_interval=2)
