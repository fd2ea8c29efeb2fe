"""The demo end to end (``--quick``): table, summary, picture, samples; bad options fail before any work.

Independent references: the closed-form parameter count against a model built here at TP=1, the
first loss against ln(vocab) (an untrained model is near uniform), the samples against greedy decoding
redone here from the saved checkpoint, the unigram entropy against a hand-made token stream.
"""
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")
from minimegatron.config import PORTING_POINTS, gpt_config, llama_config  # noqa: E402
from minimegatron.demo import main  # noqa: E402
from minimegatron.demo.cli import DemoConfig  # noqa: E402
from minimegatron.demo.report import differences  # noqa: E402

MODELS = ("gpt", "llama")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One --quick run: (output directory, what it printed, summary.json)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--quick", "--out", str(out), "--no-progress"])
    return out, printed.getvalue(), json.loads((out / "summary.json").read_text())


def test_output_directory_holds_every_artifact(demo):
    out, _, _ = demo
    for name in ("tokenizer.model", "data.bin", "data.idx", "loss_curves.png", "samples.txt",
                 "summary.json", "gpt/train_log.jsonl", "llama/train_log.jsonl"):
        assert (out / name).is_file(), name
    for model in MODELS:
        assert (out / model / "checkpoint" / "latest").is_file()


def test_table_and_differences_are_printed(demo):
    _, text, _ = demo
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in text
    assert "one tokenizer for every model" in text and "comparable" in text
    for label in ("parameters (closed form)", "parameters (tensors)", "train loss", "valid loss",
                  "tokens/s", "wall time"):
        assert label in text, label
    for i, change in enumerate(PORTING_POINTS.values(), 1):  # "1 norm" ... "6 MLP width"
        assert f"{i} {change}" in text, change
    assert "RMSNorm" in text and "SwiGLU" in text and "RoPE" in text


def test_summary_numbers(demo):
    _, _, summary = demo
    cfg = DemoConfig(quick=True)
    assert summary["same_tokenizer"] is True
    vocab = summary["data"]["gpt"]["vocab_size"]
    assert summary["data"]["llama"]["tokenizer_file"] == summary["data"]["gpt"]["tokenizer_file"]
    presets = {"gpt": gpt_config, "llama": llama_config}
    for model in MODELS:
        r = summary["models"][model]
        config = presets[model](vocab_size=vocab, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                num_attention_heads=cfg.num_attention_heads, max_seq_len=cfg.seq_len)
        from minimegatron.gpt import GPTModel
        from minimegatron.llama import LLaMAModel
        built = (GPTModel if model == "gpt" else LLaMAModel)(config)
        counted = sum(p.numel() for p in built.parameters()) - (
            (1 if config.tie_embeddings else 2) * (config.padded_vocab_size() - vocab) * config.hidden_size)
        assert r["parameters_closed_form"] == r["parameters_tensors"] == counted
        assert r["steps"] == cfg.steps and len(r["history"]["loss"]) == cfg.steps
        assert abs(r["history"]["loss"][0] - math.log(vocab)) < 0.3  # untrained: near uniform
        assert r["history"]["loss"][-1] < r["history"]["loss"][0]
        assert math.isfinite(r["valid_loss"]) and r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert summary["timings_s"][f"train {model}"] == r["wall_s"]
        assert 0 < r["unigram_entropy"] < math.log(vocab)
    assert summary["models"]["llama"]["parameters_tensors"] != summary["models"]["gpt"]["parameters_tensors"]
    assert len(summary["differences"]) == len(PORTING_POINTS)


def test_loss_curve_is_a_valid_png(demo):
    out, _, _ = demo
    import matplotlib.image

    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_samples_are_text_from_the_trained_weights(demo):
    out, text, summary = demo
    from minimegatron.checkpoint import load_model
    from minimegatron.data.tokenizer import SentencePieceTokenizer
    from minimegatron.generate import generate

    samples = summary["samples"]
    prompts = DemoConfig().prompts
    assert len(samples) == len(MODELS) * len(prompts) * 2
    written = (out / "samples.txt").read_text()
    tok = SentencePieceTokenizer(out / "tokenizer.model")
    for s in samples:
        assert isinstance(s["text"], str) and s["text"].startswith(s["prompt"].rstrip())
        assert s["new_tokens"] >= 1
        assert s["text"].splitlines()[0] in written and s["text"].splitlines()[0] in text
    model = load_model(out / "gpt" / "checkpoint")  # redo one greedy sample here
    ids = torch.tensor([[tok.bos_id] + tok.encode("def", bos=False)])
    greedy = next(s for s in samples if s["model"] == "GPT" and s["mode"] == "greedy" and s["prompt"] == "def ")
    again = generate(model, ids, greedy["new_tokens"], eos_token_id=tok.eos_id)
    assert tok.decode(again[0].tolist()) == greedy["text"]


def test_data_step_is_cached(demo, tmp_path):
    out, _, _ = demo
    from minimegatron.demo.cli import open_demo_corpus
    from minimegatron.demo.data import prepare_data

    cfg = DemoConfig(quick=True)
    corpus = open_demo_corpus(cfg)
    assert "without encodings/" in corpus.name
    assert not any("encodings/" in f.as_posix() for f in corpus.files)
    before = (out / "data.bin").stat().st_mtime_ns
    again = prepare_data(out, "tokenizer", corpus, cfg.vocab_size, "llama", cfg.seed, cfg.split)
    assert again.reused and (out / "data.bin").stat().st_mtime_ns == before
    changed = prepare_data(tmp_path, "tokenizer", corpus, cfg.vocab_size + 10, "llama", cfg.seed, cfg.split)
    assert not changed.reused and changed.vocab_size == cfg.vocab_size + 10


def test_unigram_baselines_match_the_formula(tmp_path):
    from minimegatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    from minimegatron.demo.data import unigram_baselines

    train_docs = [[0, 1, 1, 2], [2, 2, 1, 0]]  # counts 0:2 1:3 2:3 of 8
    valid_docs = [[3, 0]]
    with IndexedDatasetBuilder(tmp_path / "toy", np.uint16) as b:
        for d in train_docs + valid_docs:
            b.add_document(d)
    entropy, valid = unigram_baselines(IndexedDataset(tmp_path / "toy"), "2,1,0", vocab_size=4)
    p = np.array([2, 3, 3]) / 8
    assert entropy == pytest.approx(-(p * np.log(p)).sum())
    smoothed = (np.array([2, 3, 3, 0]) + 1) / (8 + 4)
    assert valid == pytest.approx(-(np.log(smoothed[3]) + np.log(smoothed[0])) / 2)


def test_differences_read_off_the_configs():
    rows = differences(gpt_config(hidden_size=96), llama_config(hidden_size=96))
    assert [r[0] for r in rows][0] == "1 norm" and len(rows) == len(PORTING_POINTS)
    assert rows[-1][1].startswith("384") and rows[-1][2].startswith("256")


@pytest.mark.parametrize("argv, message", [
    (["--tp", "3"], "num_attention_heads=4 is not divisible by tensor-parallel size 3"),
    (["--pp", "3"], "num_layers=2 < pp=3"),
    (["--models", "gpt,bert"], "--models"),
    (["--steps", "0"], "steps must be a positive int"),
    (["--global-batch-size", "7"], "global_batch_size=7 is not divisible"),
    (["--vocab-size", "100"], "--vocab-size 100 is too small"),
    (["--split", "100,0,0"], "leaves no valid documents"),
    (["--top-p", "0"], "--top-p"),
    (["--exclude", "/"], "leaves no file"),
    (["--input", "/nonexistent/corpus.txt"], "does not exist"),
], ids=["tp-heads", "pp-layers", "model", "steps", "batch", "vocab", "split", "top-p", "exclude", "input"])
def test_bad_options_fail_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(out), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was built


def test_out_must_be_a_directory(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(a_file)])
    assert "is a file" in capsys.readouterr().err


def test_module_entry_point_reports_errors():
    """`python -m minimegatron.demo` (minimegatron/demo/__main__.py) exits 2 with the reason."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "minimegatron.demo", "--quick", "--tp", "3"],
                            capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert result.returncode == 2
    assert "error:" in result.stderr and "tensor-parallel size 3" in result.stderr


def test_data_step_errors_are_reported_like_argparse(tmp_path, capsys):
    """A vocabulary the tokenizer cannot build: exit 2 with the reason, no traceback."""
    text = tmp_path / "small.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(tmp_path / "out"), "--input", str(text), "--vocab-size", "100000"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m minimegatron.demo: error: ") and "Traceback" not in err


def test_a_corpus_too_small_for_a_valid_split_stops_before_training(tmp_path, capsys):
    corpus = tmp_path / "two.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 300}) + "\n"
                              for i in range(2)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(out), "--input", str(corpus), "--vocab-size", "300", "--no-progress"])
    assert exit_info.value.code == 2
    assert ("the valid split has no documents (2 documents in all, --split 95,5,0); use more text or "
            "change --split") in capsys.readouterr().err
    assert not (out / "gpt").exists()  # no model was trained


def test_lr_help_names_both_defaults():
    from minimegatron.demo.cli import DEFAULTS, QUICK, build_parser

    help_text = " ".join(build_parser().format_help().split())
    assert f"default {DEFAULTS['lr']:g}; {QUICK['lr']:g} with --quick" in help_text
