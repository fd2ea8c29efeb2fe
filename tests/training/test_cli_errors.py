"""Every bad input and every fault of the train and demo command lines ends in ONE clear line.

Each case checks what a student sees: the exit status (2: bad input, 1: the run failed, 130: Ctrl-C),
stderr holding exactly one non-blank line ``<prog>: error: ...`` that names the problem (key words, the
path) and the fix, no traceback, an answer within a time bound, no process left behind and no launch
temp dir (``minimegatron-launch-*``) in a private ``TMPDIR``, and nothing lost (an existing checkpoint
at ``--save`` is byte-for-byte intact after a refused run).

Most cases are refused before any rank starts. Those run the CLI's ``main(argv)`` in this process
(:func:`run_main <tests.training.cli_runs.run_main>`: isolated like a fresh process, no two seconds of
torch import), except the :data:`SUBPROCESS` ones, which run the real command (``python -m
minimegatron.train`` / ``python -m minimegatron.demo``) as a subprocess: one of each kind of refusal
(a bad value, a bad flag, a damaged checkpoint, the demo's) and every case that needs a private mount
(a read-only or tiny file system), so the end-to-end path — the module's entry point, the exit status,
nothing printed by imports — stays proven. A few cases run ranks on purpose (a diverging loss, Ctrl-C,
a hang, a damaged tensor a rank finds): subprocesses too. Library-level cases (load_model on damaged
files) run in-process.
"""
import errno
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
from safetensors.torch import save_file  # noqa: E402

import minimegatron.checkpoint.io as ckpt_io  # noqa: E402
from minimegatron.checkpoint import CheckpointError, load_config, load_model, read_checkpoint  # noqa: E402
from minimegatron.errors import rank_error_line  # noqa: E402
from tests.training.cli_runs import (DEMO, RAN_IN, TRAIN, Run, _alive_with, assert_one_line,  # noqa: E402
                                     mounted, read_only, run_cli, run_main, tree_digest)

TINY = ["--steps", "2", "--hidden-size", "16", "--num-layers", "1", "--seq-len", "16",
        "--global-batch-size", "2", "--micro-batch-size", "1", "--vocab-size", "64", "--no-progress"]

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


@pytest.fixture
def refused(request, monkeypatch, capfd):
    """Run a command that must be refused before any rank starts: the real command for the
    SUBPROCESS cases (and whenever a mount prefix is needed), else main(argv) in this process."""
    def run(module: str, *args: str, cwd: Path, prefix: list[str] | None = None) -> Run:
        if prefix or request.node.name in SUBPROCESS:
            return run_cli(module, *args, cwd=cwd, prefix=prefix)
        return run_main(module, list(args), cwd, monkeypatch, capfd)
    return run


def test_the_subprocess_cases_are_cases():
    """A misspelt name in SUBPROCESS would quietly run that case in-process."""
    names = set()
    for name, fn in globals().items():
        if name.startswith("test_") and callable(fn):
            ids = [m.kwargs.get("ids") or [] for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            names |= {f"{name}[{i}]" for i in ids[0]} if ids else {name}
    assert SUBPROCESS <= names, SUBPROCESS - names


# ---- a real checkpoint to damage -----------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-step training checkpoint of the TINY model, saved by the command line itself."""
    root = tmp_path_factory.mktemp("saved")
    run = run_cli(TRAIN, *TINY, "--save", str(root / "ck"), "--out-dir", str(root / "log"), cwd=root,
                  timeout=RAN_IN)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (root / "ck" / "latest").read_text().strip() == "iter_0000002"
    return root / "ck"


@pytest.fixture
def copy_of(checkpoint, tmp_path):
    """A fresh copy of the checkpoint and its iteration directory, to damage."""
    def make(name: str = "ck") -> tuple[Path, Path]:
        target = tmp_path / name
        shutil.copytree(checkpoint, target)
        return target, target / "iter_0000002"
    return make


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
], ids=["lr-inf", "lr-nan", "lr-zero", "min-lr-above-lr", "clip-nan", "weight-decay-negative",
        "dropout-one", "timeout-negative", "timeout-nan", "split-garbage", "split-four-parts", "steps-zero",
        "micro-batch-negative", "kv-heads-zero", "tp-heads", "batch-divisibility", "steps-not-int",
        "misspelt-flag", "model-too-big"])
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


def test_load_equal_to_save_starts_from_scratch_when_empty(tmp_path):
    """The first run of a resumable command (--load = --save, nothing there yet) trains from step 0."""
    empty = tmp_path / "ck"
    empty.mkdir()
    (empty / ".tmp-iter_0000002-dead").mkdir()  # a killed save's debris does not make it foreign
    run = run_cli(TRAIN, *TINY, "--load", str(empty), "--save", str(empty), "--out-dir", str(tmp_path / "log"),
                  cwd=tmp_path, timeout=RAN_IN)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "training from scratch" in run.stdout
    assert (empty / "latest").read_text().strip() == "iter_0000002"


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


# ---- train: what only the ranks can find --------------------------------------------------------

def test_a_tensor_missing_from_the_weights_is_one_line_from_the_rank(tmp_path, copy_of):
    """A well-formed model.safetensors without one tensor passes the header check; the rank that reads
    it says which rank, which file and what to do."""
    ck, it = copy_of()
    from safetensors import safe_open
    with safe_open(str(it / "model.safetensors"), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != "final_norm.weight"}
    save_file(tensors, str(it / "model.safetensors"))
    run = run_cli(TRAIN, *_load(ck), "--out-dir", str(tmp_path / "log"), cwd=tmp_path, timeout=RAN_IN)
    assert_one_line(run, 1, r"rank 0 failed: CheckpointError: .*iter_0000002 has no tensor 'final_norm\.weight'",
                    r"pick a checkpoint saved by this model", within=RAN_IN)


def test_a_diverging_loss_stops_the_run_and_the_log_stays_strict_json(tmp_path):
    log = tmp_path / "log"
    run = run_cli(TRAIN, *TINY, "--steps", "6", "--lr", "1e30", "--warmup-steps", "0", "--clip-grad", "0",
                  "--out-dir", str(log), cwd=tmp_path, timeout=RAN_IN)
    line = assert_one_line(run, 1, r"the loss became (NaN|inf) at step \d", r"training diverged and was stopped",
                           r"lower --lr \(it is 1e\+30: try 1e\+29\)", r"--warmup-steps",
                           r"--clip-grad 1\.0", within=RAN_IN)
    step = int(re.search(r"at step (\d)", line).group(1))

    def strict(token):
        raise AssertionError(f"{token} is not JSON")
    records = [json.loads(x, parse_constant=strict) for x in (log / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(step + 1))  # stopped at the step it diverged
    assert records[-1]["loss"] is None


def test_ctrl_c_stops_every_rank(tmp_path):
    """SIGINT while the ranks train: one line, status 130, no rank left running."""
    log = tmp_path / "log"
    cmd = Run(TRAIN, [*TINY, "--steps", "100000", "--dp", "2", "--out-dir", str(log)], tmp_path)
    start = time.monotonic()
    proc = subprocess.Popen(cmd.argv, cwd=tmp_path, env=cmd.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        while not ((log / "train_log.jsonl").is_file() and (log / "train_log.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() - start < RAN_IN, "training did not start"
            time.sleep(0.2)
        assert len(_alive_with(cmd.tag.split("=")[1])) >= 3  # the command and its two ranks
        proc.send_signal(signal.SIGINT)
        cmd.stdout, cmd.stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cmd.returncode, cmd.seconds = proc.returncode, 0.0
    cmd.check_nothing_left()
    assert_one_line(cmd, 130, r"interrupted")


def test_a_hang_past_timeout_is_one_line_and_the_stacks_go_to_a_file(tmp_path):
    log = tmp_path / "log"
    run = run_cli(TRAIN, *TINY, "--steps", "100000", "--timeout", "3", "--out-dir", str(log), cwd=tmp_path,
                  timeout=RAN_IN)
    assert_one_line(run, 1, r"the run did not finish within --timeout 3 s; raise --timeout",
                    r"ranks \[0\] were killed; where each one was: .*log/timeout_stacks\.txt", within=RAN_IN)
    assert "--- rank 0 was here ---" in (log / "timeout_stacks.txt").read_text()


def test_a_full_disk_during_the_save_is_one_line(tmp_path, monkeypatch, capsys):
    """In-process (the ranks inherit the patch): the writer's ENOSPC reaches the user as one line
    naming the step, the directory, the errno's words and the fix; 'latest' is untouched."""
    from minimegatron.train import main

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    monkeypatch.setattr(ckpt_io, "save_file", full)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--save", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "log")])
    assert exit_info.value.code == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert re.search(r"^python -m minimegatron.train: error: rank \d failed: CheckpointError: cannot write "
                     r"the checkpoint of step 2 to .*ck \(\[Errno 28\] No space left on device.*\); free some "
                     r"disk space .*give --save another directory; 'latest' still names the previous "
                     r"checkpoint", lines[0]), lines[0]
    assert not (tmp_path / "ck" / "latest").exists()


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


# ---- library: loading damaged files names them; nothing is unpickled --------------------------------

@pytest.fixture
def no_unpickling(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint must be checked without unpickling anything")
    import pickle
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)


def test_load_model_on_a_truncated_file_names_it(copy_of, no_unpickling):
    ck, it = copy_of()
    data = (it / "model.safetensors").read_bytes()
    for size in (len(data) - 1, 100, 5, 0):  # short data, short header, shorter than the length field
        (it / "model.safetensors").write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(it / 'model.safetensors'))} is "
                                                  r"(truncated|empty).*re-save"):
            load_model(ck)


def test_load_model_on_a_pickle_disguised_as_safetensors(copy_of, no_unpickling):
    ck, it = copy_of()
    import pickle
    (it / "model.safetensors").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a Python pickle .*never opened"):
        load_model(ck)


@pytest.mark.parametrize("name,read", [("config.json", load_config), ("metadata.json", read_checkpoint),
                                       ("metadata.json", load_model)])
def test_damaged_json_is_named(copy_of, name, read):
    ck, it = copy_of()
    (it / name).write_text("")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(it / name))} is not valid JSON \(line 1, "
                                              r"column 1\): the checkpoint is damaged; re-save it"):
        read(ck)


def test_a_foreign_config_is_named(copy_of):
    ck, it = copy_of()
    (it / "config.json").write_text('{"n_embd": 768, "model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match=r"config\.json is not a minimegatron model config "
                                              r"\(unknown ModelConfig fields.*from_hf"):
        load_config(ck)


def test_rank_error_line_keeps_the_whole_exception():
    class Fake(Exception):
        rank = 3
        traceback = ('Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n'
                     '    ^^^\nminimegatron.checkpoint.reshape.CheckpointError: the weights do not fit:\n'
                     '  missing tensors: [\'a\']\nThe checkpoint was made for another configuration.\n')
    assert rank_error_line(Fake()) == ("rank 3 failed: CheckpointError: the weights do not fit: missing "
                                       "tensors: ['a'] The checkpoint was made for another configuration.")


def test_the_log_writes_non_finite_numbers_as_null(tmp_path):
    from minimegatron.training.args import TrainConfig
    from minimegatron.training.log import History, LogWriter

    writer = LogWriter(TrainConfig(out_dir=str(tmp_path), progress=False), History(config={}))
    writer.write(step=0, loss=float("nan"), grad_norm=float("inf"), lr=1e-3)
    writer.close(plot=False)
    assert json.loads((tmp_path / "train_log.jsonl").read_text()) == {"step": 0, "loss": None,
                                                                      "grad_norm": None, "lr": 1e-3}


def test_no_timeout_is_passed_to_launch_as_no_limit():
    import inspect

    from minimegatron.launch import launch
    from minimegatron.training.loop import launch_timeout

    assert launch_timeout(2.5) == 2.5
    takes_none = "None" in str(inspect.signature(launch).parameters["timeout"].annotation)
    assert launch_timeout(0) is None if takes_none else launch_timeout(0) >= 10 * 24 * 3600
