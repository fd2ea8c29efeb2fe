"""Checkpoints on disk: safetensors weights + JSON config, written atomically, loadable at any TP size.

Layout (Megatron's: one directory per iteration and a ``latest`` pointer)::

    checkpoints/
      latest                  "iter_0000200" — rewritten last: the commit point of a save
      iter_0000100/
        model.safetensors     FULL weights (TP shards gathered, vocab padding removed), fp32 or bf16
        config.json           ModelConfig.to_dict(): enough to rebuild the model
        metadata.json         step, model class, the TP/PP/DP it was saved from, tensor shapes, user data
      iter_0000200/ ...

A training checkpoint (:mod:`minimegatron.training.checkpointing`) is the same directory plus
``optimizer.safetensors``, ``trainer.json`` and ``rng.safetensors``: everything here still applies.

Why full weights: a full tensor is TP-independent, so "save at TP=2, load at TP=1 (or 4)" is just
"each rank keeps its slice" (:mod:`minimegatron.checkpoint.reshape`). The price is one all-gather per
tensor at save time and one rank writing everything — fine up to a few billion parameters.

Atomicity. A save writes a whole new directory ``.tmp-iter_…`` next to the others, ``fsync``s every
file and the directory, renames it into place with ``os.replace`` and only then rewrites ``latest``
(again through a temp file + ``fsync`` + ``os.replace``). A crash or a kill at any moment leaves
``latest`` naming a complete checkpoint: the previous one until the very last rename, the new one
after it. Half-written ``.tmp-*`` directories are ignored, and the next save deletes those older than
``STALE_TMP_SECONDS`` (younger ones may belong to a save still running in another process).
Re-saving a step moves the old directory aside (``.tmp-old-iter_…``) before renaming the new one in;
a crash between the two renames leaves ``latest`` naming a missing directory, so readers fall back to
the moved-aside copy and the next save renames it back.

Safety. Only safetensors and JSON are read: no pickle, so loading a checkpoint cannot execute code.
Finding and reading the files (each damaged one named) is :mod:`minimegatron.checkpoint.files`; its
names are importable from here too (``from minimegatron.checkpoint.io import read_json`` works).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minimegatron.checkpoint.files import (CONFIG_NAME, DAMAGED_FIX, FORMAT, FORMAT_VERSION, LATEST_NAME,
                                           METADATA_NAME, WEIGHTS_NAME, check_format, check_safetensors,
                                           checkpoint_dir, find_checkpoint, iteration_name, load_config,
                                           open_safetensors, read_json, verify_checkpoint)
from minimegatron.checkpoint.reshape import (CheckpointError, barrier, check_config_matches,
                                             full_state_dict, is_writer, load_full_state_dict,
                                             model_config, parallel_state_of)
from minimegatron.config import ModelConfig
from minimegatron.models import family_of, model_class
from minimegatron.mpu.state import ParallelState

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "read_checkpoint", "write_iteration",
           "weights_metadata", "atomic_write_text",
           # re-exported from checkpoint.files, where they live:
           "load_config", "checkpoint_dir", "find_checkpoint", "iteration_name", "read_json",
           "check_safetensors", "open_safetensors", "verify_checkpoint",
           "DAMAGED_FIX", "WEIGHTS_NAME", "CONFIG_NAME", "METADATA_NAME", "LATEST_NAME"]

STALE_TMP_SECONDS = 600.0  # a .tmp-* directory untouched this long is debris of a dead save


# ---- atomic file primitives -----------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (POSIX: fsync the directory itself)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees either the old or the new content, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


atomic_write_text = _atomic_write_text  # public: the training log reuses it


# ---- save ------------------------------------------------------------------------------------------

def _last_touched(path: Path) -> float:
    """The newest mtime of a directory and the files in it (a large file being written keeps it fresh)."""
    try:
        return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.iterdir()])
    except OSError:  # vanished meanwhile (another save finished): not ours to delete
        return float("inf")


def _clean_up(root: Path) -> None:
    """Before a save: rename back an iteration a crashed re-save left moved aside, then delete
    ``.tmp-*`` debris older than ``STALE_TMP_SECONDS`` (a younger one may be a save in progress)."""
    for aside in sorted(root.glob(".tmp-old-iter_*")):
        name = aside.name[len(".tmp-old-"):].rsplit("-", 1)[0]  # iter_XXXXXXX
        if not (root / name).exists() and (aside / WEIGHTS_NAME).is_file():
            os.replace(aside, root / name)
    now = time.time()
    for stale in root.glob(".tmp-*"):
        if stale.is_dir() and (not _writer_alive(stale) or now - _last_touched(stale) > STALE_TMP_SECONDS):
            shutil.rmtree(stale, ignore_errors=True)


def _tmp_name(name: str) -> str:
    """``.tmp-iter_…-{random}-{host}.{pid}``: the writer is in the name, so its debris is recognised."""
    return f".tmp-{name}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}.{os.getpid()}"


def _writer_alive(tmp: Path) -> bool:
    """False only when ``tmp`` was written by a process of this host that no longer runs."""
    host, _, pid = tmp.name.split("-", 3)[-1].rpartition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's (shared filesystem) or an old name: age decides
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        pass
    return True


def write_iteration(root: Path, step: int, tensors: dict[str, torch.Tensor], config: ModelConfig,
                    metadata: dict[str, Any], extra_files: dict[str, Any] | None = None) -> Path:
    """Write one iteration directory atomically and move ``latest`` to it (single writer rank).

    ``extra_files``: more files for the same directory, committed with the weights — a name ending in
    ``.safetensors`` maps to a dict of tensors, any other name to a JSON-serialisable object.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _clean_up(root)  # debris of an earlier interrupted save
    final = root / iteration_name(step)
    tmp = root / _tmp_name(final.name)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": FORMAT})
        _fsync_file(tmp / WEIGHTS_NAME)
        for name, content in (extra_files or {}).items():
            if name.endswith(".safetensors"):
                save_file({k: v.detach().cpu().contiguous() for k, v in content.items()},
                          str(tmp / name), metadata={"format": "pt", "producer": FORMAT})
                _fsync_file(tmp / name)
            else:
                _write_json(tmp / name, content)
        _write_json(tmp / CONFIG_NAME, config.to_dict())
        _write_json(tmp / METADATA_NAME, metadata)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)
    _atomic_write_text(root / LATEST_NAME, final.name + "\n")  # the commit point
    return final


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the fully written directory ``tmp`` appear as ``final`` in one rename (fsynced), replacing
    an earlier ``final``: that one is moved aside first and put back if the rename fails; ``tmp`` never
    outlives a failure. A kill between the two renames is recovered by ``_clean_up``/``checkpoint_dir``."""
    root, trash = final.parent, None
    try:
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first
            trash = root / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
        os.replace(tmp, final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and trash.exists() and not final.exists():
            os.replace(trash, final)  # put the old one back where the pointer expects it
        raise


_write_checkpoint = write_iteration


def weights_metadata(step: int, model_class: str, saved_from: dict[str, Any],
                     tensors: dict[str, torch.Tensor], user: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """The ``metadata.json`` of a checkpoint: format, step, model class, layout, tensor shapes."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "model_class": model_class, "torch_version": torch.__version__, "saved_from": saved_from,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in tensors.items()},
            "user": user or {}}


def save_checkpoint(model: torch.nn.Module, directory: str | os.PathLike, step: int = 0,
                    metadata: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Save ``model`` (any TP size) as full weights under ``directory/iter_{step}``; returns that path.

    Collective: every rank of the world must call it (the shards are all-gathered over TP, then all
    ranks wait at a barrier); global rank 0 writes. ``metadata`` is any JSON-serialisable dict, stored as is;
    ``dtype`` (e.g. ``torch.bfloat16``) converts floating tensors before writing.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if metadata is not None:
        try:
            json.dumps(metadata)
        except TypeError as err:
            raise ValueError(f"metadata must be JSON-serialisable ({err}); store tensors as weights, "
                             "not metadata") from None
    state = parallel_state_of(model)
    config = model_config(model)
    tensors = full_state_dict(model)  # collective over TP
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    path = Path(directory) / iteration_name(step)
    if is_writer():
        meta = weights_metadata(step, type(model).__name__,
                                {"tp": state.tp, "pp": state.pp, "dp": state.dp}, tensors, metadata)
        path = write_iteration(Path(directory), step, tensors, config, meta)
    barrier()  # nobody returns before the checkpoint is committed
    return path


# ---- load ------------------------------------------------------------------------------------------

def read_checkpoint(directory: str | os.PathLike, step: int | None = None
                    ) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """(full weights, config, metadata) of a checkpoint, read without building a model (no pickle)."""
    path = checkpoint_dir(directory, step)
    metadata = read_json(path / METADATA_NAME)
    check_format(metadata, path)
    config = load_config(path)
    with open_safetensors(path / WEIGHTS_NAME) as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors, config, metadata


def load_checkpoint(model: torch.nn.Module, directory: str | os.PathLike, step: int | None = None
                    ) -> dict[str, Any]:
    """Load a checkpoint (saved at any TP size) into ``model`` at its own TP size; returns metadata.

    Every rank reads the full tensors and keeps its shard (``shard_weight`` with each parameter's
    ``partition_dim``/``partition_stride``). The config is checked first, field by field, then every
    tensor's name and full shape; a mismatch raises :class:`CheckpointError` naming it and the fix.
    """
    tensors, config, metadata = read_checkpoint(directory, step)
    check_config_matches(config, model_config(model), where=str(checkpoint_dir(directory, step)))
    load_full_state_dict(model, tensors)
    return metadata


def load_model(directory: str | os.PathLike, state: ParallelState | None = None, step: int | None = None
               ) -> torch.nn.Module:
    """Build the saved model class (GPTModel / LLaMAModel) from the checkpoint's config at ``state``'s
    TP size and load its weights: ``load_config`` + constructor + ``load_checkpoint`` in one call."""
    name = read_json(checkpoint_dir(directory, step) / METADATA_NAME).get("model_class")
    family = family_of(name)  # the registry: minimegatron.models
    if family is None:
        raise CheckpointError(f"checkpoint was saved from a {name!r}; build that model yourself from "
                              "load_config(path) and call load_checkpoint(model, path)")
    model = model_class(family)(load_config(directory, step), state or ParallelState())
    load_checkpoint(model, directory, step)
    return model
