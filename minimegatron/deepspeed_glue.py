"""The DeepSpeed glue: every place the package reaches past DeepSpeed's documented API, once, here.

(The torch and DeepSpeed *version* differences are :mod:`minimegatron.compat`.)

**DeepSpeed glue.** The model code never touches DeepSpeed's internals; where the package must reach
past DeepSpeed's documented API, or work around its behaviour, it does so here, once:

======================================  ==============  ============================================
what DeepSpeed does                     versions        what the glue does
======================================  ==============  ============================================
the plain engine asks its ``mpu=`` for  0.14.4 – 0.19   :class:`DeepSpeedMPU` answers them from a
Megatron's names: DP group/rank/size                    ``ParallelState`` (which keeps its own
(gradient all-reduce, ZeRO), model-                     names), and the aliases ``get_pipe_*``
parallel ones (‖g‖ over TP×PP, the                      (pipeline), ``get_slice_*`` (TP) that
``mp_rank_XX`` files), TP, pipeline                     ``utils/bwc.py`` falls back on
``deepspeed.init_distributed`` on the   0.14.4 – 0.19   :func:`init_deepspeed_comm` marks that kernel
CPU builds a shared-memory all-reduce                   unavailable in ``deepspeed.ops.
kernel (a JIT C++ compile, about a                      __compatible_ops__`` first (0.14: the table
minute, for inference only; training                    made at import; 0.19: probed on first read,
runs on gloo)                                           so a one-entry table is set before that),
                                                        then hands it torch's process group
``TiedLayerSpec(tied_weight_attr=)``    < 0.16.5        :data:`TIED_WEIGHT_ATTR`: one plain name
is ``getattr``'d, not followed along                    (``pipe.EmbeddingPipe.tied_weight``), which
dots                                                    every release accepts
the pipeline's second copy of a tied    0.14.4 – 0.19   :func:`is_pipeline_tied_copy` reads the mark,
weight is marked ``p.ds_pipe_                           so that ``training.engine.clip_grad_norm``
replicated = True`` (its optimizers'                    counts the copy once too
norms skip it)
ZeRO-0 fp32 gradient clipping under a   0.14.4 – 0.19   :func:`replace_fp32_gradient_clipping` swaps
pipeline: ``clip_fp32_gradients``                       the engine's method for ours (``training.
counts replicated weights on model-                     engine.clip_grad_norm``), which also records
parallel rank 0 only and the tied                       the norm (``get_global_grad_norm``)
weight twice, and does not record ‖g‖
``PipelineModule`` names its            0.14.4 – 0.19   :func:`pipe_layer_key` reads a state_dict
state_dict ``{index}.*`` and tied                       key back as (layer index, rest): the one
modules ``tied_modules.{key}.*``                        place that layout is spelled out
calls the flat collectives by their     on torch        :func:`quiet_deepspeed` filters those two
old names (warnings on torch ≥ 2.13)    ≥ 2.13          warnings and DeepSpeed's INFO logging
``deepspeed.initialize`` always builds  0.14.4 – 0.19   :func:`adopt_pipeline_engine` gives the engine
``PipelineEngine`` (0.19: or Dual-                      it built a subclass that only adds methods
PipeVEngine), and ``train_batch`` its                   (``pipe_engine.ZeroBubblePipelineEngine``,
``TrainSchedule`` (0.14 inline, 0.19                    which overrides ``_exec_schedule``,
``_train_schedule()``); both run it as                  ``_exec_backward_pass`` and extends
``_exec_schedule(s)``: per instruction                  ``_INSTRUCTION_MAP``: the same names and
``_INSTRUCTION_MAP[type(cmd)](**kw)``                   signatures in both)
bf16's ``BF16_Optimizer``: the          0.14.4 – 0.19   :func:`pipeline_backward_bookkeeping` does
pipeline clears the low-precision                       the same around a deferred weight-gradient
grads before each backward, adds them                   pass (with ``immediate_grad_update``, off
to fp32 ones after (not on the last                     by default, the optimizer's grad hooks do
stage: ``engine.backward`` does it)                     it and ``update_hp_grads`` returns at once)
the pipeline receives every output      0.14.4 – 0.19   :func:`private_received_gradient` hands that
gradient into one buffer, ``engine.                     backward a copy, so that a deferred weight
grad_layer``, overwritten by the next                   gradient (``pipe_engine``: W after the next
``RecvGrad``; autograd passes it on                     receive) reads its own micro-batch's
uncopied                                                ∂L/∂Y
ZeRO-3 keeps a parameter's fp32 copy   0.14.4 – 0.19   :func:`zero3_fp32_piece` reads that position
and Adam moments at an offset of a                      (what the optimizer's own ``get_full_hp_
flat fp32 tensor per sub-group:                         param`` does, which cannot create the state
``grad_position[get_param_id(W)]`` =                    before the first step); :func:`is_zero3_
(sub-group, offset, ⌈n/dp⌉); its torch                  param` tells such a parameter by its ``ds_id``;
optimizer's ``param_groups`` hold the                   :func:`zero3_fp32_flats` lists the flats with
flats only during ``step``                              their param groups
ZeRO-0 ``buffered_allreduce_fallback``  0.14.4 – 0.19   :func:`expert_aware_gradient_reduction`:
(the pipeline's too) averages every                     DeepSpeed gets the non-expert grads; the
grad over dp, experts too (its MoE                      experts' are summed over ``edp_group``,
path: ``deepspeed.moe`` modules only)                   ÷ dp·cp
``_broadcast_model`` gives all dp rank  0.14.4 – 0.19   :func:`keep_expert_parameters` puts them back
0's experts at ``initialize``
``PipelineModule`` splits layers only   0.14.4 – 0.19   :func:`set_pipeline_parts` sets ``parts`` and
``uniform`` / ``parameters`` /                          ``_set_bounds`` as ``_partition_layers``
``type:`` (no explicit counts)                          does (``pipe.LanguageModelPipe`` overrides
                                                        it for ``stage_layers``, as 0.19's
                                                        ``DualPipeVModule`` does)
======================================  ==============  ============================================
"""
from __future__ import annotations

import contextlib
import logging
import types
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from minimegatron.mpu.state import ParallelState

__all__ = ["TIED_WEIGHT_ATTR", "init_deepspeed_comm", "DeepSpeedMPU", "is_pipeline_tied_copy",
           "replace_fp32_gradient_clipping", "adopt_pipeline_engine", "pipeline_backward_bookkeeping",
           "private_received_gradient", "set_pipeline_parts", "pipe_layer_key", "quiet_deepspeed",
           "is_zero3_param", "zero3_fp32_piece", "zero3_fp32_flats", "is_expert_parameter",
           "expert_aware_gradient_reduction", "keep_expert_parameters"]

TIED_WEIGHT_ATTR = "tied_weight"  # TiedLayerSpec(tied_weight_attr=[...]): a plain name, no dots


def init_deepspeed_comm() -> None:
    """Hand this process's torch.distributed world to DeepSpeed's comm layer (once; idempotent),
    without building DeepSpeed's CPU shared-memory all-reduce kernel (see the glue table)."""
    import deepspeed
    import deepspeed.comm

    from minimegatron.device import device_type, dist_backend

    if deepspeed.comm.is_initialized():
        return
    if device_type() == "cpu":  # (a partial table, if DeepSpeed has not probed its ops yet: the
        import deepspeed.ops     # full probe runs compilers, and only this entry is ever read)
        vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
        from minimegatron.compat import cpu_accelerator_local_size
        cpu_accelerator_local_size()  # DeepSpeed 0.14's CPU device count needs numactl otherwise
    deepspeed.init_distributed(dist_backend=dist_backend(), verbose=False)


# DeepSpeed's name -> how a ParallelState answers it ("model parallel": the TP×PP ranks of one replica)
_MPU_ANSWERS: dict[str, Callable[[ParallelState], Any]] = {
    "get_tensor_model_parallel_rank": lambda s: s.tp_rank,
    "get_tensor_model_parallel_world_size": lambda s: s.tp,
    "get_tensor_model_parallel_group": lambda s: s.tp_group,
    "get_tensor_model_parallel_src_rank": lambda s: s.tp_ranks[0],
    "get_pipeline_model_parallel_rank": lambda s: s.pp_rank,
    "get_pipeline_model_parallel_world_size": lambda s: s.pp,
    "get_pipeline_model_parallel_group": lambda s: s.pp_group,
    # DeepSpeed's "data parallel" = the ranks that average gradients: DP × CP (``state.dp_cp_group``)
    "get_data_parallel_rank": lambda s: s.dp_cp_rank,
    "get_data_parallel_world_size": lambda s: s.dp * s.cp,
    "get_data_parallel_group": lambda s: s.dp_cp_group,
    "get_data_parallel_group_ranks": lambda s: list(s.dp_cp_ranks),
    "get_model_parallel_rank": lambda s: s.mp_rank,
    "get_model_parallel_world_size": lambda s: s.tp * s.pp,
    "get_model_parallel_group": lambda s: s.mp_group,
}
for _grid, _megatron in (("pipe", "pipeline_model"), ("slice", "tensor_model")):  # PipelineParallelGrid's
    for _what in ("rank", "world_size", "group"):
        _MPU_ANSWERS[f"get_{_grid}_parallel_{_what}"] = _MPU_ANSWERS[f"get_{_megatron}_parallel_{_what}"]


class DeepSpeedMPU:
    """``deepspeed.initialize(mpu=DeepSpeedMPU(state))``: a method per ``_MPU_ANSWERS`` entry (20), e.g.
    ``get_model_parallel_rank()`` = ``state.mp_rank``; ``hasattr`` is False for other (optional) names."""

    def __init__(self, state: ParallelState) -> None:
        self.state = state


for _name, _answer in _MPU_ANSWERS.items():
    setattr(DeepSpeedMPU, _name, lambda self, _answer=_answer: _answer(self.state))


def is_pipeline_tied_copy(param: torch.Tensor) -> bool:
    """True for the pipeline's second copy of a tied weight (the last stage's): count it once."""
    return bool(getattr(param, "ds_pipe_replicated", False))


def is_expert_parameter(param: torch.Tensor) -> bool:
    """True for an expert's weight (``param.expert_parallel``): it differs across the EP ranks."""
    return bool(getattr(param, "expert_parallel", False))


@contextlib.contextmanager
def keep_expert_parameters(model: torch.nn.Module):
    """Around ``deepspeed.initialize``: the expert parameters are put back after its broadcast from dp
    rank 0 (the same Parameter objects: the optimizer DeepSpeed built holds them)."""
    saved = [(p, p.detach().clone()) for p in model.parameters() if is_expert_parameter(p)]
    yield
    with torch.no_grad():
        for p, value in saved:
            p.copy_(value)


def expert_aware_gradient_reduction(engine, state: ParallelState) -> None:
    """Make the engine's gradient all-reduce (ZeRO-0: ``buffered_allreduce_fallback(grads=None)``) leave
    the expert parameters to one all_reduce(SUM) of their flattened gradients over ``edp_group`` (and
    ``cp_group`` when cp > 1); a parameter without a gradient gets zeros first, as in DeepSpeed::

        non-expert:  g ← (1/(dp·cp)) Σ_{dp·cp ranks} g          (DeepSpeed, as before)
        expert:      g ← (1/(dp·cp)) Σ_{edp_group × cp ranks} g  (the a2a backward has already summed
                                                                  its EP group's tokens into g)"""
    if hasattr(engine.optimizer, "get_grads_for_reduction"):  # BF16_Optimizer: its own fp32 copies
        raise TypeError(f"expert-parallel gradient reduction needs DeepSpeed's ZeRO-0 fp32 path, not "
                        f"{type(engine.optimizer).__name__} (it reduces its own copies); use fp32, ZeRO 0")
    deepspeed_reduce = engine.buffered_allreduce_fallback  # the bound method of the engine's class
    groups = [g for g in (state.edp_group, state.cp_group if state.cp > 1 else None) if g is not None]

    @torch.no_grad()
    def buffered_allreduce_fallback(self, grads=None, elements_per_buffer=500000000):
        if grads is not None:
            return deepspeed_reduce(grads=grads, elements_per_buffer=elements_per_buffer)
        shared, experts = [], []
        for p in self.module.parameters():
            if p.requires_grad and p.numel() > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                (experts if is_expert_parameter(p) else shared).append(p.grad.data)
        deepspeed_reduce(grads=shared, elements_per_buffer=elements_per_buffer)
        if experts:
            flat = torch.cat([g.reshape(-1) for g in experts])  # (Σ numel,)
            for group in groups:
                dist.all_reduce(flat, group=group)
            flat.div_(state.dp * state.cp)  # what DeepSpeed divides the others by
            for g, piece in zip(experts, flat.split([g.numel() for g in experts])):
                g.copy_(piece.view_as(g))

    engine.buffered_allreduce_fallback = types.MethodType(buffered_allreduce_fallback, engine)


def replace_fp32_gradient_clipping(engine, clip: Callable[[], float]) -> None:
    """Make the engine's ZeRO-0 fp32 clipping call ``clip()`` (which scales the gradients and returns
    ‖g‖) and record that norm, where ``engine.get_global_grad_norm()`` reads it."""
    def clip_fp32_gradients(self) -> None:
        self._global_grad_norm = clip()

    engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)


def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a parameter ZeRO-3 has partitioned (``param`` is empty; ``param.ds_shape`` its shape)."""
    return hasattr(param, "ds_id")


def zero3_fp32_piece(optimizer, param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(flat, offset, numel)``: this rank's ``⌈n/dp⌉`` elements of ``param``'s fp32 copy are
    ``flat[offset:offset + numel]``, and its moments the same slice of ``optimizer.optimizer.state[flat]``
    (``optimizer``: a ``DeepSpeedZeroOptimizer_Stage3``)."""
    sub_group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
    return optimizer.fp32_partitioned_groups_flat[sub_group], int(offset), int(numel)


def zero3_fp32_flats(optimizer) -> list[tuple[torch.Tensor, int]]:
    """Every ``(flat, param-group index)`` a ``DeepSpeedZeroOptimizer_Stage3`` steps: its torch
    optimizer's ``param_groups`` hold them only during ``step`` (empty lists otherwise)."""
    return [(flat, optimizer.sub_group_to_group_id[i])
            for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat)]


def adopt_pipeline_engine(engine, cls: type) -> None:
    """Turn the ``PipelineEngine`` that ``deepspeed.initialize`` built into ``cls``, a subclass of it that
    adds methods and class attributes only (its state is the engine's, so nothing is re-initialised)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if type(engine) is not PipelineEngine or not issubclass(cls, PipelineEngine) or "__init__" in vars(cls):
        raise TypeError(f"cannot make a {type(engine).__name__} a {cls.__name__}: the engine must be "
                        "deepspeed.initialize's PipelineEngine, and the class a PipelineEngine subclass "
                        "without an __init__ of its own")
    engine.__class__ = cls


@contextlib.contextmanager
def pipeline_backward_bookkeeping(engine):
    """What DeepSpeed's pipeline does around a backward outside ``engine.backward``: with bf16's
    ``BF16_Optimizer``, clear the low-precision grads before, add them to the fp32 ones after."""
    bf16 = getattr(engine, "using_bf16_optimizer", False)
    if bf16:
        engine.optimizer.clear_lp_grads()
    yield
    if bf16:
        engine.optimizer.update_hp_grads(clear_lp_grads=False)


@contextlib.contextmanager
def private_received_gradient(engine):
    """During one pipeline backward, ``engine.grad_layer`` (the received ∂L/∂output) is a copy that
    nothing overwrites; DeepSpeed's buffer is put back after it, for the next receive."""
    received = engine.grad_layer
    if received is not None:
        engine.grad_layer = (received.clone() if torch.is_tensor(received) else
                             type(received)(t.clone() for t in received))
    try:
        yield
    finally:
        engine.grad_layer = received


def set_pipeline_parts(module, parts: list[int]) -> None:
    """Inside ``PipelineModule._partition_layers``: stage ``i`` holds layers ``[parts[i], parts[i+1])``."""
    stage = module._topo.get_coord(module.global_rank).pipe
    module.parts = list(parts)
    module._set_bounds(start=parts[stage], stop=parts[stage + 1])


def pipe_layer_key(key: str) -> tuple[int | None, str]:
    """A ``PipelineModule`` state_dict key as (layer index, rest): ``'3.mlp.w'`` -> ``(3, 'mlp.w')``;
    a tied module's ``'tied_modules.embed.w'`` -> ``(None, 'w')`` (its index: where the key's spec is)."""
    head, rest = key.split(".", 1)
    if head == "tied_modules":
        return None, rest.split(".", 1)[1]
    return int(head), rest


def quiet_deepspeed() -> None:
    """DeepSpeed's INFO logging off, and torch ≥ 2.13's deprecation warnings for DeepSpeed's calls of
    ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` filtered (ours use the new names)."""
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated")
