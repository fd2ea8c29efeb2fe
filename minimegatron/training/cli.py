"""``python -m minimegatron.train``'s command line: flags -> :class:`TrainConfig` (nothing checked here).

Every TrainConfig field but ``model_config`` and ``valid_data`` is a flag (``--micro-batch-size``
for ``micro_batch_size``); :func:`validate <minimegatron.training.args.validate>` checks the values.
A bad flag (unknown, not a number, not one of the choices) raises ``CLIError`` through
:class:`minimegatron.errors.ArgumentParser`: ``train.py`` prints it as one line, exit status 2::

    $ python -m minimegatron.train --tp x
    python -m minimegatron.train: error: argument --tp: invalid int value: 'x'; see (...) --help
"""
from __future__ import annotations

import argparse
import os
from dataclasses import fields
from typing import Sequence

from minimegatron.config import CP_COMM_TYPES
from minimegatron.errors import ArgumentParser
from minimegatron.training.config import DTYPES, MODELS, PIPELINE_SCHEDULES, RECOMPUTE, TrainConfig

__all__ = ["build_parser", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m minimegatron.train",
        description="Pretrain a small GPT or LLaMA (dense or mixture-of-experts) with tensor, pipeline, "
                    "context, data and expert parallelism "
                    "(simulated CPU ranks, or under torchrun / the deepspeed launcher).")
    d = TrainConfig()
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=d.pp, help="pipeline stages")
    p.add_argument("--cp", type=int, default=d.cp, help="context-parallel size (the sequence split "
                   "over cp ranks for attention)")
    p.add_argument("--cp-comm", dest="cp_comm", choices=CP_COMM_TYPES, default=d.cp_comm,
                   help="context-parallel attention: p2p (ring) or a2a (all-to-all, Ulysses)")
    p.add_argument("--pipeline-schedule", dest="pipeline_schedule", choices=PIPELINE_SCHEDULES,
                   default=d.pipeline_schedule, help="pp > 1: 1f1b (DeepSpeed's) or zb-h1 (zero bubble: "
                   "weight gradients deferred into the pipeline's idle slots)")
    p.add_argument("--pipeline-layers", dest="pipeline_layers", type=_layer_counts, default=None,
                   metavar="N,N,...", help="transformer layers of each pipeline stage, first to last, "
                   "e.g. 3,1 (default: an even split)")
    p.add_argument("--ep", type=int, default=d.ep, help="expert-parallel size, carved from dp: ep "
                   "consecutive dp replicas share out the experts (each holds E/ep) and exchange tokens "
                   "by all-to-all; divides dp and --num-experts")
    p.add_argument("--num-experts", dest="num_experts", type=int, default=d.num_experts,
                   help="experts per MoE layer (0: dense MLPs)")
    p.add_argument("--moe-top-k", dest="moe_top_k", type=int, default=d.moe_top_k,
                   help="experts each token is routed to")
    p.add_argument("--moe-every", dest="moe_every", type=int, default=d.moe_every,
                   help="layer i has an MoE MLP iff i %% N == 0 (1: every layer)")
    p.add_argument("--moe-capacity-factor", dest="moe_capacity_factor", type=float, default=None,
                   help="drop the tokens past ceil(cf·tokens·k/E) per expert, counted over each rank's "
                   "micro-batch (default: drop none)")
    p.add_argument("--moe-aux-loss-coeff", dest="moe_aux_loss_coeff", type=float,
                   default=d.moe_aux_loss_coeff, help="weight of the load-balancing loss added to the "
                   "LM loss (0: none)")
    p.add_argument("--dp", type=int, default=None,
                   help="data-parallel replicas (default: WORLD_SIZE / (tp·cp·pp) in a launcher, else "
                   "--ep)")
    ints = ("micro_batch_size", "global_batch_size", "num_layers", "hidden_size", "num_attention_heads",
            "num_kv_heads", "ffn_hidden_size", "vocab_size", "seq_len", "steps", "warmup_steps", "zero_stage",
            "eval_interval", "eval_iters", "seed")
    for name in ints:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=getattr(d, name))
    for name in ("lr", "min_lr", "weight_decay", "clip_grad", "dropout"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=getattr(d, name))
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--recompute", choices=RECOMPUTE, default=d.recompute)
    p.add_argument("--no-fused-lm-loss", dest="fused_lm_loss", action="store_false",
                   help="compute the LM head's logits whole, then the loss (default: fused and chunked, "
                   "the logits never whole; same loss)")
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


def _layer_counts(text: str) -> tuple[int, ...]:
    """'3,1' -> (3, 1); anything else is a bad flag (whether they fit pp and num_layers: validate)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list of layers per stage: {text!r} (comma-separated "
                                         "ints, one per pipeline stage, e.g. 3,1)") from None


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig (dp defaults to WORLD_SIZE / (tp·cp·pp) inside a launcher)."""
    ns = vars(build_parser().parse_args(argv))
    ns.pop("local_rank")
    if ns["dp"] is None:
        world = int(os.environ.get("WORLD_SIZE", 0)) if "RANK" in os.environ else 0
        model = ns["tp"] * ns["cp"] * ns["pp"]
        ns["dp"] = max(1, world // model) if world and model > 0 else max(1, ns["ep"])  # ep ⊂ dp
    if ns["out_dir"] is None:
        cp = f"_cp{ns['cp']}" if ns["cp"] != 1 else ""
        ep = f"_ep{ns['ep']}" if ns["ep"] != 1 else ""
        ns["out_dir"] = os.path.join("runs", f"{ns['model']}_tp{ns['tp']}{cp}_pp{ns['pp']}_dp{ns['dp']}{ep}")
    return TrainConfig(**{k: v for k, v in ns.items() if k in {f.name for f in fields(TrainConfig)}})
