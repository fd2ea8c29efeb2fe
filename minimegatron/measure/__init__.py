"""Numbers that match the papers: measure what the code does, next to the formula it should obey.

=====================  ==========================================  =====================================
what                   measured with                               formula
=====================  ==========================================  =====================================
communication          :class:`CommCounter` (every c10d op)        :func:`tp_layer_comm`, ring bytes
activation memory      :class:`SavedActivationCounter`             :func:`layer_activation_bytes` (ours),
                       (saved-tensor hooks, per layer)             :func:`korthikanti_activation_bytes`
pipeline bubble        :class:`PipelineTimeline` (DeepSpeed)       :func:`pipeline_bubble_fraction`,
                                                                   :func:`zb_h1_bubble_fraction`
optimizer memory       :func:`optimizer_state_bytes` (ZeRO-1)      :func:`zero1_optimizer_state_bytes`,
                                                                   :func:`zero1_bytes_per_parameter`
context parallelism    CommCounter, SavedActivationCounter,        :func:`cp_attention_comm`,
                       :func:`ring_timeline` (per-step events)     :func:`cp_layer_activation_bytes`,
                                                                   :func:`ring_work`
ZeRO stages 0–3        :func:`zero_state_bytes` (storages),        :func:`zero_paper_bytes` (2Ψ+2Ψ+KΨ…),
                       CommCounter                                 :func:`zero_fp32_bytes`,
                                                                   :func:`zero_comm` (2Ψ, 3Ψ)
DDP overlap            :func:`record_overlap` (hooks, futures)     the hidden share of communication
MoE all-to-all         :class:`MoECommCounter` (split sizes)       :func:`moe_a2a_comm` (uniform),
                                                                   :func:`routing_a2a_comm` (exact)
MoE dropped tokens     :func:`dropped_fraction`                    :func:`expected_dropped_fraction`
training-step FLOPs    ``torch.utils.flop_counter`` (the test)     :func:`training_step_flops`
                                                                   (6·N·T + 12·L·h·s·T), :func:`step_gemms`
=====================  ==========================================  =====================================

Importing this package imports torch only (DeepSpeed and matplotlib are imported where used).
"""
from minimegatron.measure.activation_formulas import (korthikanti_activation_bytes,
                                                      layer_activation_bytes, layer_activation_terms)
from minimegatron.measure.activations import SavedActivationCounter, SavedTensor
from minimegatron.measure.context_parallel import (cp_attention_comm, cp_layer_activation_bytes,
                                                   cp_layer_activation_terms, group_totals,
                                                   plot_ring_timeline, record_ring_timeline,
                                                   ring_attention_comm, ring_imbalance, ring_timeline,
                                                   ring_work, ring_work_closed_form,
                                                   ulysses_attention_comm, ulysses_calls_per_tensor)
from minimegatron.measure.comm import (CommCounter, CommRecord, OpTotal, format_comm_table,
                                       ring_wire_bytes, tp_layer_comm)
from minimegatron.measure.flops import StepFlops, matmul_weights, step_gemms, training_step_flops
from minimegatron.measure.memory import (adam_state_bytes, model_state_bytes, optimizer_state_bytes,
                                         zero1_bytes_per_parameter, zero1_optimizer_state_bytes)
from minimegatron.measure.moe import (MoECommCounter, dropped_fraction, expected_dropped_fraction,
                                      expert_capacity, moe_a2a_comm, plot_expert_load, routing_a2a_comm,
                                      routing_rows)
from minimegatron.measure.overlap import OverlapTimeline, plot_overlap, record_overlap
from minimegatron.measure.timeline import (FixedTimeLayer, PipeEvent, PipelineTimeline, idle_intervals,
                                           interleaved_bubble_fraction, measured_bubble_fraction,
                                           pipeline_bubble_fraction, zb_h1_bubble_fraction,
                                           plot_timeline)
from minimegatron.measure.zero import (deepspeed_optimizer_state_bytes, zero_comm, zero_fp32_bytes,
                                       zero_paper_bytes, zero_paper_comm_elements, zero_state_bytes)

__all__ = ["StepFlops", "matmul_weights", "step_gemms", "training_step_flops", "CommCounter", "CommRecord", "OpTotal", "format_comm_table", "ring_wire_bytes",
           "tp_layer_comm", "SavedActivationCounter", "SavedTensor", "korthikanti_activation_bytes",
           "layer_activation_bytes", "layer_activation_terms", "FixedTimeLayer", "PipeEvent",
           "PipelineTimeline",
           "idle_intervals", "measured_bubble_fraction", "pipeline_bubble_fraction", "plot_timeline",
           "interleaved_bubble_fraction", "zb_h1_bubble_fraction",
           "adam_state_bytes", "model_state_bytes", "optimizer_state_bytes", "zero1_bytes_per_parameter",
           "zero1_optimizer_state_bytes", "ring_attention_comm", "ulysses_attention_comm",
           "ulysses_calls_per_tensor", "cp_attention_comm", "group_totals", "cp_layer_activation_terms",
           "cp_layer_activation_bytes", "ring_work", "ring_work_closed_form", "ring_imbalance",
           "record_ring_timeline", "ring_timeline", "plot_ring_timeline",
           "OverlapTimeline", "record_overlap", "plot_overlap",
           "zero_paper_bytes", "zero_paper_comm_elements", "zero_fp32_bytes",
           "deepspeed_optimizer_state_bytes", "zero_comm", "zero_state_bytes"]
__all__ += ["MoECommCounter", "moe_a2a_comm", "routing_a2a_comm", "routing_rows", "expert_capacity",
            "dropped_fraction", "expected_dropped_fraction", "plot_expert_load"]
