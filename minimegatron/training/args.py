"""validate(): every TrainConfig that cannot work is refused, before any rank starts.

:func:`validate` raises a ``ValueError`` naming the problem and the fix for every combination that
cannot work (in the parent process, before ``launch`` forks a single rank; again on each rank, without
the machine checks), and returns the ModelConfig to build:

    the values        each int >= 1 (or >= 0), each float finite and in range (:data:`FLOAT_RULES`),
                      model / recompute / dtype / pipeline_schedule one of the choices, the --split string
    --compile         pp = 1, and a torch.compile backend on this device (:func:`check_compile`)
    the experts       --moe-top-k <= --num-experts, the capacity factor > 0; --ep: an MoE model, ep
                      dividing num_experts and dp, ZeRO stage 0, fp32 (:func:`check_experts`)
    the layout        global_batch_size = micro_batch_size · num_micro_batches · dp, the ZeRO stage
                      (0-3; 2 and 3 only with pp = 1), heads divisible by tp, a layer per pipeline
                      stage (--pipeline-layers: pp counts summing to num_layers), zb-h1 only with
                      pp > 1, seq_len and tp under SP, tp·pp·dp = the launcher's WORLD_SIZE
    the data          a non-empty Dataset, or an indexed dataset whose ids fit the vocab (:mod:`.preflight`)
    the machine       --save / --out-dir writable, disk space, memory (:mod:`.preflight`; parent only)
    --load            a checkpoint of this model, below --steps (:mod:`.resume`)

:class:`TrainConfig` itself lives in :mod:`minimegatron.training.config`, below the checks (which all
take one); ``from minimegatron.training.args import TrainConfig`` works too.
"""
from __future__ import annotations

import math
import os
from typing import Any

from minimegatron.config import CP_COMM_TYPES, ModelConfig
from minimegatron.layers.language_model import sequence_parallel_split
from minimegatron.mpu.context_parallel import context_parallel_split
from minimegatron.sizes import is_int
from minimegatron.pipe_balance import check_stage_layers
from minimegatron.training.config import (DTYPES, MODEL_CLASS, MODELS, PIPELINE_SCHEDULES, RECOMPUTE,
                                          ZERO_STAGES, TrainConfig)
from minimegatron.training.preflight import check_data_path, check_machine, check_token_range
from minimegatron.training.resume import check_resume

__all__ = ["validate", "check_float", "check_split", "check_experts", "check_compile", "FLOAT_RULES",
           "TrainConfig"]


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _g(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else repr(v)


# The float knobs: (lower bound, lower bound excluded, upper bound (a number or another field),
# upper bound excluded, what it is, a value to try). check_float() is the one validator for all.
FLOAT_RULES: dict[str, tuple[float, bool, float | str | None, bool, str, str]] = {
    "lr": (0.0, True, None, False, "the peak learning rate", "1e-3"),
    "min_lr": (0.0, False, "lr", False, "the learning rate the cosine schedule decays to", "lr/10"),
    "weight_decay": (0.0, False, None, False, "AdamW's weight decay, 0 for none,", "0.01"),
    "clip_grad": (0.0, False, None, False, "the gradient-norm clipping threshold, 0 for no clipping,", "1.0"),
    "dropout": (0.0, False, 1.0, True, "the dropout probability", "0.1"),
    "timeout": (0.0, False, None, False, "the run's wall-clock limit in seconds, 0 for no limit,", "3600"),
    "moe_aux_loss_coeff": (0.0, False, None, False, "the load-balancing loss's weight, 0 for none,", "0.01"),
}


def check_float(cfg: Any, name: str) -> None:
    """Raise ValueError unless ``cfg.<name>`` is a finite number in its FLOAT_RULES range; the message
    names the flag, the value, the range and a value that works."""
    lo, lo_open, hi, hi_open, what, example = FLOAT_RULES[name]
    v = getattr(cfg, name)
    hi_value = getattr(cfg, hi) if isinstance(hi, str) else hi
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
        v > lo if lo_open else v >= lo) and (hi_value is None or not isinstance(hi_value, (int, float)) or (
            v < hi_value if hi_open else v <= hi_value))
    if ok:
        return
    if isinstance(hi, str):
        bounds = f"{lo:g} <= {name} <= {hi} = {_g(hi_value)}"
    elif hi is not None:
        bounds = f"{lo:g} {'<' if lo_open else '<='} {name} {'<' if hi_open else '<='} {hi:g}"
    else:
        bounds = f"{name} {'>' if lo_open else '>='} {lo:g}"
    if example == "lr/10" and isinstance(hi_value, (int, float)) and math.isfinite(hi_value):
        example = f"{hi_value / 10:g}"
    kind = "" if isinstance(v, (int, float)) and not isinstance(v, bool) else f" ({type(v).__name__})"
    _fail(f"{_flag(name)} {_g(v)}{kind} is out of range: {what} must be a finite number with "
          f"{bounds}; try {_flag(name)} {example}")


def check_split(split: Any, flag: str = "--split") -> tuple[float, float, float]:
    """The train/valid/test fractions of a split string like '949,50,1' (ValueError naming the flag)."""
    from minimegatron.data.samples import parse_split

    try:
        return parse_split(split)
    except ValueError as err:
        why = str(err).removeprefix(f"split {split!r} ").removeprefix("split ")
        raise ValueError(f"{flag} {split!r}: {why}") from None


def check_experts(cfg: TrainConfig) -> None:
    """The MoE flags, and what expert parallelism (``ep`` consecutive dp replicas sharing out the
    experts) needs and cannot do yet; ValueError naming the flags and the fix."""
    src = cfg.model_config if isinstance(cfg.model_config, ModelConfig) else cfg  # it overrides the flags
    E, k, cf, ep = src.num_experts, src.moe_top_k, src.moe_capacity_factor, cfg.ep
    aux, z = src.moe_aux_loss_coeff, getattr(src, "moe_z_loss_coeff", 0.0)
    if E and k > E:
        _fail(f"--moe-top-k {k} > --num-experts {E}: each token picks k distinct experts; give "
              f"--moe-top-k {min(2, E)} (or more experts)")
    if cf is not None and not (isinstance(cf, (int, float)) and not isinstance(cf, bool)
                               and math.isfinite(cf) and cf > 0):
        _fail(f"--moe-capacity-factor {_g(cf)} must be a finite number > 0 (slots per expert = "
              "ceil(cf·tokens·k/E)); try --moe-capacity-factor 1.25, or leave it out to drop no token")
    if E and cfg.pp > 1 and (aux or z):
        _fail(f"--moe-aux-loss-coeff {_g(aux)} (z-loss {_g(z)}) with --pp {cfg.pp}: the router losses "
              "of a stage's MoE layers never reach the last stage's loss (only activations cross "
              "stages), so they would not be trained; use --pp 1 with them, or --moe-aux-loss-coeff 0")
    if E and cfg.cp > 1 and (aux or z or cf is not None):
        _fail(f"--cp {cfg.cp} with --moe-aux-loss-coeff / --moe-capacity-factor: each CP rank routes "
              f"only its seq_len/cp tokens, so the load-balancing loss and the capacity would be "
              "counted over pieces of the sequences, not what one rank computes; use --cp 1 with them, "
              "or leave them out (plain top-k routing is the same at any cp)")
    if ep == 1:
        return
    if not E:
        _fail(f"--ep {ep} with a dense model: expert parallelism shares out the experts of MoE layers; "
              f"give --num-experts (a multiple of {ep}), or --ep 1")
    if E % ep:
        _fail(f"--num-experts {E} is not divisible by --ep {ep}: each EP rank holds E/ep whole experts; "
              f"give --num-experts {ep * max(1, E // ep)} or an --ep that divides {E}")
    if cfg.dp % ep:
        _fail(f"--ep {ep} does not divide --dp {cfg.dp}: expert parallelism is carved from data "
              f"parallelism (ep consecutive dp replicas share out the experts); give --dp "
              f"{ep * max(1, cfg.dp // ep)} (world = tp·cp·pp·dp) or an --ep that divides {cfg.dp}")
    if cfg.zero_stage >= 1:
        _fail(f"--ep {ep} with --zero-stage {cfg.zero_stage}: DeepSpeed's ZeRO optimizers reduce and "
              "partition every gradient over all dp replicas, mixing experts that differ across the "
              "EP ranks; use --zero-stage 0 with --ep, or --ep 1 with ZeRO")
    if cfg.dtype != "fp32":
        _fail(f"--ep {ep} with --dtype {cfg.dtype}: DeepSpeed's bf16 optimizers reduce and clip their "
              "own fp32 gradient copies over all dp replicas, mixing experts that differ across the "
              "EP ranks; use --dtype fp32 with --ep, or --ep 1 with bf16")


def check_compile(cfg: TrainConfig) -> None:
    """--compile: a backend exists here (Gaudi lazy mode, no C++ compiler: refused) and pp = 1."""
    from minimegatron.compile import resolve_backend

    if cfg.pp > 1:
        _fail(f"--compile with --pp {cfg.pp}: DeepSpeed's pipeline engine compiles differently across "
              "versions (0.14 the whole stage module, 0.19 each layer), and neither path is tested here; "
              "use --compile with --pp 1, or leave --compile out for the pipeline")
    try:
        resolve_backend()
    except ValueError as err:
        _fail(f"--compile: {err}")


def validate(cfg: TrainConfig, preflight: bool = True) -> ModelConfig:
    """Raise ValueError for any layout/argument that cannot work; return the ModelConfig to build.

    ``preflight`` (the parent process, before any rank starts) also checks the machine: that --save
    and --out-dir can be written, that the checkpoints fit on the disk and the model in memory."""
    if cfg.model not in MODELS:
        _fail(f"model={cfg.model!r}: choose one of {MODELS}")
    for name in ("tp", "pp", "dp", "cp", "ep", "micro_batch_size", "global_batch_size", "steps", "seq_len",
                 "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "eval_iters", "moe_top_k",
                 "moe_every"):
        v = getattr(cfg, name)
        if not is_int(v) or v < 1:
            _fail(f"{name} must be a positive int, got {v!r} ({type(v).__name__}); give {_flag(name)} 1 "
                  "or more")
    for name in ("num_kv_heads", "ffn_hidden_size"):
        v = getattr(cfg, name)
        if v is not None and (not is_int(v) or v < 1):
            _fail(f"{name} must be a positive int (or left out: the model's default), got {v!r} "
                  f"({type(v).__name__}); give {_flag(name)} 1 or more, or leave it out")
    for name in ("num_experts", "warmup_steps", "zero_stage", "eval_interval", "save_interval", "seed",
                 "load_step"):
        v = getattr(cfg, name)
        if v is not None and (not is_int(v) or v < 0):
            _fail(f"{name} must be >= 0 (an int), got {v!r} ({type(v).__name__}); give {_flag(name)} 0 "
                  "or more")
    for name in FLOAT_RULES:  # finite, in range: lr > 0, 0 <= min_lr <= lr, 0 <= dropout < 1, ...
        check_float(cfg, name)
    check_experts(cfg)
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
    if cfg.zero_stage not in ZERO_STAGES:
        _fail(f"--zero-stage {cfg.zero_stage!r}: ZeRO has stages 0 (plain data parallel), 1 (optimizer "
              "states sharded over dp), 2 (+ gradients) and 3 (+ parameters); give --zero-stage 0, 1, 2 "
              "or 3")
    if cfg.zero_stage >= 2 and cfg.pp > 1:
        _fail(f"zero_stage={cfg.zero_stage} with pp={cfg.pp}: DeepSpeed's pipeline engine supports only "
              "ZeRO stage 0 or 1 (it asserts 'ZeRO-2 and ZeRO-3 are incompatible with pipeline "
              "parallelism': its gradients are accumulated across micro-batches, not reduced in each "
              f"backward); use --zero-stage 1 with the pipeline, or --pp 1 for stage {cfg.zero_stage}")
    if cfg.compile:
        check_compile(cfg)
    if cfg.recompute not in RECOMPUTE:
        _fail(f"recompute={cfg.recompute!r}: choose one of {RECOMPUTE}")
    if cfg.dtype not in DTYPES:
        _fail(f"dtype={cfg.dtype!r}: choose one of {DTYPES}")
    check_split(cfg.split)  # its format, whether or not anything evaluates on it
    model = cfg.to_model_config()
    model.validate_tp(cfg.tp)  # heads / kv heads / ffn divisible by tp
    if model.num_layers < cfg.pp:
        _fail(f"num_layers={model.num_layers} < pp={cfg.pp}: every pipeline stage needs at least one "
              "transformer layer; use more layers or fewer stages")
    if cfg.pipeline_schedule not in PIPELINE_SCHEDULES:
        _fail(f"pipeline_schedule={cfg.pipeline_schedule!r}: choose one of {PIPELINE_SCHEDULES}")
    if cfg.pipeline_schedule != "1f1b" and cfg.pp < 2:
        _fail(f"--pipeline-schedule {cfg.pipeline_schedule} with pp={cfg.pp}: a pipeline schedule orders the "
              "micro-batches over pipeline stages, and one stage has none to order; give --pp 2 or more, "
              "or leave the flag out")
    check_stage_layers(cfg.pipeline_layers, cfg.pp, model.num_layers, "--pipeline-layers")
    if cfg.seq_len > model.max_seq_len:
        _fail(f"seq_len={cfg.seq_len} > the model's max_seq_len={model.max_seq_len}")
    if cfg.cp_comm not in CP_COMM_TYPES:
        _fail(f"cp_comm={cfg.cp_comm!r}: choose one of {CP_COMM_TYPES} (p2p: ring attention, a2a: "
              "all-to-all)")
    if cfg.cp > 1:  # the layers' own checks, before any rank starts
        model.validate_cp(cfg.cp, cfg.cp_comm, cfg.tp)
        context_parallel_split(cfg.seq_len, cfg.cp, cfg.tp, cfg.sequence_parallel)
    elif cfg.sequence_parallel and cfg.tp > 1:
        sequence_parallel_split(cfg.seq_len, cfg.tp)  # the layers' own check, before any rank starts
    if not isinstance(cfg.data, str):
        for name in ("data", "valid_data"):
            d = getattr(cfg, name)
            if d is not None and not (hasattr(d, "__getitem__") and hasattr(d, "__len__") and len(d) > 0):
                _fail(f"{name} must be a non-empty map-style Dataset of {{'tokens', 'labels'}} items, "
                      f"got {type(d).__name__}")
        if cfg.eval_interval and cfg.valid_data is None:
            _fail("eval_interval > 0 with a Dataset as data needs valid_data (or set eval_interval=0)")
    elif cfg.data != "random":
        check_data_path(cfg.data)
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
    if preflight:  # found out now, not after the whole run (a save) or inside a rank (the log)
        check_machine(cfg, model)  # --save/--out-dir writable, checkpoints fit the disk, model the memory
    rerun = cfg.load and os.path.abspath(cfg.load) == os.path.abspath(cfg.save or "")  # 1st run: none yet
    if cfg.load and not os.path.exists(cfg.load) and not rerun:
        _fail(f"--load {cfg.load} does not exist: point it at a checkpoint directory, or leave it out to "
              "start from scratch (--load equal to --save also starts there: a rerun resumes)")
    if cfg.load and os.path.exists(cfg.load) and not os.path.isdir(cfg.load):
        _fail(f"--load {cfg.load} is not a directory; give the --save directory of an earlier run")
    if cfg.load:
        check_resume(cfg, model)  # the checkpoint there (if any) holds this model, before --steps
    env_world = os.environ.get("WORLD_SIZE")
    if "RANK" in os.environ and env_world is not None and int(env_world) != cfg.world_size:
        _fail(f"the launcher started WORLD_SIZE={env_world} ranks but tp·cp·pp·dp = {cfg.tp}·{cfg.cp}·"
              f"{cfg.pp}·{cfg.dp} = {cfg.world_size}; change --dp (or tp/cp/pp) so that the product "
              "matches")
    return model
