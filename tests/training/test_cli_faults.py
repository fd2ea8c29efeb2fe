"""The train command line's faults that only its ranks find, and the library below it: ONE clear line.

Like tests/training/test_cli_errors.py (the refusals before any rank, and the checks every case makes:
tests/training/cli_runs.py), but these runs start ranks on purpose — a diverging loss, Ctrl-C, a hang
past --timeout, a damaged tensor a rank finds, a full disk during the save, the first run of a
resumable command — so each one is the real command as a subprocess (the full-disk one: main() in
this process, whose ranks inherit the patch). Library-level cases (load_model on damaged files, the
log, rank_error_line) run in-process.
"""
import errno
import json
import re
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
from tests.training.cli_runs import (RAN_IN, TINY, TRAIN, Run, _alive_with, assert_one_line,  # noqa: E402
                                     run_cli)


def _load(ck: Path, *extra: str) -> list[str]:
    return [*TINY, "--steps", "4", "--load", str(ck), *extra]


# ---- train: the first run of a resumable command ----------------------------------------------------

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
