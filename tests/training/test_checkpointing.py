"""Training checkpoints on real gloo ranks: exact resume, resume at another layout, plain-model and
Hugging Face export, atomic saves, clear errors.

The reference for a resumed run is the run that never stopped: after loading the checkpoint of step 2
it must produce the losses of steps 2 and 3 of the uninterrupted run — bitwise at the same layout,
to fp32 round-off (like every layout change, see tests/test_train.py) at another one. The reference
for the saved weights is independent of the pipeline: the plain model loaded from the checkpoint must
reproduce the loss the training run reported for the next step's batch.
"""
import json
import os
import pickle

import pytest
import torch

pytest.importorskip("deepspeed")
import minimegatron.checkpoint.io as ckpt_io  # noqa: E402
from minimegatron.checkpoint import CheckpointError, load_model, save_checkpoint  # noqa: E402
from minimegatron.launch import RankError, launch  # noqa: E402
from minimegatron.mpu.state import initialize_model_parallel  # noqa: E402
from minimegatron.training import TrainConfig, parse_args, train, validate  # noqa: E402
from tests.training.runs import Runs  # noqa: E402
from minimegatron.training.data import SyntheticDataset  # noqa: E402
from minimegatron.training.checkpointing import OPTIMIZER_NAME, RNG_NAME, TRAINER_NAME  # noqa: E402
from minimegatron.training.optimizer_state import MOMENTS  # noqa: E402

TINY = dict(steps=4, num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128, seq_len=16,
            micro_batch_size=2, global_batch_size=8, lr=3e-3, warmup_steps=2, clip_grad=1.0,
            progress=False)
SAME = 1e-6   # same layout: the same arithmetic
ATOL = 2e-5   # another layout: fp32 round-off, as in tests/test_train.py
LAYOUTS = {"gpt-tp2-pp2": dict(model="gpt", tp=2, pp=2),
           "llama-dp2-zero1": dict(model="llama", dp=2, zero_stage=1),
           "llama-pp2-bf16": dict(model="llama", pp=2, dtype="bf16"),  # fp32 master weights saved too
           "gpt-tp2-dropout": dict(model="gpt", tp=2, dropout=0.1)}    # the RNG states must resume


pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")  # imported once, before any fork


run = Runs(TINY)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per layout: the uninterrupted 4-step run, which saved after steps 2 and 4, and its directory."""
    out = {}
    for name, layout in LAYOUTS.items():
        directory = str(tmp_path_factory.mktemp(name))
        out[name] = run(save=directory, save_interval=2, **layout), directory
    return out


def global_batch(step, cfg=TrainConfig(**TINY)):
    """The sequences training step ``step`` consumed (the same for every layout)."""
    data = SyntheticDataset(cfg.vocab_size, cfg.seq_len, cfg.steps * cfg.global_batch_size, cfg.seed)
    items = [data[i] for i in range(step * cfg.global_batch_size, (step + 1) * cfg.global_batch_size)]
    return torch.stack([it["tokens"] for it in items]), torch.stack([it["labels"] for it in items])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_gives_the_uninterrupted_losses(saved, name, monkeypatch):
    full, directory = saved[name]

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint must load without unpickling anything")
    monkeypatch.setattr(torch, "load", forbidden)  # inherited by the forked ranks
    monkeypatch.setattr(pickle, "load", forbidden)
    resumed = run(load=directory, load_step=2, **LAYOUTS[name])
    assert resumed.step == [2, 3]
    torch.testing.assert_close(resumed.loss, full.loss[2:], rtol=0, atol=SAME)
    torch.testing.assert_close(resumed.lr, full.lr[2:], rtol=0, atol=0)
    torch.testing.assert_close(resumed.grad_norm, full.grad_norm[2:], rtol=0, atol=SAME)


@pytest.mark.parametrize("name,layout", [
    ("gpt-tp2-pp2", dict(dp=2, zero_stage=1)),                    # optimizer state into ZeRO partitions
    ("gpt-tp2-pp2", dict()),                                       # one rank
    ("llama-dp2-zero1", dict(tp=2, pp=2, sequence_parallel=True)),  # out of ZeRO partitions, into stages
    ("llama-dp2-zero1", dict(cp=2, tp=2, zero_stage=1)),          # into context parallelism's dp·cp
], ids=["tp2pp2-to-dp2zero1", "tp2pp2-to-1", "dp2zero1-to-tp2pp2sp", "dp2zero1-to-cp2tp2zero1"])
def test_resume_at_another_layout(saved, name, layout):
    """Weights AND Adam's moments are layout-independent: the resumed losses are the same."""
    full, directory = saved[name]
    resumed = run(load=directory, load_step=2, model=LAYOUTS[name]["model"], **layout)
    assert resumed.step == [2, 3]
    torch.testing.assert_close(resumed.loss, full.loss[2:], rtol=0, atol=ATOL)


def test_checkpoint_is_a_plain_model_and_exports_to_hf(saved, tmp_path):
    """Saved at TP2·PP2: load_model gives a plain GPTModel (TP1 and TP2 alike) whose loss on step 2's
    batch is the loss the pipeline reported for step 2; to_hf gives the same logits."""
    from transformers import GPT2LMHeadModel

    from minimegatron.checkpoint import to_hf
    from minimegatron.gpt import GPTModel

    full, directory = saved["gpt-tp2-pp2"]
    model = load_model(directory, step=2).eval()
    assert type(model) is GPTModel
    tokens, labels = global_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(float(model(tokens, labels)), full.loss[2], rtol=0, atol=ATOL)
        logits = model(tokens)

    def at_tp2():
        tp2 = load_model(directory, state=initialize_model_parallel(2), step=2).eval()
        with torch.no_grad():
            return tp2(tokens)
    for out in launch(at_tp2, 2, timeout=120):
        torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)

    hf = to_hf(model, save_directory=tmp_path / "hf")
    assert isinstance(hf, GPT2LMHeadModel)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(tokens).logits, logits, rtol=1e-5, atol=1e-5)


def test_what_is_on_disk(saved):
    _, directory = saved["gpt-tp2-pp2"]
    path = os.path.join(directory, "iter_0000002")
    assert open(os.path.join(directory, "latest")).read().strip() == "iter_0000004"
    assert sorted(os.listdir(path)) == sorted(["config.json", "metadata.json", "model.safetensors",
                                               OPTIMIZER_NAME, RNG_NAME, TRAINER_NAME])
    assert (OPTIMIZER_NAME, RNG_NAME, TRAINER_NAME) == ("optimizer.safetensors", "rng.safetensors",
                                                        "trainer.json")  # no pickle files
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as fh:
        weights = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    with safe_open(os.path.join(path, "optimizer.safetensors"), "pt") as fh:
        moments = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    with safe_open(os.path.join(path, "rng.safetensors"), "pt") as fh:
        assert {k.split("/")[0] for k in fh.keys()} == {"rank0", "rank1", "rank2", "rank3"}
    assert weights["embedding.word_embeddings.weight"] == (128, 32)  # whole: unpadded, TP gathered
    assert "layers.1.mlp.dense_h_to_4h.weight" in weights  # from the second pipeline stage
    assert moments == {f"{k}/{n}": s for n, s in weights.items() for k in MOMENTS}
    trainer = json.load(open(os.path.join(path, "trainer.json")))
    assert trainer["step"] == 2 and trainer["optimizer_step"] == 2 and trainer["consumed_samples"] == 16
    assert trainer["layout"] == dict(tp=2, pp=2, dp=1, cp=1, zero_stage=0, dtype="fp32", sequence_parallel=False)
    meta = json.load(open(os.path.join(path, "metadata.json")))
    assert meta["model_class"] == "GPTModel" and meta["saved_from"] == dict(tp=2, pp=2, dp=1, cp=1)
    bf16 = os.path.join(saved["llama-pp2-bf16"][1], "iter_0000002")
    with safe_open(os.path.join(bf16, "optimizer.safetensors"), "pt") as fh:
        assert fh.get_tensor("master/final_norm.weight").dtype == torch.float32
    with safe_open(os.path.join(bf16, "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("final_norm.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_interrupted_save_leaves_the_previous_checkpoint(saved, tmp_path, monkeypatch, how):
    """The writer fails (or dies) while writing step 4's optimizer state: ``latest`` still names
    step 2, which resumes exactly; the next save clears the debris, the log keeps each step once."""
    full, _ = saved["llama-dp2-zero1"]
    directory, real = str(tmp_path / "ckpt"), ckpt_io.save_file
    log = dict(out_dir=str(tmp_path / "log"))

    def failing(tensors, filename, metadata=None):
        if "iter_0000004" in filename and filename.endswith("optimizer.safetensors"):
            if how == "kill":
                os._exit(9)  # no cleanup, no exception: the process is just gone
            with open(filename, "wb") as fh:
                fh.write(b"half a file")
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_io, "save_file", failing)  # inherited by the forked ranks
    with pytest.raises(RankError, match="disk full|rank 0 failed to write|died"):
        run(save=directory, save_interval=2, **log, **LAYOUTS["llama-dp2-zero1"])
    monkeypatch.setattr(ckpt_io, "save_file", real)
    assert open(os.path.join(directory, "latest")).read().strip() == "iter_0000002"
    assert sorted(p for p in os.listdir(directory) if not p.startswith(".")) == ["iter_0000002", "latest"]
    debris = [p for p in os.listdir(directory) if p.startswith(".tmp-")]
    assert bool(debris) == (how == "kill")  # an exception cleans up after itself, a kill cannot
    resumed = run(load=directory, save=directory, **log, **LAYOUTS["llama-dp2-zero1"])
    torch.testing.assert_close(resumed.loss, full.loss[2:], rtol=0, atol=SAME)
    records = [json.loads(line) for line in open(tmp_path / "log" / "train_log.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # steps 2-3 of the failed run replaced
    assert not [p for p in os.listdir(directory) if p.startswith(".tmp-")]
    assert open(os.path.join(directory, "latest")).read().strip() == "iter_0000004"


def test_weights_only_checkpoint_starts_a_fresh_run(saved, tmp_path):
    """A plain save_checkpoint directory (no optimizer state) seeds step 0 of a new run."""
    model = load_model(saved["gpt-tp2-pp2"][1]).eval()
    save_checkpoint(model, tmp_path / "plain")
    tokens, labels = global_batch(0)
    with torch.no_grad():
        expected = float(model(tokens, labels))
    history = run(model="gpt", load=str(tmp_path / "plain"), steps=1)
    assert history.step == [0]
    torch.testing.assert_close(history.loss[0], expected, rtol=0, atol=ATOL)


def test_another_model_names_the_mismatch_and_the_fix(saved, tmp_path):
    gpt_dir, llama_dir = saved["gpt-tp2-pp2"][1], saved["llama-dp2-zero1"][1]
    with pytest.raises(CheckpointError, match=r"(?s)hidden_size: 32 in the checkpoint, 64 in this run"
                                              r".*Fix: train with the checkpoint's model \(--hidden-size 32"):
        validate(TrainConfig(**{**TINY, "model": "gpt", "hidden_size": 64, "load": gpt_dir}))
    with pytest.raises(CheckpointError, match=r"(?s)model: LLaMAModel in the checkpoint, GPTModel in this "
                                              r"run.*--model llama"):
        validate(TrainConfig(**{**TINY, "model": "gpt", "load": llama_dir}))
    with pytest.raises(CheckpointError, match="hidden_size: 32 in the checkpoint"):  # before any rank
        train(TrainConfig(**{**TINY, "model": "gpt", "hidden_size": 64, "load": gpt_dir}), timeout=0.001)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 3 .*iter_0000002"):
        validate(TrainConfig(**{**TINY, "model": "gpt", "load": gpt_dir, "load_step": 3}))
    empty = str(tmp_path / "empty")
    validate(TrainConfig(**{**TINY, "load": empty, "save": empty}))  # nothing there yet: from scratch


def test_learned_positions_need_the_checkpoints_seq_len(saved):
    """GPT's position table has max_seq_len rows, so --seq-len must match; LLaMA's RoPE has no table."""
    gpt_dir, llama_dir = saved["gpt-tp2-pp2"][1], saved["llama-dp2-zero1"][1]
    with pytest.raises(CheckpointError, match=r"(?s)max_seq_len: 16 in the checkpoint, 32 in this run"
                                              r".*Fix: train with the checkpoint's model \(--seq-len 16\)"):
        validate(TrainConfig(**{**TINY, "model": "gpt", "seq_len": 32, "steps": 6, "load": gpt_dir}))
    validate(TrainConfig(**{**TINY, "model": "llama", "seq_len": 32, "steps": 6, "load": llama_dir}))


def test_resuming_needs_steps_beyond_the_checkpoint(saved):
    """--steps is the run's total: a checkpoint at step 4 with --steps 4 would train nothing."""
    gpt = {**TINY, "model": "gpt", "load": saved["gpt-tp2-pp2"][1]}
    for steps in (3, 4):
        with pytest.raises(ValueError, match=rf"iter_0000004 is already at step 4 >= --steps {steps}; "
                                             r"--steps is the total, so raise it above 4"):
            validate(TrainConfig(**{**gpt, "steps": steps}))
    validate(TrainConfig(**{**gpt, "steps": 5}))
    validate(TrainConfig(**{**gpt, "steps": 3, "load_step": 2}))  # the step-2 checkpoint: one step left


@pytest.mark.parametrize("overrides,message", [
    (dict(save_interval=2), "needs a directory to save to"),
    (dict(save="x", save_interval=-1), "must be >= 0"),
    (dict(load_step=2), "load_step=2 needs --load DIR"),
])
def test_bad_checkpoint_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(**{**TINY, **overrides}))


def test_command_line_flags():
    cfg = parse_args(["--save", "ck", "--save-interval", "50", "--load", "ck", "--load-step", "100"])
    assert (cfg.save, cfg.save_interval, cfg.load, cfg.load_step) == ("ck", 50, "ck", 100)
    assert (parse_args([]).save, parse_args([]).load) == (None, None)
