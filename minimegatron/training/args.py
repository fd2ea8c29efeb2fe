"""TrainConfig: every knob of a pretraining run, checked before any rank starts.

The layout is ``world = tp · pp · dp`` ranks. One optimizer step consumes ``global_batch_size``
sequences: each of the ``dp`` replicas takes ``global_batch_size / dp`` of them, in
``micro_batch_size`` pieces — the gradient-accumulation steps, which are also the micro-batches the
pipeline schedule interleaves::

    global_batch_size = micro_batch_size · num_micro_batches · dp

:func:`validate` raises a ``ValueError`` naming the problem and the fix for every combination that
cannot work (in the parent process, before ``launch`` forks a single rank) — including ``load``
pointing at a checkpoint of another model (:func:`check_resume` names the fields and the flags).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

from minimegatron.config import ModelConfig, gpt_config, llama_config

MODELS = ("gpt", "llama")
MODEL_CLASS = {"gpt": "GPTModel", "llama": "LLaMAModel"}  # the plain model each trains
CLI_MODEL_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                    "ffn_hidden_size")  # the ModelConfig fields the command line sets
DTYPES = ("fp32", "bf16")
RECOMPUTE = ("none", "selective", "full")


@dataclass
class TrainConfig:
    """A pretraining run. ``model_config`` (a full ModelConfig) overrides the size fields."""

    model: str = "llama"
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 2
    global_batch_size: int = 8
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_kv_heads: int | None = None
    ffn_hidden_size: int | None = None  # None: the model's default (4h GPT, ≈8/3·h LLaMA)
    vocab_size: int = 512
    seq_len: int = 64
    dropout: float = 0.0
    model_config: ModelConfig | None = None
    steps: int = 20
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    zero_stage: int = 0
    sequence_parallel: bool = False
    recompute: str = "none"
    dtype: str = "fp32"
    eval_interval: int = 0          # 0: no evaluation
    eval_iters: int = 2             # global batches per evaluation
    data: Any = "random"            # "random", an indexed dataset prefix, or a torch Dataset whose
    valid_data: Any = None          # items are {"tokens": (s,), "labels": (s,)} (+ one to evaluate on)
    split: str = "949,50,1"
    seed: int = 1234
    out_dir: str | None = None      # loss log (jsonl) + loss curve (png) go here when set
    save: str | None = None         # checkpoint directory: iter_XXXXXXX/ + latest (see checkpointing.py)
    save_interval: int = 0          # save every N steps (0: only at the end); always at the end
    load: str | None = None         # resume from this directory's latest checkpoint (none there: start)
    load_step: int | None = None    # ... or from its checkpoint of this step
    progress: bool = True           # tqdm bar on rank 0
    timeout: float = 0.0            # wall-clock limit of the whole run on simulated ranks (0: none)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per step on each data-parallel replica (gradient-accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (a Dataset given as data is recorded by its class name)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("model_config", "valid_data")}
        if not isinstance(self.data, str):
            out["data"] = type(self.data).__name__
        return out

    def to_model_config(self) -> ModelConfig:
        if self.model_config is not None:
            return self.model_config
        preset = gpt_config if self.model == "gpt" else llama_config
        return preset(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
                      num_kv_heads=self.num_kv_heads, ffn_hidden_size=self.ffn_hidden_size,
                      max_seq_len=self.seq_len, dropout=self.dropout)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not a size


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
        _fail(f"data={prefix!r} holds token id {bad} but the model's vocab_size={vocab_size} (ids must "
              f"lie in [0, {vocab_size})): train with --vocab-size {max(hi + 1, vocab_size)} or more "
              "(the tokenizer's vocab size), or re-tokenize the corpus with the model's tokenizer")


def validate(cfg: TrainConfig) -> ModelConfig:
    """Raise ValueError for any layout/argument that cannot work; return the ModelConfig to build."""
    if cfg.model not in MODELS:
        _fail(f"model={cfg.model!r}: choose one of {MODELS}")
    for name in ("tp", "pp", "dp", "micro_batch_size", "global_batch_size", "steps", "seq_len",
                 "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "eval_iters"):
        v = getattr(cfg, name)
        if not _is_int(v) or v < 1:
            _fail(f"{name} must be a positive int, got {v!r} ({type(v).__name__})")
    for name in ("warmup_steps", "zero_stage", "eval_interval", "save_interval", "seed",
                 "num_kv_heads", "ffn_hidden_size", "load_step"):
        v = getattr(cfg, name)
        if v is not None and (not _is_int(v) or v < 0):
            _fail(f"{name} must be >= 0 (an int), got {v!r} ({type(v).__name__})")
    if cfg.model_config is not None:
        if not isinstance(cfg.model_config, ModelConfig):
            _fail(f"model_config must be a minimegatron.config.ModelConfig, got "
                  f"{type(cfg.model_config).__name__}")
        family = cfg.model_config.name
        if family in MODELS and family != cfg.model:
            _fail(f"model={cfg.model!r} but model_config is a {family} config ({family}_config(...)): "
                  f"{MODEL_CLASS[cfg.model]} cannot be built from it; set model={family!r}, or build the "
                  f"config with {cfg.model}_config(...)")
    per_step = cfg.micro_batch_size * cfg.dp
    if cfg.global_batch_size % per_step:
        _fail(f"global_batch_size={cfg.global_batch_size} is not divisible by micro_batch_size·dp = "
              f"{cfg.micro_batch_size}·{cfg.dp} = {per_step}: each data-parallel replica must get a "
              f"whole number of micro-batches; e.g. use global_batch_size="
              f"{per_step * max(1, cfg.global_batch_size // per_step)}")
    if cfg.zero_stage not in (0, 1, 2):
        _fail(f"zero_stage={cfg.zero_stage!r}: this trainer supports ZeRO stage 0 (plain data parallel), "
              "1 (optimizer states sharded over dp) and, without a pipeline, 2")
    if cfg.zero_stage >= 2 and cfg.pp > 1:
        _fail(f"zero_stage={cfg.zero_stage} with pp={cfg.pp}: DeepSpeed's pipeline engine supports only "
              "ZeRO stage 0 or 1 (gradients are accumulated across micro-batches, so they cannot be "
              "sharded); use --zero-stage 1 or pp=1")
    if cfg.recompute not in RECOMPUTE:
        _fail(f"recompute={cfg.recompute!r}: choose one of {RECOMPUTE}")
    if cfg.dtype not in DTYPES:
        _fail(f"dtype={cfg.dtype!r}: choose one of {DTYPES}")
    if not cfg.lr > 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        _fail(f"learning rates lr={cfg.lr}, min_lr={cfg.min_lr}: need 0 <= min_lr <= lr and lr > 0")
    if cfg.warmup_steps < 0 or cfg.clip_grad < 0 or cfg.eval_interval < 0 or cfg.eval_iters < 1:
        _fail("warmup_steps, clip_grad and eval_interval must be >= 0 and eval_iters >= 1")
    model = cfg.to_model_config()
    model.validate_tp(cfg.tp)  # heads / kv heads / ffn divisible by tp
    if model.num_layers < cfg.pp:
        _fail(f"num_layers={model.num_layers} < pp={cfg.pp}: every pipeline stage needs at least one "
              "transformer layer; use more layers or fewer stages")
    if cfg.seq_len > model.max_seq_len:
        _fail(f"seq_len={cfg.seq_len} > the model's max_seq_len={model.max_seq_len}")
    if cfg.sequence_parallel and cfg.tp > 1 and cfg.seq_len % cfg.tp:
        _fail(f"sequence parallelism splits each sequence over tp={cfg.tp} ranks: seq_len={cfg.seq_len} "
              f"must be a multiple of {cfg.tp}")
    if not isinstance(cfg.data, str):
        for name in ("data", "valid_data"):
            d = getattr(cfg, name)
            if d is not None and not (hasattr(d, "__getitem__") and hasattr(d, "__len__") and len(d) > 0):
                _fail(f"{name} must be a non-empty map-style Dataset of {{'tokens', 'labels'}} items, "
                      f"got {type(d).__name__}")
        if cfg.eval_interval and cfg.valid_data is None:
            _fail("eval_interval > 0 with a Dataset as data needs valid_data (or set eval_interval=0)")
    elif cfg.data != "random" and not all(os.path.exists(cfg.data + ext) for ext in (".bin", ".idx")):
        _fail(f"data={cfg.data!r}: neither 'random' nor the prefix of an indexed dataset "
              f"({cfg.data}.bin/.idx not found); build one with python -m minimegatron.data.preprocess")
    elif cfg.data != "random":
        check_token_range(cfg.data, model.vocab_size)
        from minimegatron.data.indexed_dataset import IndexedDataset
        from minimegatron.data.samples import split_documents
        docs = IndexedDataset(cfg.data).num_documents if cfg.eval_interval else 0
        if cfg.eval_interval and len(range(*split_documents(docs, cfg.split)[1])) == 0:
            _fail(f"split={cfg.split!r} leaves the valid split of data={cfg.data!r} ({docs} documents) "
                  f"empty, but eval_interval={cfg.eval_interval} evaluates on it: give valid a share "
                  "(e.g. --split 949,50,1) or more documents, or set --eval-interval 0")
    if cfg.save_interval < 0 or (cfg.save_interval and not cfg.save):
        _fail(f"save_interval={cfg.save_interval} needs a directory to save to (--save DIR) and must be "
              ">= 0 (0: save only at the end)")
    if cfg.load_step is not None and (not cfg.load or cfg.load_step < 0):
        _fail(f"load_step={cfg.load_step} needs --load DIR and must be >= 0")
    for name in ("save", "out_dir", "load"):
        if getattr(cfg, name) and os.path.isfile(getattr(cfg, name)):
            _fail(f"--{name.replace('_', '-')} {getattr(cfg, name)} is a file; give a directory")
    rerun = cfg.load and os.path.abspath(cfg.load) == os.path.abspath(cfg.save or "")  # 1st run: none yet
    if cfg.load and not os.path.exists(cfg.load) and not rerun:
        _fail(f"--load {cfg.load} does not exist: point it at a checkpoint directory, or leave it out to "
              "start from scratch (--load equal to --save also starts there: a rerun resumes)")
    if cfg.load:
        check_resume(cfg, model)  # the checkpoint there (if any) holds this model, before --steps
    env_world = os.environ.get("WORLD_SIZE")
    if "RANK" in os.environ and env_world is not None and int(env_world) != cfg.world_size:
        _fail(f"the launcher started WORLD_SIZE={env_world} ranks but tp·pp·dp = {cfg.tp}·{cfg.pp}·"
              f"{cfg.dp} = {cfg.world_size}; change --dp (or tp/pp) so that the product matches")
    return model


def check_resume(cfg: TrainConfig, model: ModelConfig) -> None:
    """Raise CheckpointError if ``cfg.load`` holds a checkpoint of another model (what differs, and
    the flags that fix it). Part of :func:`validate`: runs before any rank starts."""
    from minimegatron.checkpoint.io import METADATA_NAME, find_checkpoint, load_config
    from minimegatron.checkpoint.reshape import IGNORED_CONFIG_FIELDS, CheckpointError
    from minimegatron.training.checkpointing import OPTIMIZER_NAME, TRAINER_NAME

    path = find_checkpoint(cfg.load, cfg.load_step)
    if path is None:
        return
    saved = load_config(path).to_dict()
    saved_class = json.loads((path / METADATA_NAME).read_text()).get("model_class")
    mine = model.to_dict()
    free = [k for k in IGNORED_CONFIG_FIELDS if k != "max_seq_len" or model.position_embedding != "learned"]
    diff = [k for k in sorted(saved) if k not in free and saved[k] != mine.get(k)]  # learned: seq_len rows
    lines = [f"{k}: {saved[k]!r} in the checkpoint, {mine.get(k)!r} in this run" for k in diff]
    if saved_class != MODEL_CLASS[cfg.model]:
        lines.insert(0, f"model: {saved_class} in the checkpoint, {MODEL_CLASS[cfg.model]} in this run")
    if lines:
        raise CheckpointError(f"--load {cfg.load}: {path.name} holds a different model than this run:\n  "
                              + "\n  ".join(lines) + f"\nFix: {_resume_fix(cfg, saved, saved_class, path)}, "
                              "or point --load at a checkpoint of this model, or leave --load out to start "
                              "from scratch.")
    if (path / TRAINER_NAME).is_file() and (path / OPTIMIZER_NAME).is_file():  # else: weights only, step 0
        step = int(json.loads((path / TRAINER_NAME).read_text())["step"])
        if step >= cfg.steps:  # --steps counts from 0: nothing would be trained
            _fail(f"--load {cfg.load}: {path.name} is already at step {step} >= --steps {cfg.steps}; "
                  f"--steps is the total, so raise it above {step}")


def _resume_fix(cfg: TrainConfig, saved: dict, saved_class: str, path: Path) -> str:
    """The command-line flags that rebuild the saved model (or, failing that, the Python way)."""
    from minimegatron.checkpoint.reshape import IGNORED_CONFIG_FIELDS

    flags = {k: saved[k] for k in CLI_MODEL_FIELDS[:4] if saved[k] != getattr(cfg, k)}
    if saved.get("position_embedding") == "learned" and saved.get("max_seq_len") != cfg.seq_len:
        flags["seq_len"] = saved["max_seq_len"]  # the learned position table's rows
    family = {v: k for k, v in MODEL_CLASS.items()}.get(saved_class, cfg.model)
    try:
        trial = replace(cfg, model=family, **flags).to_model_config().to_dict()
        flags.update({k: saved[k] for k in CLI_MODEL_FIELDS[4:] if trial[k] != saved[k]})  # not derived
        trial = replace(cfg, model=family, **flags).to_model_config().to_dict()
    except ValueError:  # these flags alone make no valid model
        trial = {}
    if cfg.model_config is None and all(trial.get(k) == v for k, v in saved.items()
                                        if k not in IGNORED_CONFIG_FIELDS):
        words = ([f"--model {family}"] if family != cfg.model else []) + [
            f"--{k.replace('_', '-')} {v}" for k, v in flags.items()]
        return f"train with the checkpoint's model ({' '.join(words)})"
    return ("build this run's model from the checkpoint: TrainConfig(model_config="
            f"minimegatron.checkpoint.load_config({str(path)!r}))")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minimegatron.train",
        description="Pretrain a small GPT or LLaMA with tensor, pipeline and data parallelism "
                    "(simulated CPU ranks, or under torchrun / the deepspeed launcher).")
    d = TrainConfig()
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=d.pp, help="pipeline stages")
    p.add_argument("--dp", type=int, default=None,
                   help="data-parallel replicas (default: WORLD_SIZE / (tp·pp) in a launcher, else 1)")
    ints = ("micro_batch_size", "global_batch_size", "num_layers", "hidden_size", "num_attention_heads",
            "num_kv_heads", "ffn_hidden_size", "vocab_size", "seq_len", "steps", "warmup_steps", "zero_stage",
            "eval_interval", "eval_iters", "seed")
    for name in ints:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=getattr(d, name))
    for name in ("lr", "min_lr", "weight_decay", "clip_grad", "dropout"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=getattr(d, name))
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--recompute", choices=RECOMPUTE, default=d.recompute)
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    p.add_argument("--data", default=d.data, help="'random' (synthetic) or an indexed dataset's PREFIX")
    p.add_argument("--split", default=d.split, help="train,valid,test weights for an indexed dataset")
    p.add_argument("--out-dir", dest="out_dir", default=None,
                   help="where to write train_log.jsonl and loss.png (default runs/<model>_tp_pp_dp)")
    p.add_argument("--save", default=None, help="checkpoint directory (iter_XXXXXXX/ + latest): full "
                   "weights + optimizer state, loadable at any tp/pp/dp; saved at the end")
    p.add_argument("--save-interval", dest="save_interval", type=int, default=d.save_interval,
                   help="also save every N steps")
    p.add_argument("--load", default=None, help="resume from this checkpoint directory (its latest "
                   "checkpoint; none there: start from scratch); may equal --save")
    p.add_argument("--load-step", dest="load_step", type=int, default=None,
                   help="resume from the checkpoint of this step instead of the latest")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="wall-clock limit for the whole run on simulated ranks, seconds (0: none)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is used
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig (dp defaults to WORLD_SIZE / (tp·pp) inside a launcher)."""
    ns = vars(build_parser().parse_args(argv))
    ns.pop("local_rank")
    if ns["dp"] is None:
        world = int(os.environ.get("WORLD_SIZE", 0)) if "RANK" in os.environ else 0
        ns["dp"] = max(1, world // (ns["tp"] * ns["pp"])) if world else 1
    if ns["out_dir"] is None:
        ns["out_dir"] = os.path.join("runs", f"{ns['model']}_tp{ns['tp']}_pp{ns['pp']}_dp{ns['dp']}")
    return TrainConfig(**{k: v for k, v in ns.items() if k in {f.name for f in fields(TrainConfig)}})
