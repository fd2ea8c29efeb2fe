"""Training with context parallelism on real gloo ranks: the same losses as one rank.

cp = 2 alone (ring and all-to-all), with TP + SP, with a pipeline, with data parallelism + ZeRO-1:
the per-step losses (the mean over whole sequences) equal the single-rank run's to fp32 round-off.
Bad CP layouts fail in the parent, before any rank starts.
"""
import pytest
import torch

pytest.importorskip("deepspeed")
from minimegatron.train import main  # noqa: E402
from minimegatron.training import TrainConfig, validate  # noqa: E402
from tests.training.runs import Runs  # noqa: E402
from minimegatron.training.data import SyntheticDataset, micro_batches  # noqa: E402

TINY = dict(steps=3, num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128, seq_len=16,
            micro_batch_size=2, global_batch_size=4, lr=3e-3, warmup_steps=1, clip_grad=0.0,
            progress=False)
ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")  # imported once, before any fork


run = Runs(TINY)


@pytest.fixture(scope="module")
def reference():
    return lambda model: run.once(model=model).loss


@pytest.mark.parametrize("model,layout", [
    ("llama", dict(cp=2)),
    ("gpt", dict(cp=2, cp_comm="a2a")),
    ("llama", dict(cp=2, tp=2, sequence_parallel=True)),
    ("gpt", dict(cp=2, pp=2)),
    ("llama", dict(cp=2, dp=2, zero_stage=1, cp_comm="a2a", num_kv_heads=2)),
], ids=["llama-cp2", "gpt-cp2-a2a", "llama-cp2-tp2-sp", "gpt-cp2-pp2", "llama-gqa-cp2-dp2-zero1-a2a"])
def test_context_parallel_layouts_give_the_same_losses(reference, model, layout):
    history = run(model=model, **layout)
    expected = reference(model) if "num_kv_heads" not in layout else run(model=model, num_kv_heads=2).loss
    torch.testing.assert_close(history.loss, expected, rtol=0, atol=ATOL)


def test_each_cp_rank_reads_its_zigzag_piece_of_the_same_sequences():
    data = SyntheticDataset(vocab_size=50, seq_len=8, num_samples=16, seed=3)
    cfg = TrainConfig(**{**TINY, "seq_len": 8, "cp": 2})
    whole = micro_batches(data, 0, TrainConfig(**{**TINY, "seq_len": 8}), 0)[0][0]  # (b, 8)
    pieces = [micro_batches(data, 0, cfg, 0, cp_rank=r)[0][0] for r in range(2)]
    torch.testing.assert_close(pieces[0], whole[:, [0, 1, 6, 7]])  # chunks 0 and 3
    torch.testing.assert_close(pieces[1], whole[:, [2, 3, 4, 5]])  # chunks 1 and 2


@pytest.mark.parametrize("overrides,message", [
    (dict(cp=2, seq_len=18), "multiple of 4"),
    (dict(cp=4, seq_len=20), "multiple of 8"),
    (dict(cp=2, tp=4, sequence_parallel=True, seq_len=12), "multiple of 8"),
    (dict(cp=8, cp_comm="a2a"), "choose cp dividing num_attention_heads/tp"),
    (dict(cp=2, dropout=0.1), "context parallelism with dropout"),
    (dict(cp=2, cp_comm="ring"), "cp_comm='ring'"),
    (dict(cp=0), "cp must be a positive int"),
])
def test_bad_context_parallel_layouts_fail_before_spawning(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(**{**TINY, **overrides}))


def test_cli_trains_with_cp(tmp_path, capsys):
    main(["--model", "llama", "--cp", "2", "--cp-comm", "p2p", "--steps", "2", "--num-layers", "1",
          "--hidden-size", "32", "--num-attention-heads", "4", "--vocab-size", "64", "--seq-len", "16",
          "--global-batch-size", "2", "--micro-batch-size", "1", "--no-progress",
          "--out-dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "train_log.jsonl").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["--cp", "3", "--seq-len", "16"])
    assert exit_info.value.code == 2
    assert "multiple of 6" in capsys.readouterr().err
