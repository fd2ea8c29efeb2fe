"""The DeepSpeed engine for a TrainConfig: model, optimizer, ZeRO, precision, LR schedule.

==================  ===========================================================================
pp = 1              ``GPTModel`` / ``LLaMAModel`` in DeepSpeed's plain engine, ``mpu=DeepSpeedMPU(state)``
                    (DeepSpeed all-reduces gradients over our data-parallel group)
pp > 1              ``GPTModelPipe`` / ``LLaMAModelPipe`` in DeepSpeed's PipelineEngine: 1F1B, or ZB-H1
                    (``--pipeline-schedule zb-h1``: ``pipe_engine.use_pipeline_schedule``); the layers
                    per stage even or ``--pipeline-layers``
ZeRO stage 1        ``"zero_optimization": {"stage": 1}``: each of the dp replicas keeps the fp32
                    master weights and Adam moments of 1/dp of the parameters (Rajbhandari et al.)
ZeRO stage 2        ``{"stage": 2}`` (pp = 1): + the gradients, reduce-scattered in backward (each
                    replica keeps the 1/dp it steps)
ZeRO stage 3        ``{"stage": 3}`` (pp = 1): + the weights: each parameter is cut in dp pieces
                    (``W.ds_tensor``), gathered for its module's forward and backward and freed
                    after; ``stage3_param_persistence_threshold: 0`` cuts every one (DeepSpeed's
                    default keeps those under 1e5 elements whole: all of a tiny model's)
bf16                ``"bf16": {"enabled": true}``: bf16 weights and activations, fp32 master weights
optimizer           AdamW from the config (``torch_adam``: torch's implementation, on any device)
--compile           ``engine.compile(backend=...)``: DeepSpeed compiles the module it wraps in place
                    (``nn.Module.compile``; :mod:`minimegatron.compile` picks the backend); pp = 1
==================  ===========================================================================

(bf16 with ZeRO stage 0 and pp = 1 goes through DeepSpeed's ``FP16_UnfusedOptimizer``, which takes
one zero-gradient Adam step when it is built: the first real step then has Adam's step-2 bias
correction and one extra weight decay (on a tiny test model its losses drift from fp32 by ~5e-3,
those of the ZeRO-1 and pipeline bf16 paths by ~2e-4). Prefer ``--zero-stage 1`` with bf16.)

Weights come from ``init_seed=seed``, drawn per layer index (``minimegatron.layers.init_seed``), so
every layout — any tp, pp, dp — starts from the same model.

Sequence parallelism needs nothing here: the replicated weights that see only ``s/tp`` tokens (norms,
row-parallel biases) sum their gradients over TP in their own backward (``f``, ``layers/norms.py``),
in both engines and every ZeRO stage.

**The tie under ZeRO-3.** GPT's head multiplies by the word embeddings' table in
``LanguageModel.forward``, outside the module that owns it, after that module's forward has freed it.
DeepSpeed (0.14.4 – 0.19) notices a partitioned parameter read during the engine's forward and
gathers it for the module being run; :func:`build_engine` says so itself, once,
``deepspeed.zero.register_external_parameter(model, word_embeddings.weight)``: the table is gathered
for the whole model's forward and backward. Gradient clipping needs nothing at stages 1–3: DeepSpeed's
ZeRO optimizers count a replicated weight's ‖g‖² on TP rank 0 only (``is_model_parallel_parameter``)
and sum over DP, then TP.

**Why no FSDP2 path** (``torch.distributed.fsdp.fully_shard`` over ``DeviceMesh.from_group(dp_group)``).
It runs with our TP on gloo (both stacks), but it does not compose with the rest: it replaces every
Parameter with a new DTensor Parameter on the dp mesh, dropping the TP marks (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``) that checkpoint reshaping, the TP-aware norm and vocab padding
read; our TP shards are plain tensors over plain groups, so DTensor's ``full_tensor``/``clip_grad_norm_``
see the dp mesh only (a 2-D dp × tp mesh would mean rewriting ``mpu`` as DTensor parallel styles); and
the loop, clipping, LR schedule, grad-norm log and checkpoints talk to a DeepSpeed engine and its
optimizers. An FSDP2 flag would be a second trainer (its own AdamW over DTensors, accumulation with
``set_requires_gradient_sync``, a TP × DP norm over local shards, ``MixedPrecisionPolicy`` for bf16,
a third optimizer-state layout), not a flag; ZeRO-3 is the same algorithm, through the engine we use.

**Experts** (``num_experts`` > 0, ``ep`` > 1: each EP rank of a dp group holds other experts).
DeepSpeed would broadcast every parameter from the dp group's first rank at ``initialize`` and average
every gradient over dp; the glue keeps the experts through the broadcast
(``deepspeed_glue.keep_expert_parameters``) and reduces expert gradients over the expert-data-parallel
group instead (``expert_aware_gradient_reduction``: summed over ``edp_group``, divided by dp·cp, the
a2a backward having summed the EP group's tokens already); :func:`clip_grad_norm` counts each expert
once over ``ep_group``. ZeRO ≥ 1 and bf16 reduce gradients in their own optimizers: refused with
``ep > 1`` (``training.args.check_experts``).

One detail DeepSpeed leaves to us:

* Gradient clipping with ZeRO stage 0 in fp32: under a pipeline, DeepSpeed's fp32 path counts the
  replicated weights only on model-parallel rank 0 (the first stage) and the tied embedding twice, so
  the norm is wrong (and it is not recorded). :func:`clip_grad_norm` computes ‖g‖ over TP × PP and
  replaces it on every such engine (``deepspeed_glue.replace_fp32_gradient_clipping``: the DeepSpeed glue).
  (ZeRO-1 and bf16 compute the norm correctly themselves.)
"""
from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.deepspeed_glue import (DeepSpeedMPU, expert_aware_gradient_reduction,
                                         init_deepspeed_comm, is_expert_parameter, is_pipeline_tied_copy,
                                         keep_expert_parameters, quiet_deepspeed,
                                         replace_fp32_gradient_clipping)
from minimegatron.compile import resolve_backend
from minimegatron.config import ModelConfig
from minimegatron.models import model_class
from minimegatron.mpu.state import ParallelState
from minimegatron.training.config import TrainConfig
from minimegatron.training.schedule import warmup_cosine


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (print it: it is the whole recipe)."""
    return {
        # DeepSpeed counts a CP rank as a data-parallel one (it averages gradients over dp·cp), so
        # its "batch" is global_batch_size·cp pieces of seq_len/cp tokens: the same tokens
        "train_batch_size": cfg.global_batch_size * cfg.cp,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.num_micro_batches,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "gradient_clipping": cfg.clip_grad,  # DeepSpeed's default is 1.0, not off: always say it
        "zero_optimization": {"stage": cfg.zero_stage, **({"stage3_param_persistence_threshold": 0}
                                                           if cfg.zero_stage == 3 else {})},
        "bf16": {"enabled": cfg.dtype == "bf16"},
        # activations differ across TP ranks under SP: send them whole, not split over TP
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and norm weights (1-D) are not decayed (Megatron)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_model(cfg: TrainConfig, model_config: ModelConfig, state: ParallelState) -> nn.Module:
    """GPTModel/LLaMAModel (pp = 1) or GPTModelPipe/LLaMAModelPipe (pp > 1), seeded by ``cfg.seed``."""
    model = model_class(cfg.model, pipeline=state.pp > 1)  # the registry: minimegatron.models
    split = dict(stage_layers=cfg.pipeline_layers) if state.pp > 1 else {}
    return model(model_config, state, recompute=cfg.recompute, init_seed=cfg.seed, **split)


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, state: ParallelState) -> torch.Tensor:
    """Scale gradients so that the global ‖g‖₂ over all TP × PP shards is at most ``max_norm``.

    ‖g‖² = Σ over this rank's tensor-parallel shards + (on TP rank 0 only) the replicated weights,
    skipping the pipeline's second copy of a tied weight, summed over the model-parallel group.
    Gradients are already identical across data-parallel replicas — except the experts' (``param.
    expert_parallel``), which differ across the ``ep`` ranks of an EP group: their squares are summed
    over ``ep_group`` first (each expert counted once), then with the rest over TP × PP. Returns ‖g‖.
    """
    params = [p for p in parameters if p.grad is not None]
    device = params[0].grad.device if params else None
    total = torch.zeros((), dtype=torch.float32, device=device)
    experts = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        if is_pipeline_tied_copy(p):
            continue
        if getattr(p, "tensor_model_parallel", False) or state.tp_rank == 0:
            (experts if is_expert_parameter(p) else total).add_(p.grad.detach().float().pow(2).sum())
    if getattr(state, "ep", 1) > 1:
        dist.all_reduce(experts, group=state.ep_group)
    total += experts
    if state.mp_group is not None:
        dist.all_reduce(total, group=state.mp_group)
    norm = total.sqrt()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.dtype))
    return norm


def build_engine(cfg: TrainConfig, model_config: ModelConfig, state: ParallelState):
    """``(engine, model)`` for this rank: the hook notebooks and checkpointing use to reach the state."""
    import deepspeed

    quiet_deepspeed()
    init_deepspeed_comm()
    model = build_model(cfg, model_config, state)
    schedule = warmup_cosine(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
    ep = getattr(state, "ep", 1)  # experts differ across EP ranks: not broadcast from dp rank 0
    experts = keep_expert_parameters(model) if ep > 1 else contextlib.nullcontext()
    with experts, contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints memory reports
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay),
            config=deepspeed_config(cfg), lr_scheduler=schedule,
            mpu=None if state.pp > 1 else DeepSpeedMPU(state))  # a PipelineModule brings its own grid
    if cfg.zero_stage == 3 and model_config.tie_embeddings:  # see the module docstring: the tie
        deepspeed.zero.register_external_parameter(model, model.embedding.word_embeddings.weight)
    if ep > 1:  # expert gradients: summed over edp_group, / dp·cp (see the module docstring)
        expert_aware_gradient_reduction(engine, state)
    if state.pp > 1:
        from minimegatron.pipe_engine import use_pipeline_schedule
        use_pipeline_schedule(engine, cfg.pipeline_schedule)
    if cfg.zero_stage == 0 and cfg.dtype == "fp32" and cfg.clip_grad > 0:  # see the module docstring
        replace_fp32_gradient_clipping(
            engine, lambda: clip_grad_norm(model.parameters(), cfg.clip_grad, state).item())
    if cfg.compile:  # DeepSpeed's own: model.compile(backend) in place (0.14.4 – 0.19)
        engine.compile(backend=resolve_backend())
    return engine, model
