"""The files of a checkpoint directory, found and read safely: each damaged file named, no pickle.

What is in a checkpoint (written by :mod:`minimegatron.checkpoint.io`; the last three only by a
training run, :mod:`minimegatron.training.checkpointing`)::

    checkpoints/
      latest                  "iter_0000200": the iteration a reader loads (LATEST_NAME)
      iter_0000200/           iteration_name(200)
        model.safetensors     WEIGHTS_NAME       full weights
        config.json           CONFIG_NAME        the ModelConfig
        metadata.json         METADATA_NAME      format, step, model class, layout, tensor shapes
        optimizer.safetensors OPTIMIZER_NAME     AdamW's moments (and fp32 master weights)
        trainer.json          TRAINER_NAME       step, samples consumed, the TrainConfig, the layout
        rng.safetensors       RNG_NAME           every rank's random generators

Finding one: :func:`checkpoint_dir` (``latest``'s iteration, or a step's; a clear error when there is
none) and :func:`find_checkpoint` (None when the directory holds no checkpoint at all).

Reading one: only safetensors and JSON are ever opened, so loading a checkpoint cannot execute code.
Each reader turns a missing, truncated, damaged or foreign file into a ``CheckpointError`` naming the
file and the fix — not json's bare "Expecting value: line 1 column 1", nor safetensors' errors that do
not say which file. :func:`verify_checkpoint` runs them all on an iteration directory (headers only,
no weights), so ``--load`` fails before any rank starts.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError, safe_open

from minimegatron.checkpoint.reshape import CheckpointError
from minimegatron.config import ModelConfig

__all__ = ["checkpoint_dir", "find_checkpoint", "iteration_name", "load_config", "read_json",
           "check_safetensors", "open_safetensors", "check_format", "verify_checkpoint", "DAMAGED_FIX",
           "WEIGHTS_NAME", "CONFIG_NAME", "METADATA_NAME", "LATEST_NAME", "OPTIMIZER_NAME", "TRAINER_NAME",
           "RNG_NAME", "FORMAT", "FORMAT_VERSION"]

WEIGHTS_NAME, CONFIG_NAME, METADATA_NAME, LATEST_NAME = (
    "model.safetensors", "config.json", "metadata.json", "latest")
OPTIMIZER_NAME, TRAINER_NAME, RNG_NAME = "optimizer.safetensors", "trainer.json", "rng.safetensors"
FORMAT = "minimegatron-checkpoint"
FORMAT_VERSION = 1
DAMAGED_FIX = "the checkpoint is damaged; re-save it or point --load elsewhere"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


# ---- reading a file, each error naming it ----------------------------------------------------------

def read_json(path: str | os.PathLike, kind: type = dict) -> Any:
    """The JSON object in ``path``; a missing, unreadable or damaged file raises CheckpointError
    naming it (not json's bare "Expecting value: line 1 column 1")."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-save it or point "
                              "--load elsewhere") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not valid JSON (not even UTF-8 text): {DAMAGED_FIX}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): "
                              f"{DAMAGED_FIX}") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not a JSON "
                              f"{'object' if kind is dict else kind.__name__}: {DAMAGED_FIX}")
    return value


def _what_it_is(head: bytes) -> str:
    """A guess at what a file that is not safetensors holds, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (what torch.save writes: a pickle inside)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (what torch.save wrote before torch 1.6, or pickle.dump)"
    if not head:
        return "an empty file"
    return "not a safetensors file"


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Check a .safetensors file without loading any tensor: its header is JSON and the file holds
    every byte the header promises. Returns the header (name -> dtype, shape, data_offsets).

    Raises CheckpointError naming the file and the fix for a missing, truncated or foreign file
    (a pickle renamed .safetensors is refused here, never unpickled)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
            n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
            fh.seek(8)
            header = fh.read(n) if n <= min(size - 8, MAX_HEADER_BYTES) and head[8:9] == b"{" else None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-save it or point "
                              "--load elsewhere") from None
    if size < 9 and not _what_it_is(head).startswith(("a zip", "a Python")):
        raise CheckpointError(f"{path} is {'empty' if not size else f'truncated: only {size} bytes'} (an "
                              f"interrupted copy or save?); {DAMAGED_FIX}")
    if head[8:9] != b"{":
        kind = _what_it_is(head)
        raise CheckpointError(
            f"{path} is {kind}, not safetensors: minimegatron reads only safetensors (a pickle can run "
            "code when it is loaded, so it is never opened); re-save the checkpoint with --save (or "
            "save_checkpoint), or point --load at a checkpoint minimegatron wrote")
    if header is None:
        raise CheckpointError(f"{path} is truncated: {size} bytes, but its header alone needs {8 + n} "
                              f"(an interrupted copy or save?); {DAMAGED_FIX}")
    try:
        meta = json.loads(header)
        ends = [int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise CheckpointError(f"{path} has a damaged safetensors header: {DAMAGED_FIX}") from None
    data = size - 8 - n
    if max(ends, default=0) > data:
        raise CheckpointError(f"{path} is truncated: {size} bytes, but its header promises "
                              f"{8 + n + max(ends)} (an interrupted copy or save?); {DAMAGED_FIX}")
    return meta


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """``safe_open(path)`` after :func:`check_safetensors`; any error reading it is a CheckpointError
    naming the file (safetensors' own errors do not say which file)."""
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except SafetensorError as err:
        raise CheckpointError(f"{path} cannot be read ({err}): {DAMAGED_FIX}") from None


# ---- which iteration directory ---------------------------------------------------------------------

def iteration_name(step: int) -> str:
    """``iter_0000200``: the directory of the checkpoint taken after ``step`` optimizer steps."""
    return f"iter_{step:07d}"


def checkpoint_dir(directory: str | os.PathLike, step: int | None = None) -> Path:
    """The iteration directory to read: ``step``'s, or the one ``latest`` names. Clear error if none."""
    root = Path(directory)
    if (root / WEIGHTS_NAME).is_file() and step is None:
        return root  # pointed straight at an iteration directory
    if step is not None:
        path = root / iteration_name(step)
        if not path.exists():  # moved aside by a re-save that died (see io._clean_up)
            path = _moved_aside(root, path.name) or path
        if not (path / WEIGHTS_NAME).is_file():
            found = sorted(p.name for p in root.glob("iter_*")) if root.is_dir() else []
            raise CheckpointError(f"no checkpoint for step {step} at {path}; found {found or 'none'}: "
                                  "pick one of those steps (--load-step), or leave the step out to load "
                                  f"the latest")
        return path
    latest = root / LATEST_NAME
    if not latest.is_file():
        raise CheckpointError(f"{root} holds no checkpoint (no '{LATEST_NAME}' file and no "
                              f"{WEIGHTS_NAME}); save one with save_checkpoint(model, '{root}') first")
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        found = sorted(p.name for p in root.glob("iter_*"))
        raise CheckpointError(f"{latest} does not name an iteration directory (it should hold e.g. "
                              f"'iter_0000200'): {DAMAGED_FIX}; found {found or 'no iter_* directories'}"
                              f"{' (--load-step picks one)' if found else ''}")
    path = root / name
    if not path.exists():  # a re-save of this step died between its two renames: the old copy
        path = _moved_aside(root, path.name) or path  # is complete beside it (the next save renames it back)
    if not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{latest} names {path.name}, which has no {WEIGHTS_NAME}: the "
                              "directory was modified by hand; point 'latest' at a complete iter_* dir "
                              "(or pick one with --load-step)")
    return path


def _moved_aside(root: Path, name: str) -> Path | None:
    """The complete old copy of ``name`` that a re-save moved aside (``.tmp-old-{name}-…``), if any."""
    for aside in sorted(root.glob(f".tmp-old-{name}-*")):
        if (aside / WEIGHTS_NAME).is_file() and (aside / METADATA_NAME).is_file():
            return aside
    return None


def find_checkpoint(directory: str | os.PathLike, step: int | None = None) -> Path | None:
    """The iteration directory to resume from: ``step``'s, else ``latest``'s; None if the directory
    holds no checkpoint at all (a first run with ``--load`` = ``--save``)."""
    root = Path(directory)
    if step is None and not (root / LATEST_NAME).is_file() and not (root / WEIGHTS_NAME).is_file():
        return None
    return checkpoint_dir(root, step)


# ---- one iteration directory, whole ----------------------------------------------------------------

def load_config(directory: str | os.PathLike, step: int | None = None) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with: build the model from it, then load_checkpoint."""
    path = checkpoint_dir(directory, step) / CONFIG_NAME
    try:
        return ModelConfig.from_dict(read_json(path))
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:  # unknown fields, impossible sizes: not ours, or edited
        raise CheckpointError(f"{path} is not a minimegatron model config ({err}): {DAMAGED_FIX} "
                              "(a Hugging Face directory? use minimegatron.checkpoint.from_hf)") from None


def check_format(metadata: dict[str, Any], path: Path) -> None:
    """Refuse a metadata.json that is not of a minimegatron checkpoint this version can read."""
    if metadata.get("format") != FORMAT or metadata.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a minimegatron checkpoint of format version <= "
                              f"{FORMAT_VERSION} (metadata says {metadata.get('format')!r} v"
                              f"{metadata.get('format_version')}); for Hugging Face directories use "
                              "minimegatron.checkpoint.from_hf")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Read an iteration directory's JSON files and safetensors headers (no weights): every damaged or
    foreign file raises CheckpointError naming it, before anything is loaded."""
    path = Path(path)
    if not (path / METADATA_NAME).is_file() and (path / CONFIG_NAME).is_file():
        config = read_json(path / CONFIG_NAME)
        if "model_type" in config:  # transformers' save_pretrained
            raise CheckpointError(f"{path} is a Hugging Face model directory ({config['model_type']!r}), not "
                                  "a minimegatron checkpoint: convert it with minimegatron.checkpoint.from_hf"
                                  f"({str(path)!r}), save_checkpoint(model, DIR), then --load DIR")
    metadata = read_json(path / METADATA_NAME)
    check_format(metadata, path)
    load_config(path)
    for name in sorted(p.name for p in path.glob("*.safetensors")):
        check_safetensors(path / name)
    for name in sorted(p.name for p in path.glob("*.json")):
        read_json(path / name)
