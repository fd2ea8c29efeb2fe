"""Checkpoint files: TP=2 -> TP=1 round trip, what is on disk, atomic saves, clear mismatch errors."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import minimegatron.checkpoint.io as ckpt_io
from minimegatron.checkpoint import (CheckpointError, load_checkpoint, load_config, load_model,
                                     read_checkpoint, save_checkpoint)
from minimegatron.config import gpt_config, llama_config
from minimegatron.gpt import GPTModel
from minimegatron.launch import launch
from minimegatron.llama import LLaMAModel
from minimegatron.mpu.state import initialize_model_parallel

SIZES = dict(vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4, max_seq_len=32)
LLAMA = llama_config(num_kv_heads=2, **SIZES)
GPT = gpt_config(**SIZES)
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS)


def llama(seed=0, state=None, config=LLAMA):
    torch.manual_seed(seed)
    return LLaMAModel(config, state)


def test_save_tp2_load_tp1_and_back(tmp_path):
    """Saved from TP=2 (× DP=2: 4 ranks, one writer), loaded at TP=1: same logits. Saved at TP=1,
    loaded at TP=2: same logits."""
    def save_at_tp2():
        model = llama(seed=5, state=initialize_model_parallel(2))  # 4 ranks: tp=2, dp=2
        save_checkpoint(model, tmp_path / "tp2", step=7, metadata={"tokens_seen": 1234})
        return logits(model)

    from_tp2 = launch(save_at_tp2, 4, timeout=120)[0]
    loaded = llama(seed=99)
    meta = load_checkpoint(loaded, tmp_path / "tp2")
    torch.testing.assert_close(logits(loaded), from_tp2, rtol=1e-5, atol=1e-5)
    assert meta["step"] == 7 and meta["user"] == {"tokens_seen": 1234}
    assert meta["saved_from"] == {"tp": 2, "pp": 1, "dp": 2}
    auto = load_model(tmp_path / "tp2")  # class + config from the checkpoint itself
    assert type(auto) is LLaMAModel and auto.config == LLAMA
    torch.testing.assert_close(logits(auto), from_tp2, rtol=1e-5, atol=1e-5)

    save_checkpoint(loaded, tmp_path / "tp1")

    def load_at_tp2():
        model = llama(seed=42, state=initialize_model_parallel(2))
        load_checkpoint(model, tmp_path / "tp1")
        return logits(model)

    for out in launch(load_at_tp2, 2, timeout=120):
        torch.testing.assert_close(out, from_tp2, rtol=1e-5, atol=1e-5)


def test_what_is_on_disk(tmp_path):
    model = GPTModel(GPT)
    path = save_checkpoint(model, tmp_path, step=3)
    assert path == tmp_path / "iter_0000003"
    assert (tmp_path / "latest").read_text().strip() == "iter_0000003"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "metadata.json", "model.safetensors"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert json.loads((path / "config.json").read_text()) == GPT.to_dict()
    meta = json.loads((path / "metadata.json").read_text())
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert shapes == {k: v["shape"] for k, v in meta["tensors"].items()}
    assert shapes["embedding.word_embeddings.weight"] == [100, 32]  # unpadded, TP-independent
    assert "lm_head.weight" not in shapes  # tied
    assert meta["model_class"] == "GPTModel" and load_config(tmp_path) == GPT
    tensors, config, _ = read_checkpoint(path)  # an iteration dir can be named directly
    assert config == GPT and tensors.keys() == shapes.keys()
    save_checkpoint(model, tmp_path, step=3, dtype=torch.bfloat16)  # re-save the same step: fine
    assert read_checkpoint(tmp_path)[0]["final_norm.weight"].dtype == torch.bfloat16
    assert not list(tmp_path.glob(".tmp-*"))


def test_loading_reads_no_pickle(tmp_path, monkeypatch):
    save_checkpoint(llama(), tmp_path)

    def forbidden(*a, **k):
        raise AssertionError("checkpoint loading must not unpickle anything")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_checkpoint(llama(seed=1), tmp_path)


def test_exception_inside_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    old = llama(seed=1)
    save_checkpoint(old, tmp_path, step=1)
    expected = logits(old)

    def broken_write(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_file", broken_write)
    for step in (2, 1):  # a new step, and overwriting the current one
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(llama(seed=2), tmp_path, step=step)
        assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
        assert not (tmp_path / "iter_0000002").exists() and not list(tmp_path.glob(".tmp-*"))
        fresh = llama(seed=3)
        load_checkpoint(fresh, tmp_path)
        torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=0)


def _save_then_die(path):
    """Child process: killed (os._exit, no cleanup) after the weights, before config.json."""
    def die(*args, **kwargs):
        os._exit(9)

    ckpt_io._write_json = die
    save_checkpoint(llama(seed=2), path, step=2)


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    old = llama(seed=1)
    save_checkpoint(old, tmp_path, step=1)
    child = mp.get_context("fork").Process(target=_save_then_die, args=(tmp_path,))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    assert list(tmp_path.glob(".tmp-iter_0000002-*")), "the half-written save should be left behind"
    fresh = llama(seed=3)
    assert load_checkpoint(fresh, tmp_path)["step"] == 1
    torch.testing.assert_close(logits(fresh), logits(old), rtol=0, atol=0)
    save_checkpoint(fresh, tmp_path, step=2)  # the next save cleans up the debris
    assert not list(tmp_path.glob(".tmp-*")) and load_checkpoint(fresh, tmp_path)["step"] == 2


def test_mismatched_config_names_the_fields_and_the_fix(tmp_path):
    save_checkpoint(llama(), tmp_path)
    with pytest.raises(CheckpointError, match=r"(?s)hidden_size: 32 in the checkpoint, 64 in the model.*"
                                              r"load_config\(path\)"):
        load_checkpoint(LLaMAModel(LLAMA.replace(hidden_size=64)), tmp_path)
    with pytest.raises(CheckpointError, match="rope_theta: 10000.0 in the checkpoint, 500.0 in the model"):
        load_checkpoint(llama(config=LLAMA.replace(rope_theta=500.0)), tmp_path)  # same shapes!
    with pytest.raises(CheckpointError, match="norm: 'rmsnorm' in the checkpoint, 'layernorm'"):
        load_checkpoint(GPTModel(GPT), tmp_path)
    load_checkpoint(llama(config=LLAMA.replace(dropout=0.1, max_seq_len=64)), tmp_path)  # harmless


def test_tampered_weights_name_the_tensor(tmp_path):
    path = save_checkpoint(llama(), tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    name = "layers.1.attention.dense.weight"
    tensors[name] = tensors[name][:, :16].contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'layers\.1\.attention\.dense\.weight': checkpoint has full "
                                              r"shape \(32, 16\), this model expects \(32, 32\)"):
        load_checkpoint(llama(), tmp_path)


def test_missing_checkpoints_and_bad_arguments(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(llama(), tmp_path)
    save_checkpoint(llama(), tmp_path, step=4)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 5 .*found \['iter_0000004'\]"):
        load_checkpoint(llama(), tmp_path, step=5)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(llama(), tmp_path, metadata={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        save_checkpoint(llama(), tmp_path, step=-1)
    with pytest.raises(TypeError, match="no ModelConfig"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path)


def test_crash_between_the_two_renames_of_a_resave_is_recovered(tmp_path, monkeypatch):
    """Re-saving step 1 moves the old iter_0000001 aside, then renames the new one in. Dying between
    the two leaves `latest` naming a missing directory: readers use the moved-aside copy, the next
    save renames it back."""
    old = llama(seed=1)
    save_checkpoint(old, tmp_path, step=1)
    expected = logits(old)
    real_replace = os.replace

    def dies_on_the_second_rename(src, dst):
        if Path(src).name.startswith(".tmp-iter_") and Path(dst).name == "iter_0000001":
            os._exit(9)  # killed: no exception handler runs
        return real_replace(src, dst)

    def resave():
        monkeypatch.setattr(os, "replace", dies_on_the_second_rename)
        save_checkpoint(llama(seed=2), tmp_path, step=1)

    child = mp.get_context("fork").Process(target=resave)
    child.start()
    child.join(60)
    assert child.exitcode == 9
    assert not (tmp_path / "iter_0000001").exists()  # the window the fix covers
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    fresh = llama(seed=3)
    assert load_checkpoint(fresh, tmp_path)["step"] == 1  # falls back to the moved-aside copy
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=0)
    save_checkpoint(fresh, tmp_path, step=2)  # the next save renames it back, then cleans up
    assert (tmp_path / "iter_0000001" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))
    back = llama(seed=4)
    load_checkpoint(back, tmp_path, step=1)
    torch.testing.assert_close(logits(back), expected, rtol=0, atol=0)


def test_an_exception_between_the_renames_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    old = llama(seed=1)
    save_checkpoint(old, tmp_path, step=1)
    real_replace = os.replace

    def fails_on_the_second_rename(src, dst):
        if Path(src).name.startswith(".tmp-iter_") and Path(dst).name == "iter_0000001":
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fails_on_the_second_rename)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(llama(seed=2), tmp_path, step=1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "iter_0000001" / "model.safetensors").is_file() and not list(tmp_path.glob(".tmp-*"))
    fresh = llama(seed=3)
    load_checkpoint(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(old), rtol=0, atol=0)


def test_a_save_only_deletes_temp_directories_that_are_stale(tmp_path):
    """A `.tmp-*` of a save still running (here: this very process, just started) must survive another
    save into the same directory; one untouched for longer than STALE_TMP_SECONDS is debris."""
    save_checkpoint(llama(seed=1), tmp_path, step=1)
    running = tmp_path / ckpt_io._tmp_name("iter_0000005")  # written by a live process: us
    running.mkdir()
    (running / "model.safetensors").write_bytes(b"being written")
    foreign = tmp_path / ".tmp-iter_0000006-0123abcd-other-host.1"  # another machine's, fresh
    foreign.mkdir()
    old = tmp_path / ".tmp-iter_0000007-0123abcd-other-host.1"  # another machine's, long untouched
    old.mkdir()
    (old / "x").write_bytes(b"")
    ancient = time.time() - ckpt_io.STALE_TMP_SECONDS - 60
    for path in (old, old / "x"):
        os.utime(path, (ancient, ancient))
    save_checkpoint(llama(seed=2), tmp_path, step=2)
    assert running.is_dir() and foreign.is_dir() and not old.exists()
