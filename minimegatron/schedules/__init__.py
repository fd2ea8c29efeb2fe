"""Pipeline schedules by hand: the orders, an ideal timing model, a teaching executor.

A training step on pipeline stage ``s`` of ``p`` runs, for each of ``m`` micro-batches, a forward
``("F", k)`` and a backward ``("B", k)`` — per model chunk ``("F", k, c)`` when each stage holds ``v``
chunks, and with the backward split into ``B`` (input gradient) and ``W`` (weight gradient) for the
zero-bubble schedules. A *schedule* is the order in which each stage runs them (:mod:`.orders`)::

    GPipe (Huang et al. 2019)          F0 F1 … F(m-1)  B0 B1 … B(m-1)            all F, then all B
    1F1B  (Narayanan et al. 2021)      F0 … F(w-1) │ Fw B0 F(w+1) B1 … │ … B(m-1)     w = min(p-1-s, m)
    interleaved 1F1B (ibid., §2.2)     1F1B over m·v chunk units, w = min(2(p-s-1) + (v-1)p, m·v)
    ZB-H1 (Qi et al. 2023)             1F1B with B = input gradient; stage s runs its W's s late

    schedule       bubble (uniform times)                   peak activations held on stage s
    GPipe, 1F1B    (p - 1)/(m + p - 1)                      m (GPipe), min(p - s, m) (1F1B)
    interleaved    (p - 1)/(v·m + p - 1)                    min(w + 1, m·v) chunks, 1/v of a stage each
    ZB-H1          (p-1)(T_F+T_B-T_W) / (m(T_F+T_B+T_W)     min(p - s, m) until B, as 1F1B; min(p, m)
                    + (p-1)(T_F+T_B-T_W)); T's equal: (p-1)/(3m+p-1)     until W: 1F1B's stage-0 peak

The bubble formulas live in :mod:`minimegatron.measure` (``pipeline_bubble_fraction``,
``interleaved_bubble_fraction``, ``zb_h1_bubble_fraction``); :func:`simulate` (:mod:`.simulate`)
places the orders on an ideal machine and gives each of them exactly. DeepSpeed's ``PipelineEngine``
runs 1F1B (``TrainSchedule``; :func:`deepspeed_order` reads its order back). :func:`run_schedule`
(:mod:`.runner`) is a TEACHING executor that runs any of these orders on real ranks and records its
timeline; :func:`plot_schedule` draws simulated or recorded slots.
"""
from minimegatron.schedules.orders import (Work, check_order, deepspeed_order, gpipe_order,
                                           interleaved_order, interleaved_warmup, one_f_one_b_order,
                                           peak_in_flight, peak_in_flight_formula, work_item, zb_h1_order)
from minimegatron.schedules.plot import plot_schedule
from minimegatron.schedules.runner import ScheduleResult, run_schedule
from minimegatron.schedules.simulate import (Slot, bubble_fraction, simulate, simulated_bubble_fraction,
                                             stage_bubble_fractions)

__all__ = ["Work", "Slot", "gpipe_order", "one_f_one_b_order", "interleaved_order", "interleaved_warmup",
           "zb_h1_order", "deepspeed_order", "work_item", "check_order", "peak_in_flight",
           "peak_in_flight_formula", "simulate", "bubble_fraction", "simulated_bubble_fraction",
           "stage_bubble_fractions", "ScheduleResult", "run_schedule", "plot_schedule"]
