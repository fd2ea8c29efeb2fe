"""Exercise 10.4's grader: a student's layout for each scenario, checked with the planner.

A layout passes when it uses every device, divides (``plan.layout_problem``), fits in memory
(``plan.estimate(...).fits``) and runs within ``TOLERANCE`` of the fastest layout the planner finds.
Each way to fail has its own message: the wrong kind of answer, the wrong number of devices, what
does not divide (the planner's own line), what does not fit (and which part of the memory to cut),
what is too slow (and which part of the step grew against the best layout).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from exercises.grading import GradingError, call_candidate, kind_of, passed
from minimegatron.config import ModelConfig, gpt_config, llama_config
from minimegatron.plan import Layout, Plan, estimate, layout_problem, plan

TOLERANCE = 0.10  # a passing layout reaches at least 90 % of the best layout's tokens/s


@dataclass(frozen=True)
class Scenario:
    config: ModelConfig
    device: str
    num_devices: int
    global_batch: int
    seq_len: int

    def text(self) -> str:
        c = self.config
        return (f"{c.name} (h {c.hidden_size}, {c.num_layers} layers, {c.num_attention_heads} heads) on "
                f"{self.num_devices} × {self.device}, global batch {self.global_batch} × {self.seq_len} "
                "tokens")


SCENARIOS = {
    "gpt-1.3b/8xh100": Scenario(gpt_config(hidden_size=2048, num_layers=24, num_attention_heads=16,
                                           vocab_size=50304, max_seq_len=2048, name="gpt-1.3b"),
                                "h100", 8, 512, 2048),
    "llama-13b/16xgaudi2": Scenario(llama_config(hidden_size=5120, num_layers=40, num_attention_heads=40,
                                                 ffn_hidden_size=13824, vocab_size=32000, max_seq_len=4096,
                                                 name="llama-13b"), "gaudi2", 16, 256, 4096),
}

_FIX = {"parameters": "shard the weights: ZeRO-3, or split the model with tp / pp",
        "gradients": "shard the gradients: ZeRO-2 (pp = 1) or split the model with tp / pp",
        "optimizer": "shard the optimizer state over the data-parallel ranks: ZeRO-1 or higher",
        "activations": "recompute, a smaller micro-batch, or split the sequence (tp with SP, cp) / layers (pp)"}
_WHY = {"compute": "compute — recomputation re-runs forward; recompute less if memory allows",
        "bubble": "the pipeline bubble, (pp − 1)/m: fewer stages, or more micro-batches",
        "tp": "tensor-parallel traffic, every layer, fully exposed: less tp, and keep it inside a node",
        "cp": "context-parallel traffic: less cp",
        "ep": "expert all-to-alls: less ep",
        "pp": "pipeline sends between stages",
        "dp": "data-parallel / ZeRO traffic — ZeRO-3 gathers every weight in each micro-batch's forward "
              "and backward, ZeRO-2 reduces each micro-batch's gradients: a lower stage if memory allows"}


@functools.lru_cache(maxsize=None)
def best_plan(name: str) -> Plan:
    """The planner's fastest fitting layout for scenario ``name`` (computed once per process)."""
    s = SCENARIOS[name]
    return plan(s.config, s.global_batch, s.seq_len, s.device, s.num_devices)[0]


def check_layout(name: str, layout: object) -> Plan:
    """The student's ``layout`` for scenario ``name``: its Plan, or a GradingError naming the mistake."""
    s, where = SCENARIOS[name], f"choose_layout({name!r})"
    if not isinstance(layout, Layout):
        raise GradingError(f"{where} returned {kind_of(layout)}; expected a minimegatron.plan.Layout("
                           "tp=…, pp=…, dp=…, cp=…, zero=…, recompute=…, micro_batch=…)")
    if layout.num_devices != s.num_devices:
        raise GradingError(f"{where}: {layout.short()} uses tp·pp·dp·cp = {layout.tp}·{layout.pp}·"
                           f"{layout.dp}·{layout.cp} = {layout.num_devices} devices, the cluster has "
                           f"{s.num_devices}: use them all (dp takes what tp·pp·cp leave)")
    problem = layout_problem(s.config, layout, s.global_batch, s.seq_len)
    if problem:
        raise GradingError(f"{where}: {layout.short()} cannot run: {problem}")
    mine = estimate(s.config, layout, s.global_batch, s.seq_len, s.device)
    if not mine.fits:
        parts = {k: v for k, v in mine.memory.items() if k != "total"}
        worst = max(parts, key=parts.get)
        raise GradingError(f"{where}: {layout.short()} needs {mine.memory['total'] / 1e9:.1f} GB per device, "
                           f"{0.9 * mine.device.memory_bytes / 1e9:.1f} GB usable on a {mine.device.name}; the "
                           f"largest part is {worst} ({parts[worst] / 1e9:.1f} GB): {_FIX[worst]}")
    best = best_plan(name)
    if mine.tokens_per_s < (1 - TOLERANCE) * best.tokens_per_s:
        grew = {k: mine.times[k] - best.times[k] for k in ("compute", "bubble", "tp", "cp", "ep", "pp", "dp")}
        worst = max(grew, key=grew.get)
        raise GradingError(f"{where}: {layout.short()} fits but reaches {mine.tokens_per_s:,.0f} tokens/s, "
                           f"{mine.tokens_per_s / best.tokens_per_s:.0%} of the best layout's "
                           f"{best.tokens_per_s:,.0f} (at least {1 - TOLERANCE:.0%} passes); most of the extra "
                           f"time (+{grew[worst]:.3g} s a step) is {_WHY[worst]}")
    return mine


def grade(candidate: Callable[[str], Layout]) -> str:
    """Every scenario: the candidate's layout checked with the planner (module docstring)."""
    lines = []
    for name in SCENARIOS:
        layout = call_candidate(f"Exercise 10.4, choose_layout({name!r})", candidate, name,
                                exercise="Exercise 10.4")
        mine = check_layout(name, layout)
        lines.append(f"{name}: {layout.short()} — {mine.memory['total'] / 1e9:.0f} GB per device, "
                     f"{mine.tokens_per_s / best_plan(name).tokens_per_s:.0%} of the best layout's tokens/s")
    return passed("Exercise 10.4: every layout divides, fits and is fast:\n  " + "\n  ".join(lines))
