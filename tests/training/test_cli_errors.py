"""Every bad input of the train and demo command lines is refused before any rank, in ONE clear line.

Each case checks what a student sees (tests/training/cli_runs.py): the exit status 2, stderr holding
exactly one non-blank line ``<prog>: error: ...`` that names the problem (key words, the path) and the
fix, no traceback, an answer within a time bound, no process left behind and no launch temp dir
(``minimegatron-launch-*``) in a private ``TMPDIR``, nothing written, and nothing lost (an existing
checkpoint at ``--save`` is byte-for-byte intact after a refused run).

The cases run the CLI's ``main(argv)`` in this process (``run_main``: isolated like a fresh process,
no two seconds of torch import), except the :data:`SUBPROCESS` ones, which run the real command
(``python -m minimegatron.train`` / ``python -m minimegatron.demo``) as a subprocess: one of each kind
of refusal (a bad value, a bad flag, a damaged checkpoint, the demo's) and every case that needs a
private mount (a read-only or tiny file system), so the end-to-end path — the module's entry point,
the exit status, nothing printed by imports — stays proven. What only the ranks find (a diverging
loss, Ctrl-C, a hang, a damaged tensor) is in tests/training/test_cli_faults.py.
"""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
from safetensors.torch import save_file  # noqa: E402

from tests.training.cli_runs import DEMO, TINY, TRAIN, assert_one_line, mounted, read_only, tree_digest  # noqa: E402

# The refusals that run as the real command (the others: main(argv) in this process).
SUBPROCESS = {
    "test_train_refuses_bad_values[lr-inf]",              # a bad value (validate)
    "test_train_refuses_bad_values[misspelt-flag]",       # a bad flag (the parser)
    "test_damaged_checkpoints_are_named_before_any_rank[truncated-weights]",  # a damaged --load
    "test_demo_refuses_bad_values[steps-not-int]",        # the demo's entry point
    # a private mount (as root): only a subprocess can have one
    "test_save_in_a_read_only_directory", "test_out_dir_in_a_read_only_directory",
    "test_checkpoints_that_cannot_fit_on_the_disk", "test_demo_out_in_a_read_only_directory",
}


def test_the_subprocess_cases_are_cases():
    """A misspelt name in SUBPROCESS would quietly run that case in-process."""
    names = set()
    for name, fn in globals().items():
        if name.startswith("test_") and callable(fn):
            ids = [m.kwargs.get("ids") or [] for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            names |= {f"{name}[{i}]" for i in ids[0]} if ids else {name}
    assert SUBPROCESS <= names, SUBPROCESS - names


# ---- train: bad values, refused before any rank ------------------------------------------------------

@pytest.mark.parametrize("args,patterns", [
    (["--lr", "inf"], [r"--lr inf", r"finite", r"lr > 0", r"try --lr 1e-3"]),
    (["--lr", "nan"], [r"--lr nan", r"finite", r"try --lr"]),
    (["--lr", "0"], [r"--lr 0\b", r"lr > 0"]),
    (["--min-lr", "0.5"], [r"--min-lr 0.5", r"0 <= min_lr <= lr = 0.001", r"try --min-lr 0.0001"]),
    (["--clip-grad", "nan"], [r"--clip-grad nan", r"0 for no clipping", r"try --clip-grad 1.0"]),
    (["--weight-decay", "-0.1"], [r"--weight-decay -0.1", r"weight_decay >= 0", r"try --weight-decay"]),
    (["--dropout", "1"], [r"--dropout 1\b", r"0 <= dropout < 1", r"try --dropout 0.1"]),
    (["--timeout", "-1"], [r"--timeout -1", r"0 for no limit", r"timeout >= 0"]),
    (["--timeout", "nan"], [r"--timeout nan", r"finite"]),
    (["--split", "abc"], [r"--split 'abc'", r"not a number", r"949,50,1"]),  # eval_interval 0: still checked
    (["--split", "1,2,3,4"], [r"--split '1,2,3,4'", r"at most 3 weights"]),
    (["--steps", "0"], [r"steps must be a positive int, got 0", r"--steps 1 or more"]),
    (["--micro-batch-size", "-2"], [r"micro_batch_size must be a positive int, got -2"]),
    (["--num-kv-heads", "0"], [r"num_kv_heads must be a positive int", r"--num-kv-heads 1 or more"]),
    (["--tp", "3"], [r"num_attention_heads=4 is not divisible by tensor-parallel size 3", r"choose tp"]),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], [r"not divisible by micro_batch_size·dp",
                                                               r"e\.g\. use global_batch_size=2"]),
    (["--steps", "abc"], [r"argument --steps: invalid int value: 'abc'", r"see .* --help"]),
    (["--stpes", "3"], [r"unrecognized arguments: --stpes", r"see .* --help"]),
    (["--hidden-size", "65536", "--num-layers", "64"], [r"needs at least .*TB of memory",
                                                        r"parameters", r"smaller --hidden-size"]),
    (["--zero-stage", "4"], [r"--zero-stage 4", r"stages 0 .* and 3", r"give --zero-stage 0, 1, 2 or 3"]),
    (["--zero-stage", "3", "--pp", "2"], [r"zero_stage=3 with pp=2", r"stage 0 or 1",
                                          r"--zero-stage 1 with the pipeline, or --pp 1"]),
    (["--num-experts", "2", "--moe-top-k", "3"], [r"--moe-top-k 3 > --num-experts 2", r"--moe-top-k 2"]),
    (["--num-experts", "4", "--moe-capacity-factor", "0"], [r"--moe-capacity-factor 0 must be",
                                                            r"try --moe-capacity-factor 1.25"]),
    (["--ep", "2", "--dp", "2"], [r"--ep 2 with a dense model", r"give --num-experts", r"or --ep 1"]),
    (["--num-experts", "3", "--moe-top-k", "1", "--ep", "2", "--dp", "2"],
     [r"--num-experts 3 is not divisible by --ep 2", r"give --num-experts 2"]),
    (["--num-experts", "4", "--ep", "2", "--dp", "3"], [r"--ep 2 does not divide --dp 3",
                                                        r"carved from data", r"give --dp 2"]),
    (["--num-experts", "4", "--ep", "2", "--dp", "2", "--zero-stage", "1"],
     [r"--ep 2 with --zero-stage 1", r"mixing experts", r"--zero-stage 0 with --ep"]),
    (["--num-experts", "4", "--ep", "2", "--dp", "2", "--dtype", "bf16"],
     [r"--ep 2 with --dtype bf16", r"use --dtype fp32 with --ep"]),
    (["--num-experts", "4", "--moe-aux-loss-coeff", "0.01", "--pp", "2", "--num-layers", "2"],
     [r"--moe-aux-loss-coeff 0.01 .* with --pp 2", r"never reach the last stage", r"--pp 1"]),
    (["--num-experts", "4", "--moe-capacity-factor", "1", "--cp", "2"],
     [r"--cp 2 with --moe-aux-loss-coeff / --moe-capacity-factor", r"use --cp 1"]),
], ids=["lr-inf", "lr-nan", "lr-zero", "min-lr-above-lr", "clip-nan", "weight-decay-negative",
        "dropout-one", "timeout-negative", "timeout-nan", "split-garbage", "split-four-parts", "steps-zero",
        "micro-batch-negative", "kv-heads-zero", "tp-heads", "batch-divisibility", "steps-not-int",
        "misspelt-flag", "model-too-big", "zero-stage-4", "zero3-with-pipeline", "moe-top-k",
        "moe-capacity", "ep-dense", "ep-experts", "ep-dp", "ep-zero", "ep-bf16", "moe-aux-pp", "moe-cp"])
def test_train_refuses_bad_values(refused, tmp_path, args, patterns):
    run = refused(TRAIN, *TINY, "--out-dir", str(tmp_path / "log"), *args, cwd=tmp_path)
    assert_one_line(run, 2, *patterns)
    assert not (tmp_path / "log").exists()  # refused before anything was written


# ---- train: paths -------------------------------------------------------------------------------

def test_save_under_a_file(refused, tmp_path):
    (tmp_path / "notes.txt").write_text("")
    run = refused(TRAIN, *TINY, "--save", str(tmp_path / "notes.txt" / "ck"), cwd=tmp_path)
    assert_one_line(run, 2, r"--save .*notes\.txt/ck", r"notes\.txt is a file, not a directory",
                    r"parents are directories")


def test_save_in_a_read_only_directory(refused, tmp_path):
    prefix = read_only(tmp_path / "ro")
    run = refused(TRAIN, *TINY, "--save", str(tmp_path / "ro" / "ck"), cwd=tmp_path, prefix=prefix)
    assert_one_line(run, 2, r"--save .*ro/ck: cannot write in .*ro, where it would be created",
                    r"Read-only file system|Permission denied", r"writable|directory you own")


def test_out_dir_in_a_read_only_directory(refused, tmp_path):
    prefix = read_only(tmp_path / "ro")
    run = refused(TRAIN, *TINY, "--out-dir", str(tmp_path / "ro" / "run"), cwd=tmp_path, prefix=prefix)
    assert_one_line(run, 2, r"--out-dir .*ro/run: cannot write", r"Read-only file system|Permission denied")


def test_out_dir_is_an_existing_file(refused, tmp_path):
    (tmp_path / "run").write_text("")
    run = refused(TRAIN, *TINY, "--out-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert_one_line(run, 2, r"--out-dir .*run is a file; give a directory")


def test_checkpoints_that_cannot_fit_on_the_disk(refused, tmp_path):
    """A 64 KB disk: the run is refused at once, not after training, and says how much is needed."""
    prefix = mounted(tmp_path / "small", "size=64k")
    run = refused(TRAIN, *TINY, "--save", str(tmp_path / "small" / "ck"), cwd=tmp_path, prefix=prefix)
    assert_one_line(run, 2, r"--save .*small/ck: this run writes its checkpoint \(about .*KB\)",
                    r"has only .* free", r"free some space", r"another disk")


@pytest.mark.parametrize("make,patterns", [
    ("dir", [r"data='.*corpus' is a directory", r"PREFIX", r"e\.g\. --data .*corpus/c"]),
    ("missing", [r"data='.*nothing'", r"not found", r"build one with python -m minimegatron.data.preprocess"]),
    ("garbage-idx", [r"c\.idx is not a Megatron \.idx file", r"rebuild it with python -m minimegatron"]),
    ("bin-suffix", [r"takes the dataset's PREFIX, without \.bin: use --data .*corpus/c\b"]),
    ("half-pair", [r"c\.idx is missing", r"rebuild both"]),
], ids=["directory", "missing", "garbage-idx", "bin-suffix", "half-pair"])
def test_bad_data_paths(refused, tmp_path, make, patterns):
    import numpy as np

    from minimegatron.data.indexed_dataset import IndexedDatasetBuilder

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with IndexedDatasetBuilder(corpus / "c", np.uint16) as builder:
        for _ in range(4):
            builder.add_document(np.arange(40) % 64)
    data = {"dir": corpus, "missing": tmp_path / "nothing", "garbage-idx": corpus / "c",
            "bin-suffix": corpus / "c.bin", "half-pair": corpus / "c"}[make]
    if make == "garbage-idx":
        (corpus / "c.idx").write_bytes(b"certainly not an index")
    if make == "half-pair":
        (corpus / "c.idx").unlink()
    run = refused(TRAIN, *TINY, "--data", str(data), cwd=tmp_path)
    assert_one_line(run, 2, *patterns)


# ---- train: --load and --save of checkpoints -------------------------------------------------------

def _load(ck: Path, *extra: str) -> list[str]:
    return [*TINY, "--steps", "4", "--load", str(ck), *extra]


def test_load_of_a_directory_of_pickles_is_refused(refused, tmp_path):
    foreign = tmp_path / "weights"
    foreign.mkdir()
    torch.save({"w": torch.zeros(2)}, foreign / "model.pt")
    (foreign / "optim.pt").write_bytes(b"\x80\x04junk")
    run = refused(TRAIN, *_load(foreign), cwd=tmp_path)
    assert_one_line(run, 2, r"--load .*weights holds no minimegatron checkpoint", r"found model\.pt, optim\.pt",
                    r"nothing was loaded", r"never loaded", r"directory written by --save",
                    r"leave --load out")


def test_load_of_a_log_directory_names_the_mix_up(refused, tmp_path, checkpoint):
    run = refused(TRAIN, *_load(checkpoint.parent / "log"), cwd=tmp_path)
    assert_one_line(run, 2, r"holds no minimegatron checkpoint", r"train_log\.jsonl",
                    r"an --out-dir \(logs\), not a checkpoint", r"--save directory")


def test_load_of_a_hugging_face_directory_says_how_to_convert(refused, tmp_path):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16}))
    save_file({"wte.weight": torch.zeros(64, 16)}, str(hf / "model.safetensors"))
    run = refused(TRAIN, *_load(hf), cwd=tmp_path)
    assert_one_line(run, 2, r"gpt2 is a Hugging Face model directory \('gpt2'\)", r"not a minimegatron checkpoint",
                    r"from_hf", r"save_checkpoint")


@pytest.mark.parametrize("damage,patterns", [
    ("truncated-weights", [r"iter_0000002/model\.safetensors is truncated", r"promises", r"re-save it"]),
    ("pickle-weights", [r"model\.safetensors is a zip archive \(what torch\.save writes",
                        r"never opened", r"re-save"]),
    ("trainer-json", [r"iter_0000002/trainer\.json is not valid JSON \(line 1, column 1\)",
                      r"the checkpoint is damaged; re-save it or point --load elsewhere"]),
    ("config-json", [r"iter_0000002/config\.json is not valid JSON \(line 1, column 2\)", r"re-save it"]),
    ("metadata-json", [r"iter_0000002/metadata\.json is not valid JSON", r"point --load elsewhere"]),
    ("trainer-fields", [r"trainer\.json lacks a valid 'step' field", r"re-save it"]),
    ("truncated-optimizer", [r"optimizer\.safetensors is truncated", r"re-save it"]),
    ("latest-garbage", [r"latest does not name an iteration directory", r"damaged",
                        r"iter_0000002", r"--load-step"]),
    ("latest-dangling", [r"latest names iter_0000009, which has no model\.safetensors", r"--load-step"]),
    ("no-latest", [r"holds no minimegatron checkpoint", r"'latest' file is missing", r"--load-step 2"]),
], ids=["truncated-weights", "pickle-weights", "trainer-json", "config-json", "metadata-json",
        "trainer-fields", "truncated-optimizer", "latest-garbage", "latest-dangling", "no-latest"])
def test_damaged_checkpoints_are_named_before_any_rank(refused, tmp_path, copy_of, damage, patterns):
    ck, it = copy_of()
    if damage == "truncated-weights":
        data = (it / "model.safetensors").read_bytes()
        (it / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "pickle-weights":
        torch.save({"w": torch.zeros(3)}, it / "model.safetensors")
    elif damage == "trainer-json":
        (it / "trainer.json").write_text("")
    elif damage == "config-json":
        (it / "config.json").write_text("{oops")
    elif damage == "metadata-json":
        (it / "metadata.json").write_text('{"format": ')
    elif damage == "trainer-fields":
        (it / "trainer.json").write_text('{"optimizer_step": 2}')
    elif damage == "truncated-optimizer":
        data = (it / "optimizer.safetensors").read_bytes()
        (it / "optimizer.safetensors").write_bytes(data[:-10])
    elif damage == "latest-garbage":
        (ck / "latest").write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "latest-dangling":
        (ck / "latest").write_text("iter_0000009\n")
    elif damage == "no-latest":
        (ck / "latest").unlink()
    before = tree_digest(ck)
    run = refused(TRAIN, *_load(ck, "--save", str(ck)), cwd=tmp_path)
    assert_one_line(run, 2, *patterns)
    assert tree_digest(ck) == before  # refused: nothing written, nothing removed


def test_load_step_that_does_not_exist(refused, tmp_path, copy_of):
    ck, _ = copy_of()
    before = tree_digest(ck)
    run = refused(TRAIN, *_load(ck, "--load-step", "7", "--save", str(ck)), cwd=tmp_path)
    assert_one_line(run, 2, r"no checkpoint for step 7 at .*iter_0000007", r"found \['iter_0000002'\]",
                    r"pick one of those steps \(--load-step\)")
    assert tree_digest(ck) == before


def test_rerun_without_load_does_not_overwrite_the_checkpoint(refused, tmp_path, copy_of):
    ck, _ = copy_of()
    before = tree_digest(ck)
    run = refused(TRAIN, *TINY, "--save", str(ck), cwd=tmp_path)
    assert_one_line(run, 2, r"--save .*ck already holds iter_0000002 of an earlier run", r"overwrite",
                    r"--load .*ck", r"new directory")
    assert tree_digest(ck) == before


def test_load_of_another_model_names_the_flags(refused, tmp_path, copy_of):
    ck, _ = copy_of()
    before = tree_digest(ck)
    run = refused(TRAIN, *_load(ck, "--hidden-size", "32", "--save", str(ck)), cwd=tmp_path)
    assert_one_line(run, 2, r"hidden_size: 16 in the checkpoint, 32 in this run",
                    r"Fix: train with the checkpoint's model \(--hidden-size 16\)")
    assert tree_digest(ck) == before


# ---- demo -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,patterns", [
    (["--lr", "nan"], [r"--lr nan", r"finite", r"try --lr"]),
    (["--temperature", "inf"], [r"--temperature inf", r"finite number > 0", r"e\.g\. .*--temperature 0\.8"]),
    (["--top-p", "nan"], [r"--top-p nan must be in \(0, 1\]"]),
    (["--split", "x,y"], [r"--split 'x,y'", r"not a number"]),
    (["--tp", "3"], [r"not divisible by tensor-parallel size 3"]),
    (["--steps", "abc"], [r"argument --steps: invalid int value: 'abc'", r"--help"]),
    (["--steps", "-1"], [r"steps must be a positive int, got -1"]),
], ids=["lr-nan", "temperature-inf", "top-p-nan", "split", "tp-heads", "steps-not-int", "steps-negative"])
def test_demo_refuses_bad_values(refused, tmp_path, args, patterns):
    run = refused(DEMO, "--quick", "--no-progress", "--out", str(tmp_path / "out"), *args, cwd=tmp_path)
    assert_one_line(run, 2, *patterns)
    assert not (tmp_path / "out").exists()


def test_demo_out_in_a_read_only_directory(refused, tmp_path):
    prefix = read_only(tmp_path / "ro")
    run = refused(DEMO, "--quick", "--no-progress", "--out", str(tmp_path / "ro" / "out"), cwd=tmp_path,
                  prefix=prefix)
    assert_one_line(run, 2, r"--out .*ro/out: cannot write", r"Read-only file system|Permission denied")


def test_demo_out_under_a_file(refused, tmp_path):
    (tmp_path / "f").write_text("")
    run = refused(DEMO, "--quick", "--no-progress", "--out", str(tmp_path / "f" / "out"), cwd=tmp_path)
    assert_one_line(run, 2, r"--out .*f/out: .*f is a file, not a directory")


