"""ZeRO's numbers (Rajbhandari et al. 2020, §3 and §7): model-state bytes per rank and communication
per step, at every stage — the paper's, and the exact ones of our fp32 runs.

**Memory, the paper** (mixed-precision Adam, Ψ parameters, N_d data-parallel ranks, ``K = 12``: the fp32
master weights, Adam's ``m`` and ``v``, 4 bytes each)::

    stage             parameters   gradients   optimizer state      total per rank
    0  plain DP           2Ψ           2Ψ           KΨ              (2 + 2 + K)Ψ
    1  P_os               2Ψ           2Ψ           KΨ/N_d          2Ψ + 2Ψ + KΨ/N_d
    2  P_os+g             2Ψ           2Ψ/N_d       KΨ/N_d          2Ψ + (2 + K)Ψ/N_d
    3  P_os+g+p           2Ψ/N_d       2Ψ/N_d       KΨ/N_d          (2 + 2 + K)Ψ/N_d

**Memory, our fp32 runs** (:func:`zero_fp32_bytes`, exact): 4-byte weights and gradients. Stage 0 is
plain ``torch.optim.AdamW``: no master copy, ``m`` and ``v`` (8Ψ) and one fp32 ``step`` per tensor.
Stages 1–3 (``minimegatron.data_parallel.zero`` and ``.zero3``) keep a separate fp32 master slice, as
the paper and DeepSpeed's stage 1/2 do (``single_partition_of_fp32_groups``), so ``K = 12`` holds; the
step count is a Python int. The sharded terms are exact with the padding: each flat vector of ``n``
elements (a param group at stage 1, a bucket at stage 2, a unit at stage 3) keeps
``partition_numel(n) = ⌈n/(alignment·N_d)⌉·alignment`` elements per rank::

    stage 1:  4Ψ + 4Ψ + 12·P    stage 2:  4Ψ + 4·P + 12·P    stage 3:  4·P + 4·P + 12·P
    (P = Σ partition_numel(n))

DeepSpeed's own optimizer state (:func:`deepspeed_optimizer_state_bytes`): stages 1–2 pad each param
group (alignment 2) and keep master + ``m`` + ``v`` + a ``step`` per group. Stage 3 pads each *parameter*
to a multiple of N_d (``⌈n_p/N_d⌉`` per rank, summed per group) and keeps a separate fp32 master of
that partition. (DeepSpeed ≥ 0.18.2 means to alias the master to an fp32 model's own partition, PR
#7651, but tests ``partition.device == "cpu"``, a ``torch.device`` against a string — never equal on
torch 2.13 — so our CPU runs get the copy on both stacks; ``optimizer_state_bytes`` counts the master
only where it is a copy, and ``fp32_master_copy=False`` is the aliased case.)

**Communication per step per rank** (:func:`zero_comm`): stages 0–2 move 2Ψ (an all-reduce, or its
halves: reduce-scatter of the gradients + all-gather of the new weights); stage 3 moves 3Ψ (all-gather
in forward, again in backward, reduce-scatter of the gradients). Logical bytes are those tensors' sizes;
the ring puts ``(N_d − 1)/N_d`` of them on each rank's wire
(:func:`~minimegatron.measure.comm.ring_wire_bytes`).
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from minimegatron.measure.comm import OpTotal, ring_wire_bytes
from minimegatron.measure.memory import optimizer_state_bytes, partition_numel, storage_bytes

__all__ = ["K_MIXED_PRECISION_ADAM", "zero_paper_bytes", "zero_paper_comm_elements", "zero_fp32_bytes",
           "deepspeed_optimizer_state_bytes", "zero_comm", "zero_state_bytes"]

K_MIXED_PRECISION_ADAM = 12  # fp32 master + m + v, bytes per parameter
STAGES = (0, 1, 2, 3)


def _check(stage: int, dp: int) -> None:
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage must be one of {STAGES}, got {stage!r}")
    if dp < 1:
        raise ValueError(f"data-parallel size must be >= 1, got {dp}")


def zero_paper_bytes(num_params: float, dp: int, stage: int, k: float = K_MIXED_PRECISION_ADAM
                     ) -> dict[str, float]:
    """The paper's bytes per rank: ``{"parameters", "gradients", "optimizer"}`` (module table)."""
    _check(stage, dp)
    psi = float(num_params)
    return {"parameters": 2 * psi / (dp if stage >= 3 else 1),
            "gradients": 2 * psi / (dp if stage >= 2 else 1),
            "optimizer": k * psi / (dp if stage >= 1 else 1)}


def zero_paper_comm_elements(num_params: float, stage: int) -> float:
    """Elements each rank moves per step, counted as the paper does: 2Ψ (stages 0–2), 3Ψ (stage 3)."""
    _check(stage, 1)
    return (3 if stage == 3 else 2) * float(num_params)


def zero_fp32_bytes(flat_numels: Sequence[int], dp: int, stage: int, alignment: int = 2,
                    num_tensors: int = 0) -> dict[str, int]:
    """Exact bytes per rank of our fp32 runs (module docstring), after backward and before ``step``.

    ``flat_numels``: the unpadded elements of each flat vector (``optimizer.flat_numels()``: the param
    groups at stage 1, buckets at 2, units at 3; at stage 0 any split of Ψ). ``num_tensors``: parameter
    tensors, for stage 0's per-tensor ``step`` (torch AdamW)."""
    _check(stage, dp)
    psi = sum(flat_numels)
    part = sum(partition_numel(n, dp, alignment) for n in flat_numels)
    if stage == 0:
        return {"parameters": 4 * psi, "gradients": 4 * psi, "optimizer": 8 * psi + 4 * num_tensors}
    return {"parameters": 4 * (part if stage >= 3 else psi), "gradients": 4 * (part if stage >= 2 else psi),
            "optimizer": 12 * part}


def deepspeed_optimizer_state_bytes(group_param_numels: Sequence[Sequence[int]], dp: int, stage: int,
                                    fp32_master_copy: bool = True) -> dict[str, int]:
    """DeepSpeed's ZeRO optimizer state per rank, fp32, torch AdamW (``optimizer_state_bytes`` keys).

    ``group_param_numels``: per param group, the elements of each parameter. ``fp32_master_copy``
    (stage 3): False where DeepSpeed aliases the master to the parameters' partition (module docstring)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"DeepSpeed's ZeRO optimizer has stages 1, 2, 3, got {stage!r}")
    _check(stage, dp)
    if stage == 3:  # each parameter padded to a multiple of dp, the group's partitions concatenated
        part = sum(partition_numel(n, dp, 1) for group in group_param_numels for n in group)
    else:           # each group flattened, padded to a multiple of 2·dp
        part = sum(partition_numel(sum(group), dp, 2) for group in group_param_numels)
    out = {"exp_avg": 4 * part, "exp_avg_sq": 4 * part, "step": 4 * len(group_param_numels)}
    if stage < 3 or fp32_master_copy:
        out["fp32_master"] = 4 * part
    return out


def zero_comm(flat_numels: Sequence[int], dp: int, stage: int, bytes_per_element: int = 4,
              alignment: int = 2, forward_gathers: Sequence[int] | None = None) -> dict[str, OpTotal]:
    """Collectives of one training step on this rank, as :meth:`CommCounter.totals` reports them.

    stage 0: one all-reduce per flat vector (DDP's buckets, unpadded). Stages 1–2: per flat vector
    (padded to ``alignment·dp``) a reduce-scatter of the gradients and an all-gather of the weights.
    Stage 3: per unit ``forward_gathers`` (1 each by default; 2 for GPT's tied embedding) all-gathers in
    forward, one in backward, one reduce-scatter. ``{}`` at dp = 1 (nothing moves)."""
    _check(stage, dp)
    if dp == 1:
        return {}
    gathers = list(forward_gathers) if forward_gathers is not None else [1] * len(flat_numels)
    if len(gathers) != len(flat_numels):
        raise ValueError(f"forward_gathers has {len(gathers)} entries for {len(flat_numels)} flat vectors")
    calls: list[tuple[str, int]] = []
    for n, fwd in zip(flat_numels, gathers):
        padded = partition_numel(n, dp, alignment) * dp
        if stage == 0:
            calls.append(("all_reduce", n))
        elif stage in (1, 2):
            calls += [("reduce_scatter", padded), ("all_gather", padded)]
        else:
            calls += [("all_gather", padded)] * (fwd + 1) + [("reduce_scatter", padded)]
    out: dict[str, OpTotal] = {}
    for op, numel in calls:
        e = bytes_per_element
        out[op] = out.get(op, OpTotal()) + OpTotal(1, numel * e, ring_wire_bytes(op, numel, e, dp))
    return out


def zero_state_bytes(model: nn.Module, optimizer: Any) -> dict[str, int]:
    """What this rank holds now, by storage (each counted once; a storage freed in place counts 0).

    parameters: the model's parameter storages + the optimizer's parameter shards (ZeRO-3's
    ``param_shards()``); gradients: ``p.grad`` + the optimizer's ``grad_shards()``; optimizer:
    :func:`~minimegatron.measure.memory.optimizer_state_bytes`."""
    params = list(model.parameters())
    shards = getattr(optimizer, "param_shards", lambda: [])()
    grad_shards = getattr(optimizer, "grad_shards", lambda: [])()
    return {"parameters": storage_bytes(params) + storage_bytes(shards),
            "gradients": storage_bytes(p.grad for p in params) + storage_bytes(grad_shards),
            "optimizer": sum(optimizer_state_bytes(optimizer).values())}
