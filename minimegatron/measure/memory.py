"""Optimizer memory per rank: measure what the optimizer holds, and the ZeRO formula it should match.

**Mixed-precision Adam** (Rajbhandari et al. 2020, "ZeRO", §3): for ``Ψ`` parameters each rank keeps
2Ψ bytes of 16-bit weights, 2Ψ of 16-bit gradients and ``K·Ψ = 12Ψ`` of optimizer state — an fp32
master copy of the weights, Adam's ``m`` and ``v``. ZeRO stage 1 (``P_os``) shards the optimizer
state over the ``N_d`` data-parallel ranks::

    bytes per parameter    plain DP: 2 + 2 + 12 = 16        ZeRO-1: 2 + 2 + 12/N_d  →  4 + 12/N_d

**What we run on CPU: fp32.** DeepSpeed's ZeRO-1 optimizer (``DeepSpeedZeroOptimizer``) still makes a
master copy of its partition (``single_partition_of_fp32_groups``, fp32 even when the model is), and
the wrapped ``torch.optim.Adam`` keeps ``m`` and ``v`` for that partition only::

    fp32 weights 4 + fp32 grads 4 + (master 4 + m 4 + v 4)/N_d  =  8 + 12/N_d
    plain torch Adam in fp32 (no ZeRO, no master copy):  4 + 4 + 8 = 16

DeepSpeed flattens each parameter group into one buffer padded to a multiple of ``2·N_d`` elements
(``nccl_start_alignment_factor = 2``), then gives rank ``r`` the ``r``-th of ``N_d`` equal slices;
Adam's ``step`` is one fp32 scalar per (flat) parameter. :func:`zero1_optimizer_state_bytes` follows
that exactly, so it equals :func:`optimizer_state_bytes` of a real engine byte for byte.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["optimizer_state_bytes", "model_state_bytes", "zero1_bytes_per_parameter",
           "zero1_optimizer_state_bytes", "adam_state_bytes", "partition_numel", "storage_bytes"]


def partition_numel(numel: int, dp: int, alignment: int = 2) -> int:
    """Elements of one rank's slice: ``numel`` padded to a multiple of ``alignment · dp``, divided by dp.

    DeepSpeed's ZeRO-1/2 rule (``flatten_dense_tensors_aligned``, then equal contiguous slices), also
    the rule of ``minimegatron.data_parallel.zero``; ZeRO-3 in DeepSpeed pads each parameter to a
    multiple of dp (``alignment=1``, one parameter at a time)."""
    if dp < 1 or alignment < 1:
        raise ValueError(f"partition_numel: dp ({dp}) and alignment ({alignment}) must be >= 1")
    return math.ceil(numel / (alignment * dp)) * alignment


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors`` (None skipped), each storage counted once.

    A storage freed in place (``untyped_storage().resize_(0)``, ZeRO-3's and FSDP's trick) counts 0,
    even while views of it (autograd's saved ``W.t()``) are alive; a view keeps its whole storage."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr() or id(s)] = s.nbytes()
    return sum(seen.values())


def _unwrap(optimizer: Any) -> Any:
    """A DeepSpeed engine -> its optimizer; anything else unchanged."""
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and hasattr(optimizer, "module") and hasattr(optimizer, "train_batch_size"):
        return inner  # DeepSpeedEngine / PipelineEngine
    return optimizer


def optimizer_state_bytes(optimizer: Any) -> dict[str, int]:
    """Bytes of optimizer state on this rank, by kind (each storage counted once).

    Accepts a ``torch.optim`` optimizer, DeepSpeed's ZeRO optimizer (stages 1–3), a DeepSpeed engine,
    or ``minimegatron.data_parallel``'s ZeRO optimizers (torch's ``state`` layout). Keys: the state
    names (``exp_avg``, ``exp_avg_sq``, ``step``, ...) plus ``fp32_master`` for ZeRO's master partition
    (DeepSpeed's stage-3 master counts only where it is a copy, not the parameters' own partition).
    """
    opt = _unwrap(optimizer)
    out: dict[str, int] = {}
    seen: set[int] = set()

    def add(kind: str, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        if key in seen and key != 0:
            return  # a view of a storage already counted
        seen.add(key)
        out[kind] = out.get(kind, 0) + t.numel() * t.element_size()

    masters = getattr(opt, "single_partition_of_fp32_groups", None)  # DeepSpeed ZeRO stage 1/2
    if masters is not None:
        for t in masters:
            add("fp32_master", t)
        opt = opt.optimizer  # the wrapped torch optimizer, over the partitions
    masters = getattr(opt, "fp32_partitioned_groups_flat", None)  # DeepSpeed ZeRO stage 3
    if masters is not None:
        params = {t.untyped_storage().data_ptr() for t in opt.fp16_partitioned_groups_flat}
        for t in masters:  # DeepSpeed >= 0.18.2 in fp32 aliases the parameters' partition: not extra
            if t.untyped_storage().data_ptr() not in params:
                add("fp32_master", t)
        opt = opt.optimizer
    for state in opt.state.values():
        for name, value in state.items():
            if torch.is_tensor(value):
                add(name, value)
    return out


def model_state_bytes(model: nn.Module, optimizer: Any | None = None) -> dict[str, int]:
    """Parameters, gradients (those present now) and optimizer state held by this rank, in bytes."""
    params = list(model.parameters())
    out = {"parameters": sum(p.numel() * p.element_size() for p in params),
           "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params
                            if p.grad is not None)}
    if optimizer is not None:
        out["optimizer"] = sum(optimizer_state_bytes(optimizer).values())
    return out


def zero1_bytes_per_parameter(dp: int, mixed_precision: bool = True, zero: bool = True) -> float:
    """Model-state bytes per parameter per rank with Adam (module docstring).

    mixed precision: ``4 + 12/N_d`` with ZeRO-1, 16 without; fp32 (our CPU runs, DeepSpeed's master
    copy included): ``8 + 12/N_d`` with ZeRO-1, 16 for plain torch Adam.
    """
    if dp < 1:
        raise ValueError(f"data-parallel size must be >= 1, got {dp}")
    weights_and_grads = 4 if mixed_precision else 8
    if not zero:
        return weights_and_grads + (12 if mixed_precision else 8)
    return weights_and_grads + 12 / dp


def zero1_optimizer_state_bytes(num_params: int | Sequence[int], dp: int, alignment: int = 2,
                                master_bytes: int = 4, moment_bytes: int = 4) -> dict[str, int]:
    """Exact optimizer-state bytes per rank of DeepSpeed ZeRO-1 + torch Adam (module docstring).

    ``num_params``: trainable elements, or one count per parameter group. Each group is padded to a
    multiple of ``alignment · dp``; this rank keeps ``1/dp`` of it as fp32 master, ``m`` and ``v``.
    """
    groups = [num_params] if isinstance(num_params, int) else list(num_params)
    partition = sum(partition_numel(n, dp, alignment) for n in groups)
    return {"fp32_master": master_bytes * partition, "exp_avg": moment_bytes * partition,
            "exp_avg_sq": moment_bytes * partition, "step": 4 * len(groups)}


def adam_state_bytes(params: Sequence[torch.Tensor]) -> dict[str, int]:
    """Plain ``torch.optim.Adam`` after one step: ``m``, ``v`` like each parameter, one fp32 step each."""
    params = list(params)
    moments = sum(p.numel() * p.element_size() for p in params)
    return {"exp_avg": moments, "exp_avg_sq": moments, "step": 4 * len(params)}
