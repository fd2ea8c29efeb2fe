"""Megatron-LM's checkpoint layout on disk, both ways: ``save_megatron`` and ``load_megatron``.

    save_megatron(model, "meg", tp=2, pp=2)           # -> meg/release/mp_rank_{00,01}_{000,001}/…
    config, full = load_megatron("meg")               # any TP/PP on disk -> our full state dict
    load_full_state_dict(GPTModel(config, state), full)  # ... into a model at any TP size

On disk (Megatron-LM's legacy / Megatron-DeepSpeed layout; ``mp_rank_{tp:02d}`` alone when pp = 1)::

    meg/
      latest_checkpointed_iteration.txt    "release", or the iteration number ("200")
      release/  (or iter_0000200/)
        mp_rank_00_000/model_optim_rng.pt   torch.save({"args", "checkpoint_version": 3.0,
        mp_rank_01_000/model_optim_rng.pt                "iteration", "model": {...}})
        mp_rank_00_001/…                    (tp_rank, pp_rank): that rank's shards only

Names, the fused QKV order and the TP/PP cut are in :mod:`.megatron_layout`. No optimizer or RNG state
is written: Megatron-LM reads a ``release`` directory as weights only; for an ``iter_*`` one, pass it
``--no-load-optim --no-load-rng`` (or ``--finetune``).

Reading is safe: every file goes through ``torch.load(weights_only=True)``, which rebuilds tensors and
plain containers only. The one other global allowed is ``argparse.Namespace`` (Megatron's ``args``;
its fields are plain values, ``torch.dtype`` included, which weights_only already allows). A file that
needs anything else (a class of Megatron's, numpy's RNG state) is refused, naming it, never unpickled.

Writing is atomic like :mod:`.io`: the whole iteration directory is written under ``.tmp-…``, fsynced and
renamed into place; ``latest_checkpointed_iteration.txt`` is rewritten last (temp file + rename).
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minimegatron.checkpoint.io import _fsync_dir, _fsync_file, atomic_write_text, publish_dir
from minimegatron.checkpoint.megatron_layout import (CHECKPOINT_VERSION, ENC, LM, config_from_args,
                                                     from_megatron, join_shards, megatron_args,
                                                     shard_stage, to_megatron)
from minimegatron.checkpoint.reshape import (CheckpointError, barrier, full_state_dict, is_writer,
                                             model_config)
from minimegatron.config import ModelConfig

__all__ = ["save_megatron", "load_megatron", "megatron_iteration_dir", "rank_dir_name", "nest", "flatten",
           "TRACKER_NAME", "FILE_NAME", "SAFE_GLOBALS"]

TRACKER_NAME, FILE_NAME = "latest_checkpointed_iteration.txt", "model_optim_rng.pt"
SAFE_GLOBALS = [argparse.Namespace]  # all that torch.load(weights_only=True) is allowed beyond tensors
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
Tensors = dict[str, torch.Tensor]


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    """``mp_rank_01`` (pp = 1) or ``mp_rank_01_002``: the directory of one (tp_rank, pp_rank)."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _iteration_name(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


# ---- nested dicts: Megatron stores state_dict["model"] as its modules' own state dicts ----------

def nest(flat: Tensors) -> dict[str, Any]:
    """``language_model.encoder.layers.0.x.weight`` -> ``{"language_model": {"encoder": {"layers.0.x.weight"
    …}}}``: the encoder is one module's flat state dict; embeddings and heads nest down to ``weight``."""
    root: dict[str, Any] = {}
    for name, t in flat.items():
        if name.startswith(ENC):
            root.setdefault("language_model", {}).setdefault("encoder", {})[name[len(ENC):]] = t
            continue
        d = root
        *path, leaf = name.split(".")
        for p in path:
            d = d.setdefault(p, {})
        d[leaf] = t
    return root


def flatten(nested: dict[str, Any], prefix: str = "") -> Tensors:
    """Inverse of :func:`nest` (keys joined with dots; Megatron-DeepSpeed's ``transformer`` = encoder)."""
    out: Tensors = {}
    for k, v in nested.items():
        key = f"{prefix}{'encoder' if prefix == LM and k == 'transformer' else k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        elif isinstance(v, torch.Tensor):
            out[key] = v
    return out


def save_megatron(source: nn.Module | dict[str, torch.Tensor], directory: str | os.PathLike,
                  config: ModelConfig | None = None, *, iteration: int | None = None, tp: int = 1,
                  pp: int = 1, dtype: torch.dtype | None = None, **args: Any) -> Path:
    """Write ``source`` (a GPTModel/LLaMAModel at any TP size — every rank calls this — or our full
    state dict plus its ``config``) in Megatron-LM's layout, split for ``tp`` × ``pp`` ranks.

    ``iteration=None`` writes ``release/``, an int ``iter_{iteration:07d}/``. ``dtype`` casts the
    weights (``args.params_dtype``/``fp16``/``bf16`` follow). ``**args`` override or add fields of the
    saved ``args`` namespace (e.g. ``tokenizer_type``). Returns the iteration directory.
    """
    if isinstance(source, nn.Module):
        config = model_config(source)
    elif config is None:
        raise CheckpointError("save_megatron(state_dict, directory): pass config=ModelConfig(...) with a "
                              "state dict (a model carries its own)")
    _check_layout(config, tp, pp)  # before any collective: every rank refuses alike
    full = full_state_dict(source) if isinstance(source, nn.Module) else source  # collective over TP
    root = Path(directory)
    final = root / _iteration_name(iteration)
    if not is_writer():
        barrier()
        return final
    dtype = dtype or next(iter(full.values())).dtype
    meg = {k: v.detach().to("cpu", dtype) for k, v in to_megatron(full, config).items()}
    namespace = megatron_args(config, tp, pp, dtype, iteration or 0, **args)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                rank_dir = tmp / rank_dir_name(tp_rank, pp_rank, pp)
                rank_dir.mkdir(parents=True)
                shards = shard_stage(meg, config, tp, pp, tp_rank, pp_rank)
                torch.save({"args": namespace, "checkpoint_version": CHECKPOINT_VERSION,
                            "iteration": iteration or 0, "model": nest(shards)}, rank_dir / FILE_NAME)
                _fsync_file(rank_dir / FILE_NAME)
                _fsync_dir(rank_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)
    atomic_write_text(root / TRACKER_NAME, ("release" if iteration is None else str(iteration)) + "\n")
    barrier()
    return final


def _check_layout(config: ModelConfig, tp: int, pp: int) -> None:
    """Refuse, in one line, a TP × PP split Megatron-LM cannot represent."""
    if not (isinstance(tp, int) and isinstance(pp, int) and tp >= 1 and pp >= 1):
        raise CheckpointError(f"save_megatron: tp={tp!r}, pp={pp!r} must be ints >= 1")
    if config.num_experts:
        raise CheckpointError("save_megatron: MoE models (num_experts > 0) have no Megatron legacy layout "
                              "here; export a dense GPT/LLaMA")
    if config.num_layers % pp:
        raise CheckpointError(f"save_megatron: num_layers={config.num_layers} does not split evenly over "
                              f"pp={pp} stages (Megatron's split); choose pp dividing {config.num_layers}")
    if config.num_kv_heads % tp:
        raise CheckpointError(f"save_megatron: num_kv_heads={config.num_kv_heads} is not divisible by "
                              f"tp={tp}: Megatron gives every TP rank whole query groups; choose tp "
                              f"dividing {config.num_kv_heads}")
    try:
        config.validate_tp(tp)
    except ValueError as err:
        raise CheckpointError(f"save_megatron: {err}") from None


def megatron_iteration_dir(directory: str | os.PathLike, iteration: int | str | None = None) -> Path:
    """The iteration directory to read: ``iteration``'s ("release" or a number), the tracker's, or
    ``directory`` itself when it holds ``mp_rank_*`` directories."""
    root = Path(directory)
    if iteration is None and any(_RANK_DIR.match(p.name) for p in _children(root)):
        return root
    if iteration is None:
        tracker = root / TRACKER_NAME
        if not tracker.is_file():
            raise CheckpointError(f"{root} is not a Megatron-LM checkpoint: no {TRACKER_NAME} and no "
                                  "mp_rank_* directories; point at the directory save_megatron (or "
                                  "Megatron-LM's --save) wrote")
        text = tracker.read_text(errors="replace").strip()
        if text != "release" and not text.isdigit():
            raise CheckpointError(f"{tracker} holds {text[:40]!r}, not 'release' nor an iteration "
                                  "number: the checkpoint is damaged; write the right one into it")
        iteration = text
    if str(iteration) != "release" and not str(iteration).isdigit():
        raise CheckpointError(f"iteration={iteration!r}: pass 'release' or an iteration number")
    name = "release" if str(iteration) == "release" else _iteration_name(int(iteration))
    path = root / name
    if not path.is_dir():
        found = sorted(p.name for p in _children(root) if p.name == "release" or p.name.startswith("iter_"))
        raise CheckpointError(f"{path} is missing (found {found or 'no iteration directories'}): pick one "
                              "of those, or fix " + TRACKER_NAME)
    return path


def _children(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []


def _read_rank_file(path: Path) -> dict[str, Any]:
    """One ``model_optim_rng.pt`` through ``torch.load(weights_only=True)``, SAFE_GLOBALS allowed."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the Megatron checkpoint is incomplete (every "
                              "mp_rank_* directory needs its model_optim_rng.pt)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"the global {found.group(1)}" if found else "objects other than tensors"
        raise CheckpointError(f"{path} needs {what} to load (only tensors, plain containers and "
                              "argparse.Namespace are allowed), so it is not unpickled: it may run code; "
                              "re-save it with weights and args only") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read ({str(err).splitlines()[0][:160]}): the file is "
                              "damaged or truncated; copy it again") from None
    if not isinstance(value, dict) or not isinstance(value.get("model"), dict):
        raise CheckpointError(f"{path} holds no 'model' dict: not a Megatron-LM checkpoint file")
    return value


def load_megatron(directory: str | os.PathLike, iteration: int | str | None = None
                  ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Megatron-LM checkpoint at whatever TP × PP it was saved: its ModelConfig (from ``args``)
    and the full state dict in our names (vocab padding removed when ``args.vocab_size`` says how
    much; else the padded rows stay). Load it with ``load_full_state_dict(model, full)``."""
    path = megatron_iteration_dir(directory, iteration)
    grid = {}
    for p in _children(path):
        m = _RANK_DIR.match(p.name)
        if m:
            grid[int(m.group(1)), int(m.group(2) or 0)] = p
    if not grid:
        raise CheckpointError(f"{path} has no mp_rank_* directories: not a Megatron-LM iteration directory")
    first = _read_rank_file(grid[min(grid)] / FILE_NAME)
    version, args = first.get("checkpoint_version", 0.0), first.get("args")
    if not isinstance(version, (int, float)) or version < 2.0:
        raise CheckpointError(f"{path}: checkpoint_version {version!r}; only versions >= 2.0 (QKV rows "
                              "ordered head by head, Megatron-LM since 2020) are read; re-save it with a "
                              "current Megatron-LM")
    if args is None:
        raise CheckpointError(f"{path}: the checkpoint has no 'args' (model sizes); re-save it with a "
                              "Megatron-LM that stores them")
    tp, pp = getattr(args, "tensor_model_parallel_size", 1), getattr(args, "pipeline_model_parallel_size", 1)
    want = {rank_dir_name(t, s, pp) for t in range(tp) for s in range(pp)}
    found = {p.name for p in grid.values()}
    if found != want:
        missing, extra = sorted(want - found), sorted(found - want)
        raise CheckpointError(f"{path}: args say tp={tp} × pp={pp}, but the directories on disk do not "
                              f"match (missing {missing}, unexpected {extra}); the checkpoint is "
                              "incomplete or mixed: copy it again whole")
    config = config_from_args(args, str(path))
    meg: dict[str, torch.Tensor] = {}
    offset = 0
    for s in range(pp):
        files = [first if (t, s) == min(grid) else _read_rank_file(grid[t, s] / FILE_NAME) for t in range(tp)]
        shards = [flatten(f["model"]) for f in files]
        stage = join_shards(shards, config, str(grid[0, s]))
        count = 0
        for name, t in stage.items():
            m = re.match(r"^language_model\.encoder\.layers\.(\d+)\.(.*)$", name)
            if m:  # local layer index -> global
                count = max(count, int(m.group(1)) + 1)
                name = f"language_model.encoder.layers.{int(m.group(1)) + offset}.{m.group(2)}"
            meg.setdefault(name, t)  # word_embeddings_for_head: the last stage's copy of stage 0's
        offset += count
    if offset != config.num_layers:
        raise CheckpointError(f"{path}: the stages hold {offset} layers, args say num_layers="
                              f"{config.num_layers}: the checkpoint is damaged or mixed")
    try:
        return config, from_megatron(meg, config)
    except KeyError as err:
        raise CheckpointError(f"{path}: Megatron tensor {err} is missing for a {config.num_layers}-layer "
                              f"{config.name} model: the checkpoint is damaged or of another model") from None
