"""Preflight: the machine and the files a run needs, checked before any rank starts.

A run that cannot finish should not start: a read-only ``--save`` found out after an hour of training,
or a model that the kernel kills mid-run for lack of memory, wastes the hour. :func:`validate
<minimegatron.training.args.validate>` calls these in the parent process, each raising a ``ValueError``
that names the flag and the fix:

    check_machine(cfg, model)        --save / --out-dir writable (a temp file is created and removed),
                                     the checkpoints fit on the --save disk, the model in memory
    check_data_path(prefix)          --data is the PREFIX of a .bin/.idx pair (not a directory, not
                                     PREFIX.bin, not half a pair)
    check_token_range(prefix, V)     every token id of the dataset lies in [0, V)

``check_machine`` runs only in the parent (``validate(preflight=True)``); the data checks also run on
every rank (cheap there: the token range is memoised, and forked ranks inherit the parent's memo).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from minimegatron.config import ModelConfig
from minimegatron.errors import os_error_advice
from minimegatron.training.config import TrainConfig

__all__ = ["check_machine", "check_writable", "check_save_space", "check_memory", "checkpoint_bytes",
           "check_data_path", "check_token_range"]


def check_machine(cfg: TrainConfig, model: ModelConfig) -> None:
    """--save and --out-dir can be written, the checkpoints fit on the disk, the model in memory."""
    for name, flag in (("save", "--save"), ("out_dir", "--out-dir")):
        if getattr(cfg, name):
            where = check_writable(flag, getattr(cfg, name))
            if name == "save":
                check_save_space(cfg, model, where)
    check_memory(cfg, model)


# ---- writable directories -------------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    """``path`` itself, or the closest of its ancestors that exists (a broken link counts)."""
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def check_writable(flag: str, path: str) -> str:
    """Raise ValueError unless directory ``path`` exists and is writable, or can be created: a temp
    file is created and removed in it (or in its nearest existing ancestor). Returns that directory."""
    target = os.path.abspath(path)
    where = _nearest_existing(target)
    if not os.path.isdir(where):
        if where == target:
            raise ValueError(f"{flag} {path} is a file; give a directory")
        raise ValueError(f"{flag} {path}: {where} is a file, not a directory, so nothing can be created "
                         f"under it; give a path whose parents are directories (e.g. {flag} "
                         f"{os.path.basename(target)})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".minimegatron-write-test-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        inside = "in it" if where == target else f"in {where}, where it would be created"
        raise ValueError(f"{flag} {path}: cannot write {inside} ({err.strerror}); "
                         f"{os_error_advice(err) or 'choose another directory'} (e.g. {flag} "
                         f"./{os.path.basename(target) or 'out'})")
    return where


# ---- disk space and memory ------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def checkpoint_bytes(cfg: TrainConfig, model: ModelConfig) -> int:
    """About how many bytes one checkpoint of this run takes: weights, Adam's two fp32 moments (and the
    fp32 master weights under bf16), every rank's random generators, the JSON files."""
    from minimegatron.layers.language_model import count_parameters

    params = count_parameters(model)
    per_param = (2 + 4 if cfg.dtype == "bf16" else 4) + 8
    return params * per_param + cfg.world_size * 8_000 + 64_000


def check_save_space(cfg: TrainConfig, model: ModelConfig, where: str) -> None:
    """Refuse a run whose checkpoints cannot fit on the --save disk (found out only at the end)."""
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    steps = set(range(cfg.save_interval, cfg.steps + 1, cfg.save_interval)) if cfg.save_interval else set()
    saves = len(steps | {cfg.steps})
    each = checkpoint_bytes(cfg, model)
    if saves * each > free:
        what = (f"{saves} checkpoints of about {_size(each)} each (every --save-interval "
                f"{cfg.save_interval} steps and at the end)" if saves > 1 else
                f"its checkpoint (about {_size(each)})")
        raise ValueError(f"--save {cfg.save}: this run writes {what}, but the disk holding {where} has only "
                         f"{_size(free)} free; free some space, "
                         f"{'save less often (a larger --save-interval), ' if saves > 1 else ''}or give "
                         "--save a directory on another disk")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(cfg: TrainConfig, model: ModelConfig) -> None:
    """Refuse, on simulated CPU ranks, a model that cannot fit in this machine's memory (the kernel
    would kill a rank mid-run). A lower bound: weights + gradients + Adam's moments (16 bytes per
    parameter) for one replica, weights + gradients for the others, one layer's attention scores."""
    from minimegatron.device import device_type

    try:
        on_cpu = device_type() == "cpu"
    except ValueError:  # a bad MINIMEGATRON_DEVICE: reported where the device is chosen
        return
    if "RANK" in os.environ or not on_cpu:
        return  # a launcher's ranks, or an accelerator: its own memory, not this machine's
    available = _available_memory()
    if available is None:
        return
    from minimegatron.layers.language_model import count_parameters

    params = count_parameters(model)
    scores = cfg.micro_batch_size * model.num_attention_heads * cfg.seq_len ** 2 * 4 * cfg.dp
    need = params * 16 + params * 8 * (cfg.dp - 1) + scores
    if need > available:
        raise ValueError(
            f"this run needs at least {_size(need)} of memory (the model has {params:,} parameters: "
            f"weights, gradients and Adam's moments take 16 bytes each; plus the attention scores of "
            f"{cfg.micro_batch_size}·{model.num_attention_heads} heads · {cfg.seq_len}² tokens), but "
            f"this machine has {_size(available)} available; use a smaller --hidden-size, --num-layers, "
            f"--vocab-size, --seq-len or --micro-batch-size")


# ---- the dataset ----------------------------------------------------------------------------------
def check_data_path(prefix: str) -> None:
    """--data names an indexed dataset's PREFIX (PREFIX.bin + PREFIX.idx): say what is wrong with it."""
    missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if not missing:
        return
    build = "build one with python -m minimegatron.data.preprocess"
    stem, ext = os.path.splitext(prefix)
    if ext in (".bin", ".idx") and all(os.path.isfile(stem + e) for e in (".bin", ".idx")):
        raise ValueError(f"data={prefix!r}: --data takes the dataset's PREFIX, without {ext}: use --data "
                         f"{stem}")
    if os.path.isdir(prefix):
        found = sorted(str(Path(prefix) / p.stem) for p in Path(prefix).glob("*.idx")
                       if p.with_suffix(".bin").is_file())
        raise ValueError(f"data={prefix!r} is a directory; --data takes the PREFIX of a dataset's .bin/.idx "
                         f"pair (DIR/NAME for DIR/NAME.bin + DIR/NAME.idx)"
                         + (f": e.g. --data {found[0]}" if found else f"; none is in it: {build}"))
    if len(missing) == 1:
        raise ValueError(f"data={prefix!r}: {prefix}{missing[0]} is missing (its partner "
                         f"{prefix}{'.idx' if missing[0] == '.bin' else '.bin'} exists): the pair is "
                         f"incomplete; rebuild both ({build})")
    raise ValueError(f"data={prefix!r}: neither 'random' nor the prefix of an indexed dataset "
                     f"({prefix}.bin/.idx not found); {build}")


def _token_range(path: str, dtype: str, chunk: int) -> tuple[int, int]:
    """(min, max) token id of a .bin, memoised per file version: forked ranks inherit the parent's."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _TOKEN_RANGES:
        import numpy as np

        tokens = np.memmap(path, mode="r", dtype=np.dtype(dtype))  # (num_tokens,)
        lo, hi = None, None
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk]
            lo = int(part.min()) if lo is None else min(lo, int(part.min()))
            hi = int(part.max()) if hi is None else max(hi, int(part.max()))
        _TOKEN_RANGES[key] = (lo, hi)
    return _TOKEN_RANGES[key]


_TOKEN_RANGES: dict[tuple[str, int, int], tuple[int, int]] = {}  # a cache, not a setting


def check_token_range(prefix: str, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Raise if the indexed dataset at ``prefix`` holds a token id outside [0, vocab_size).

    Scans the memory-mapped .bin in chunks (skipped when the token dtype cannot hold such an id),
    so a tokenizer/model vocab mismatch fails here instead of inside the embedding on every rank."""
    import numpy as np

    from minimegatron.data.indexed_dataset import IndexedDataset, data_file_path

    dataset = IndexedDataset(prefix)  # checks that .bin and .idx belong together
    info = np.iinfo(dataset.dtype)
    if dataset.num_tokens == 0 or (info.min >= 0 and info.max < vocab_size):
        return
    lo, hi = _token_range(str(data_file_path(prefix)), dataset.dtype.str, chunk)
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(
            f"data={prefix!r} holds token id {bad} but the model's vocab_size={vocab_size} (ids must "
            f"lie in [0, {vocab_size})): train with --vocab-size {max(hi + 1, vocab_size)} or more "
            "(the tokenizer's vocab size), or re-tokenize the corpus with the model's tokenizer")
