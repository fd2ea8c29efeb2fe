"""Resuming: is the checkpoint ``--load`` names one this run can continue? Asked before any rank starts.

:func:`validate <minimegatron.training.args.validate>` calls :func:`check_resume` for every run with
``--load`` (the loading itself is :mod:`minimegatron.training.checkpointing`'s, on every rank)::

    --load DIR holds a checkpoint      every JSON file parses, every safetensors header is whole (no
                                       weights read); the saved model is this run's model, else the
                                       fields that differ and the flags that rebuild it; its step is
                                       below --steps
    --load DIR holds no checkpoint     start from scratch only if DIR is empty or missing (the first
                                       run of a command with --load = --save); anything else there
                                       (logs, a Hugging Face model, pickles, no 'latest') is a wrong path

``python -m minimegatron.train`` also calls :func:`check_overwrite`: a rerun without ``--load`` must not
replace an earlier run's ``iter_*`` directories in ``--save``. Each refusal is a ``CheckpointError``
(or a ``ValueError``) that names what is there and the fix.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from minimegatron.checkpoint.files import (LATEST_NAME, METADATA_NAME, OPTIMIZER_NAME, TRAINER_NAME,
                                           WEIGHTS_NAME, find_checkpoint, iteration_name, load_config,
                                           read_json, verify_checkpoint)
from minimegatron.checkpoint.reshape import IGNORED_CONFIG_FIELDS, CheckpointError
from minimegatron.config import ModelConfig, diff_fields
from minimegatron.models import family_of
from minimegatron.training.checkpointing import read_trainer
from minimegatron.training.config import CLI_MODEL_FIELDS, MODEL_CLASS, TrainConfig

__all__ = ["check_resume", "check_overwrite"]


def check_resume(cfg: TrainConfig, model: ModelConfig) -> None:
    """Raise CheckpointError if ``cfg.load`` holds a checkpoint of another model (what differs, and
    the flags that fix it). Part of :func:`~minimegatron.training.args.validate`: runs before any rank
    starts."""
    path = find_checkpoint(cfg.load, cfg.load_step)
    if path is None:
        _refuse_foreign_directory(cfg)  # nothing to resume: fine only if there is nothing at all
        return
    verify_checkpoint(path)  # every JSON file parses, every safetensors header is whole: no weights read
    saved = load_config(path).to_dict()
    saved_class = read_json(path / METADATA_NAME).get("model_class")
    mine = model.to_dict()
    free = [k for k in IGNORED_CONFIG_FIELDS if k != "max_seq_len" or model.position_embedding != "learned"]
    diff = diff_fields(saved, mine, ignore=free)  # learned positions: max_seq_len is the table's rows
    lines = [f"{k}: {saved.get(k)!r} in the checkpoint, {mine.get(k)!r} in this run" for k in diff]
    if saved_class != MODEL_CLASS[cfg.model]:
        lines.insert(0, f"model: {saved_class} in the checkpoint, {MODEL_CLASS[cfg.model]} in this run")
    if lines:
        raise CheckpointError(f"--load {cfg.load}: {path.name} holds a different model than this run:\n  "
                              + "\n  ".join(lines) + f"\nFix: {_resume_fix(cfg, saved, saved_class, path)}, "
                              "or point --load at a checkpoint of this model, or leave --load out to start "
                              "from scratch.")
    if (path / TRAINER_NAME).is_file() and (path / OPTIMIZER_NAME).is_file():  # else: weights only, step 0
        step = read_trainer(path)["step"]
        if step >= cfg.steps:  # --steps counts from 0: nothing would be trained
            raise ValueError(f"--load {cfg.load}: {path.name} is already at step {step} >= --steps "
                             f"{cfg.steps}; --steps is the total, so raise it above {step}")


def _refuse_foreign_directory(cfg: TrainConfig) -> None:
    """``--load DIR`` holds no checkpoint: start from scratch only if DIR is empty (or missing: the
    first run of a command with --load = --save); files of anything else mean a wrong path."""
    root = Path(cfg.load)
    if not root.is_dir():
        return
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not p.name.startswith("."))
    if not found:
        return  # empty (hidden .tmp-* debris of a killed first save does not count)
    shown = ", ".join(found[:6]) + (f", … ({len(found)} entries)" if len(found) > 6 else "")
    iters = [f.rstrip("/") for f in found if f.startswith("iter_") and (root / f / WEIGHTS_NAME).is_file()]
    if iters:
        steps = [int(name[5:]) for name in iters if name[5:].isdigit()]
        hint = (f"its '{LATEST_NAME}' file is missing: pick a checkpoint with --load-step "
                f"{max(steps) if steps else '<step>'}")
    elif "train_log.jsonl" in found:
        hint = "this is an --out-dir (logs), not a checkpoint: give --load the run's --save directory"
    elif "config.json" in found and any(f.endswith(".safetensors") for f in found):
        hint = ("a Hugging Face model? convert it with minimegatron.checkpoint.from_hf, then "
                "save_checkpoint(model, DIR) and --load DIR")
    elif any(f.endswith((".pt", ".pth", ".bin", ".ckpt", ".pkl")) for f in found):
        hint = ("pickle files (torch.save, DeepSpeed's save_checkpoint) are never loaded (unpickling "
                "can run code): give --load a directory written by --save")
    else:
        hint = "give --load a directory written by --save (iter_*/ + latest)"
    raise CheckpointError(f"--load {cfg.load} holds no minimegatron checkpoint (found {shown}; no "
                          f"'{LATEST_NAME}', no {WEIGHTS_NAME}), so nothing was loaded and nothing was "
                          f"trained: {hint}; or leave --load out to train from scratch")


def check_overwrite(cfg: TrainConfig) -> None:
    """Refuse a run that would overwrite a checkpoint of another run in --save (the command line's
    check: a rerun without --load would replace the earlier run's iter_* directories)."""
    if not cfg.save or not os.path.isdir(cfg.save):
        return
    if cfg.load and os.path.abspath(cfg.load) == os.path.abspath(cfg.save):
        return  # a resume: it continues the checkpoints there
    start = 0
    if cfg.load:
        path = find_checkpoint(cfg.load, cfg.load_step)
        if path is not None and (path / TRAINER_NAME).is_file():
            start = read_trainer(path)["step"]
    saves = {s for s in range(start + 1, cfg.steps + 1)
             if s == cfg.steps or (cfg.save_interval and s % cfg.save_interval == 0)}
    clash = sorted(s for s in saves if (Path(cfg.save) / iteration_name(s)).exists())
    if clash:
        names = ", ".join(iteration_name(s) for s in clash[:3]) + (" …" if len(clash) > 3 else "")
        raise CheckpointError(
            f"--save {cfg.save} already holds {names} of an earlier run, which this run would overwrite; "
            f"resume that run instead (--load {cfg.save}), or give --save a new directory, or delete "
            f"{Path(cfg.save) / iteration_name(clash[0])} to replace it")


def _resume_fix(cfg: TrainConfig, saved: dict, saved_class: str, path: Path) -> str:
    """The command-line flags that rebuild the saved model (or, failing that, the Python way)."""
    flags = {k: saved[k] for k in CLI_MODEL_FIELDS[:4] if saved[k] != getattr(cfg, k)}
    if saved.get("position_embedding") == "learned" and saved.get("max_seq_len") != cfg.seq_len:
        flags["seq_len"] = saved["max_seq_len"]  # the learned position table's rows
    family = family_of(saved_class) or cfg.model
    try:
        trial = replace(cfg, model=family, **flags).to_model_config().to_dict()
        flags.update({k: saved[k] for k in CLI_MODEL_FIELDS[4:]  # not derived (older files: no MoE keys)
                      if k in saved and trial[k] != saved[k]})
        trial = replace(cfg, model=family, **flags).to_model_config().to_dict()
    except ValueError:  # these flags alone make no valid model
        trial = {}
    if cfg.model_config is None and not diff_fields(saved, trial, ignore=IGNORED_CONFIG_FIELDS):
        words = ([f"--model {family}"] if family != cfg.model else []) + [  # None: the flag left out
            f"--{k.replace('_', '-')} {v}" if v is not None else f"no --{k.replace('_', '-')}"
            for k, v in flags.items()]
        return f"train with the checkpoint's model ({' '.join(words)})"
    return ("build this run's model from the checkpoint: TrainConfig(model_config="
            f"minimegatron.checkpoint.load_config({str(path)!r}))")
