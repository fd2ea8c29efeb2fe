"""Plan a layout: for a model, a batch, a sequence length and N devices, which tp·pp·dp·cp(·ep) ×
ZeRO stage × recompute × micro-batch fits, and how fast it would run — every number from the
formulas ``minimegatron.measure`` checks against counted runs.

    from minimegatron.plan import plan, table
    plans = plan(llama_config(...), global_batch=1024, seq_len=4096, device="gaudi2", num_devices=8)
    print(table(plans[:10]));  print(plans[0].describe())

=============  ================================================================================
devices.py     :class:`Device` (H100, H200, Gaudi 2, Gaudi 3 — vendor figures, cited; CPU placeholder)
layout.py      :class:`Layout`, :func:`layout_problem` (why a layout cannot run), enumeration
memory.py      parameters per rank and stage (exact), ZeRO model states, activations in flight
cost.py        FLOPs and per-group traffic per step (``measure``'s formulas)
planner.py     :func:`estimate` (one layout), :func:`plan` (all, ranked), :class:`Plan`, :func:`table`
=============  ================================================================================

Tested against what ``measure`` counts on gloo ranks (``tests/plan/test_planner.py``): parameters,
gradients and ZeRO state per rank, activations per layer, TP and DP bytes per step.
"""
from minimegatron.plan.devices import DEVICES, Device, cpu_device, get_device
from minimegatron.plan.layout import Layout, enumerate_layouts, layout_problem
from minimegatron.plan.planner import Plan, estimate, plan, table

__all__ = ["Device", "DEVICES", "cpu_device", "get_device", "Layout", "layout_problem", "enumerate_layouts",
           "Plan", "estimate", "plan", "table"]
