"""TrainConfig: every knob of a pretraining run (checked by :func:`~minimegatron.training.args.validate`).

The layout is ``world = tp · cp · pp · dp`` ranks. One optimizer step consumes ``global_batch_size``
sequences: each of the ``dp`` replicas takes ``global_batch_size / dp`` of them, in
``micro_batch_size`` pieces — the gradient-accumulation steps, which are also the micro-batches the
pipeline schedule interleaves::

    global_batch_size = micro_batch_size · num_micro_batches · dp

Context parallelism (``cp``) does not change that count: the ``cp`` ranks of a replica take the same
sequences, each its zig-zag piece of ``seq_len / cp`` tokens (``cp_comm``: ``"p2p"`` ring attention or
``"a2a"`` all-to-all, Megatron's ``--cp-comm-type``).

With ``pp > 1`` the micro-batches run through DeepSpeed's pipeline engine in ``pipeline_schedule``
order — ``"1f1b"`` (DeepSpeed's own) or ``"zb-h1"`` (zero-bubble, :mod:`minimegatron.pipe_schedules`) —
and ``pipeline_layers`` (e.g. ``(3, 1)``) sets the transformer layers of each stage instead of an even
split (``minimegatron.pipe_balance``: why the last stage, which holds the LM head, may want fewer).

A mixture-of-experts model (``num_experts`` E > 0: every ``moe_every``-th layer's MLP is E experts, of
which each token uses ``moe_top_k``; ``minimegatron.layers.moe``) may share its experts out over
``ep`` ranks (expert parallelism, carved from dp as in Megatron: ``ep`` consecutive dp ranks hold
E/ep experts each and exchange tokens by all-to-all; ``ep`` divides ``dp``, the world stays
``tp · cp · pp · dp``).

This file is only the dataclass and the names its fields may take: what makes a run valid is in
:mod:`.args` (the values), :mod:`.preflight` (the machine and the files) and :mod:`.resume` (``--load``),
which all take a TrainConfig — so it sits below them. The command line is :mod:`.cli`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from minimegatron.config import ModelConfig, gpt_config, llama_config
from minimegatron.layers.transformer import RECOMPUTE_MODES as RECOMPUTE  # the one list of modes
from minimegatron.models import MODEL_CLASS, MODELS  # the one model registry

__all__ = ["TrainConfig", "MODELS", "MODEL_CLASS", "CLI_MODEL_FIELDS", "DTYPES", "RECOMPUTE",
           "PIPELINE_SCHEDULES", "ZERO_STAGES"]

CLI_MODEL_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                    "ffn_hidden_size", "num_experts", "moe_top_k", "moe_every", "moe_capacity_factor",
                    "moe_aux_loss_coeff")  # the ModelConfig fields the command line sets
DTYPES = ("fp32", "bf16")
ZERO_STAGES = (0, 1, 2, 3)  # DeepSpeed's: 1 shards the optimizer states over dp, 2 + gradients, 3 + weights
PIPELINE_SCHEDULES = ("1f1b", "zb-h1")  # = minimegatron.pipe_schedules.PIPELINE_SCHEDULES (no DeepSpeed here)


@dataclass
class TrainConfig:
    """A pretraining run. ``model_config`` (a full ModelConfig) overrides the size fields."""

    model: str = "llama"
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    cp_comm: str = "p2p"
    ep: int = 1                     # expert-parallel size, carved from dp (divides dp and num_experts)
    pipeline_schedule: str = "1f1b"  # pp > 1: "1f1b" (DeepSpeed's TrainSchedule) or "zb-h1"
    pipeline_layers: tuple[int, ...] | None = None  # transformer layers per stage; None: even split
    micro_batch_size: int = 2
    global_batch_size: int = 8
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_kv_heads: int | None = None
    ffn_hidden_size: int | None = None  # None: the model's default (4h GPT, ≈8/3·h LLaMA)
    vocab_size: int = 512
    num_experts: int = 0            # 0: dense MLPs; E > 0: MoE MLPs of E experts
    moe_top_k: int = 2              # experts per token
    moe_every: int = 1              # layer i is MoE iff i % moe_every == 0
    moe_capacity_factor: float | None = None  # None: no token dropped; else ⌈cf·n·k/E⌉ slots per expert
    moe_aux_loss_coeff: float = 0.0  # × the load-balancing loss, added to the LM loss
    seq_len: int = 64
    dropout: float = 0.0
    model_config: ModelConfig | None = None
    steps: int = 20
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    zero_stage: int = 0             # 0-3 (2 and 3 with pp = 1): see training/engine.py
    sequence_parallel: bool = False
    recompute: str = "none"
    fused_lm_loss: bool = True      # LM head + loss in one chunked pass (ModelConfig.fused_lm_loss)
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
        return self.tp * self.cp * self.pp * self.dp

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
                      max_seq_len=self.seq_len, dropout=self.dropout, num_experts=self.num_experts,
                      moe_top_k=self.moe_top_k, moe_every=self.moe_every,
                      moe_capacity_factor=self.moe_capacity_factor,
                      moe_aux_loss_coeff=self.moe_aux_loss_coeff, fused_lm_loss=self.fused_lm_loss)
