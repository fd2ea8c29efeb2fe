"""ZB-H1 as a DeepSpeed ``PipeSchedule``: the instructions DeepSpeed's own engine runs, in zero-bubble order.

DeepSpeed's ``PipelineEngine.train_batch`` executes a schedule: per step, a list of instructions
(``LoadMicroBatch``, ``ForwardPass``, ``BackwardPass``, ``SendActivation``, ``RecvGrad``, ...) that its
``_INSTRUCTION_MAP`` turns into method calls. Its ``TrainSchedule`` is 1F1B. ZB-H1 (Qi et al. 2023,
"Zero Bubble Pipeline Parallelism", §2.1) splits every backward into

    B  the input gradient ∂L/∂X: the previous stage waits for it (the critical path)
    W  the weight gradient ∂L/∂W: nobody waits for it but the optimizer step

and keeps 1F1B's order of F and B, but runs stage ``s``'s W passes ``s`` micro-batches late, so that
every stage holds ``p`` micro-batches in flight (forward done, W not yet: the first stage holds ``p``
in 1F1B already, so the peak activation memory is 1F1B's). B alone is shorter than B + W, so the
gradients reach stage 0 sooner, and the late Ws fill the cool-down, where 1F1B's stages sat idle::

    compute order of stage s (w = min(p-1-s, m) warm-up forwards, as in 1F1B):
        F0 … F(w-1) │ F(w) B0 [W(0-s)] F(w+1) B1 [W(1-s)] … │ B(m-w) W … B(m-1) W │ W … (the rest)

That order is :func:`minimegatron.schedules.zb_h1_order`, the one the teaching runner
(``schedules.run_schedule``) and Exercise 15 use; this module turns it into DeepSpeed's instructions.

With ``T_F, T_B, T_W`` per micro-batch per stage the step lasts ``m(T_F + T_B + T_W) + (p-1)(T_F + T_B
- T_W)``; 1F1B's lasts ``(m + p - 1)(T_F + T_B + T_W)``: for equal times the bubble shrinks from
``(p-1)/(m+p-1)`` to ``(p-1)/(3m+p-1)`` (``measure.timeline.zb_h1_bubble_fraction``; it assumes
``m >= p``, as the handcrafted schedule does).

From an order to instructions. :func:`zb_h1_timeline` places each stage's order on a clock with unit
times (``schedules.simulate``: an op starts when the stage is free and its input is there, ``F j``
after ``F j`` of the stage before, ``B j`` after ``B j`` of the stage after). Step ``t`` of the
schedule is what every stage does at time ``t``: the messages consumed at ``t``, then the op that
starts at ``t``. A message is sent in the step its receiver needs it, so both ends of a link meet it
in the same step and, within a step, in the same order (activation before gradient): DeepSpeed's
blocking sends and receives pair up on every link, whatever the real timings (no deadlock), and the
steps are barrier-safe, as ``PipeSchedule`` requires. :class:`BackwardWeightPass` is the one instruction DeepSpeed lacks: the
engine that runs it (and makes ``BackwardPass`` compute input gradients only) is
:mod:`minimegatron.pipe_engine`.

Buffers. DeepSpeed keeps a micro-batch's input and output in a numbered slot from its receive (or
load) until its gradient is sent back (or, on the first stage, its B); the slots are assigned here,
free-list style, and ``num_pipe_buffers()`` is the most ever in use — ``p`` on stage 0 as in 1F1B,
since W needs no slot (the deferred work keeps what it needs, :mod:`minimegatron.mpu.weight_grad`).

**Interleaved 1F1B is not here** (``v`` chunks per rank, virtual stages ``r, r+p, …``: Narayanan et al.
2021; its bubble is ``measure.timeline.interleaved_bubble_fraction``). DeepSpeed's engine assumes one
contiguous chunk per rank, in the same places in 0.14.4 and 0.19:

* ``runtime/pipe/module.py``: ``PipelineModule._partition_layers`` makes one boundary list ``parts``
  (``num_stages + 1`` entries) and calls ``_set_bounds(parts[stage], parts[stage + 1])``; ``_build``
  turns that one range into ``forward_funcs``, which ``forward`` runs in order; ``stage_owner`` (which
  ``_index_tied_modules`` uses to form the tied-weight groups) gives each layer one owning rank.
* ``runtime/pipe/engine.py``: ``PipelineEngine.__init__`` fixes ``prev_stage = stage_id - 1`` and
  ``next_stage = stage_id + 1``, the only peers of ``_exec_send_activations`` / ``_exec_recv_activations``
  / ``_exec_send_grads`` / ``_exec_recv_grads``; ``is_first_stage()`` / ``is_last_stage()`` decide per
  rank, not per chunk, who loads data (``_exec_load_micro_batch``), computes the loss
  (``_exec_forward_pass``) and backpropagates it (``_exec_backward_pass``). (``p2p._is_valid_send_recv``
  would allow the last → first rank hop interleaving needs; the engine never makes it.)
* Buffers: an instruction names a ``buffer_id`` only (``schedule.BufferOpInstruction``; other keyword
  arguments reach the ``_exec_*`` methods, which take none), ``pipe_buffers[...]`` is indexed by it, and
  an engine has one ``pipe_recv_buf``, one ``grad_layer``, one ``first_output_send`` (the shapes are
  sent once), one ``loss``: one activation stream in, one out.

DeepSpeed 0.19 shows the one route without editing it, ``runtime/pipe/dualpipev.py``: ``DualPipeVModule``
overrides ``_partition_layers`` (2p stages), ``_build`` (a ``forward_funcs`` per phase) and
``stage_owner``; ``DualPipeVEngine`` re-implements every data-path instruction with a ``phase``
argument, its own batched p2p (``CommitP2P``) and per-phase buffers — for two chunks in a V (stages
``r`` and ``2p-1-r``), not ``v`` round-robin chunks, and not in 0.14.4. Interleaving on DeepSpeed means
the same: replacing the module's partitioning and the engine's whole data path, not reusing them.
"""
from __future__ import annotations

from functools import cached_property

from deepspeed.runtime.pipe.schedule import (BackwardPass, ForwardPass, LoadMicroBatch, OptimizerStep,
                                             PipeInstruction, PipeSchedule, RecvActivation, RecvGrad,
                                             ReduceGrads, ReduceTiedGrads, SendActivation, SendGrad)

from minimegatron.schedules import simulate, zb_h1_order

__all__ = ["PIPELINE_SCHEDULES", "BackwardWeightPass", "ZeroBubbleH1Schedule", "zb_h1_timeline"]

PIPELINE_SCHEDULES = ("1f1b", "zb-h1")  # --pipeline-schedule: DeepSpeed's TrainSchedule, or ZB-H1

Op = tuple[str, int]  # ("F" | "B" | "W", micro-batch)


class BackwardWeightPass(PipeInstruction):
    """W of ``micro_batch``: run the weight-gradient work its ``BackwardPass`` deferred (into ``.grad``).

    Roughly::

        engine.weight_grad_store.run_oldest()    # ∂L/∂W = Gᵀ·X for every deferring linear layer
    """

    def __init__(self, micro_batch: int) -> None:
        super().__init__(micro_batch=micro_batch)


def zb_h1_timeline(stages: int, micro_batches: int) -> list[dict[int, Op]]:
    """Per stage, ``{start time: op}``: :func:`~minimegatron.schedules.zb_h1_order` (the one ZB-H1 order,
    the teaching runner's too) placed by :func:`~minimegatron.schedules.simulate` with unit times (an op
    starts once its stage is free and its input is there)."""
    timeline: list[dict[int, Op]] = [{} for _ in range(stages)]
    for slot in simulate(zb_h1_order, stages, micro_batches, 1.0, 1.0, 1.0):
        timeline[slot.stage][round(slot.start)] = (slot.kind, slot.micro_batch)
    return timeline


class ZeroBubbleH1Schedule(PipeSchedule):
    """ZB-H1 for ``stage_id`` as DeepSpeed instructions (run it with ``pipe_engine``'s engine)."""

    def steps(self):
        for cmds in self._steps:
            yield cmds

    def num_pipe_buffers(self) -> int:
        return self._steps_and_buffers[1]

    @property
    def _steps(self) -> list[list[PipeInstruction]]:
        return self._steps_and_buffers[0]

    @cached_property
    def _steps_and_buffers(self) -> tuple[list[list[PipeInstruction]], int]:
        s, p = self.stage_id, self.stages
        timeline = zb_h1_timeline(p, self.micro_batches)
        here = timeline[s]
        before = timeline[s - 1] if s > 0 else {}
        after = timeline[s + 1] if s < p - 1 else {}
        slot_of: dict[int, int] = {}
        free_slots: list[int] = []
        release: dict[int, list[int]] = {}  # time -> slots free after that step
        used = 0
        steps: list[list[PipeInstruction]] = []
        for t in range(max(max(tl) for tl in timeline) + 1):
            cmds: list[PipeInstruction] = []
            kind, j = here.get(t, ("", -1))
            if kind == "F":  # a slot for micro-batch j, from its receive (or load) on
                if not free_slots:
                    free_slots.append(used)
                    used += 1
                slot_of[j] = free_slots.pop(0)
            # the messages consumed at t, in one order on both ends of each link: activation first
            if after.get(t, ("",))[0] == "F":
                cmds.append(SendActivation(slot_of[after[t][1]]))   # the next stage's F starts now
            if kind == "F" and s > 0:
                cmds.append(RecvActivation(slot_of[j]))             # ours does
            if before.get(t, ("",))[0] == "B":
                k = before[t][1]
                cmds.append(SendGrad(slot_of[k]))                    # the previous stage's B starts now
                release.setdefault(t, []).append(slot_of[k])
            if kind == "B" and s < p - 1:
                cmds.append(RecvGrad(slot_of[j]))                   # ours does
            if kind == "F" and s in (0, p - 1):
                cmds.append(LoadMicroBatch(slot_of[j]))             # ids on the first stage, labels on the last
            if kind == "F":
                cmds.append(ForwardPass(slot_of[j]))
            elif kind == "B":
                cmds.append(BackwardPass(slot_of[j]))
                if s == 0:  # no gradient to send back: the slot is free after B
                    release.setdefault(t, []).append(slot_of[j])
            elif kind == "W":
                cmds.append(BackwardWeightPass(j))
            free_slots.extend(sorted(release.pop(t, [])))
            steps.append(cmds)
        steps.append([ReduceTiedGrads(), ReduceGrads(), OptimizerStep()])
        return steps, max(used, 1)
