"""ZeroBubblePipelineEngine: DeepSpeed's PipelineEngine running ZB-H1, B and W apart, unforked.

DeepSpeed's engine executes a schedule instruction by instruction, ``_INSTRUCTION_MAP[type(cmd)]
(self, **cmd.kwargs)``, and its ``BackwardPass`` is one autograd backward (input *and* weight
gradients). The zero-bubble schedule (:mod:`minimegatron.pipe_schedules`) needs three changes, made
in a subclass that only adds methods (no DeepSpeed file is edited):

==============================  ================================================================
instruction                     here
==============================  ================================================================
``train_batch``'s schedule      ``_exec_schedule`` runs :class:`ZeroBubbleH1Schedule` where DeepSpeed
                                hands it its ``TrainSchedule`` (``eval_batch``'s is left alone)
``BackwardPass`` = B            DeepSpeed's own backward pass, inside ``weight_grad_store.defer()``:
                                the linear layers compute ∂L/∂X and queue their ∂L/∂W work
``BackwardWeightPass`` = W      ``weight_grad_store.run_oldest()``: that work, into ``.grad`` (bf16:
                                between the optimizer's low-precision bookkeeping, as a backward is)
==============================  ================================================================

Everything after the last W is DeepSpeed's, unchanged: ``ReduceTiedGrads`` (GPT's two embedding
copies), ``ReduceGrads`` (the data-parallel all-reduce, ZeRO-1's reduce), ``OptimizerStep`` (clipping,
the step): they all see complete gradients. :func:`use_pipeline_schedule` makes an engine from
``deepspeed.initialize`` run ZB-H1 (``deepspeed_glue.adopt_pipeline_engine``: ``initialize`` cannot be told
which engine class to build) and hands the store to every layer that can defer::

    engine, *_ = deepspeed.initialize(model=GPTModelPipe(...), ...)
    use_pipeline_schedule(engine, "zb-h1")
    engine.train_batch(data_iter)          # the same losses and gradients as TrainSchedule's 1F1B

What is deferred: the big matrices — ColumnParallelLinear, RowParallelLinear, ReplicatedLinear and
the LM head (tied or not), plus a module that declares a ``weight_grad_store`` attribute (e.g.
``measure.timeline.FixedTimeLayer``). Norms, biases added outside a matmul and the embedding lookup
get their (small) gradients in B. Which DeepSpeed internals this touches, per version: ``compat``.
"""
from __future__ import annotations

from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.schedule import BackwardPass, TrainSchedule
from torch import nn

from minimegatron.deepspeed_glue import (adopt_pipeline_engine, pipeline_backward_bookkeeping,
                                         private_received_gradient)
from minimegatron.mpu.weight_grad import WeightGradStore
from minimegatron.pipe_schedules import PIPELINE_SCHEDULES, BackwardWeightPass, ZeroBubbleH1Schedule

__all__ = ["ZeroBubblePipelineEngine", "use_pipeline_schedule", "attach_weight_grad_store"]


class ZeroBubblePipelineEngine(PipelineEngine):
    """A PipelineEngine whose ``train_batch`` runs ZB-H1 (see the module docstring).

    Built by :func:`use_pipeline_schedule` from an engine ``deepspeed.initialize`` made: its only state
    of its own is ``weight_grad_store`` (set there) and the count of W passes run this step."""

    weight_grad_store: WeightGradStore

    def _exec_schedule(self, pipe_schedule):
        if type(pipe_schedule) is TrainSchedule:  # train_batch's 1F1B -> ZB-H1, same shape
            pipe_schedule = ZeroBubbleH1Schedule(micro_batches=pipe_schedule.micro_batches,
                                                 stages=pipe_schedule.stages, stage_id=pipe_schedule.stage_id)
            self._weight_passes_run = 0
        super()._exec_schedule(pipe_schedule)
        if len(self.weight_grad_store):
            raise RuntimeError(f"the schedule left {len(self.weight_grad_store)} W passes unrun: their "
                               "weight gradients would be missing from the optimizer step")

    def _exec_backward_pass(self, buffer_id: int) -> None:
        """B: DeepSpeed's backward pass, with the linear layers' ∂L/∂W work queued, not run. The queued
        work keeps ∂L/∂Y: a copy of the received gradient, which DeepSpeed's next receive overwrites."""
        with self.weight_grad_store.defer(), private_received_gradient(self):
            PipelineEngine._exec_backward_pass(self, buffer_id)

    def _exec_backward_weight_pass(self, micro_batch: int) -> None:
        """W: the oldest queued weight-gradient work, accumulated into ``.grad``."""
        if micro_batch != self._weight_passes_run:
            raise RuntimeError(f"W of micro-batch {micro_batch} scheduled before W of micro-batch "
                               f"{self._weight_passes_run}: W passes must follow their B passes' order")
        with pipeline_backward_bookkeeping(self):
            self.weight_grad_store.run_oldest()
        self._weight_passes_run += 1

    _INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP,
                        BackwardPass: _exec_backward_pass,
                        BackwardWeightPass: _exec_backward_weight_pass}


def attach_weight_grad_store(module: nn.Module, store: WeightGradStore | None) -> int:
    """Give ``store`` to every submodule that can defer its weight gradient; returns how many."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "weight_grad_store"):
            sub.weight_grad_store = store
            count += 1
    return count


def use_pipeline_schedule(engine: PipelineEngine, schedule: str) -> PipelineEngine:
    """Make ``engine`` (from ``deepspeed.initialize``) train with ``schedule``, one of
    :data:`~minimegatron.pipe_schedules.PIPELINE_SCHEDULES`: ``"1f1b"`` leaves DeepSpeed's own
    ``TrainSchedule``; ``"zb-h1"`` turns it into a :class:`ZeroBubblePipelineEngine` (for good)."""
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r}: choose one of {PIPELINE_SCHEDULES}")
    if not isinstance(engine, PipelineEngine):
        raise TypeError(f"{type(engine).__name__} is not a DeepSpeed PipelineEngine: a pipeline schedule "
                        "needs a PipelineModule (pp >= 2) given to deepspeed.initialize")
    if isinstance(engine, ZeroBubblePipelineEngine):
        if schedule == "zb-h1":
            return engine
        raise ValueError("this engine already runs zb-h1 and cannot go back to 1f1b: build a new one "
                         "with deepspeed.initialize")
    if schedule == "zb-h1":
        store = WeightGradStore()
        if attach_weight_grad_store(engine.module, store) == 0:
            raise ValueError("zb-h1: no layer of this model can defer its weight gradient (none has a "
                             "weight_grad_store attribute); W would be empty — use 1f1b")
        adopt_pipeline_engine(engine, ZeroBubblePipelineEngine)
        engine.weight_grad_store = store
    return engine
