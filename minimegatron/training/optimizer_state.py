"""Adam's state per parameter, whichever DeepSpeed optimizer holds it (plain, ZeRO-1/2/3, bf16).

A checkpoint that any layout can load stores, for every parameter ``W`` of the model (by name),
the fp32 tensors AdamW keeps for it::

    exp_avg     m_t = β₁·m_{t-1} + (1-β₁)·g_t          (first moment, the shape of W)
    exp_avg_sq  v_t = β₂·v_{t-1} + (1-β₂)·g_t²         (second moment, the shape of W)
    master      the fp32 copy of W the optimizer updates (differs from W only under bf16)
    step        t, shared by all parameters (Adam's bias correction 1 - βᵗ)

DeepSpeed keeps them in one of three places. :class:`OptimizerState` reads and writes one
parameter's (this rank's TP shard) without the caller knowing which:

===========================  ==============================================================
torch AdamW (ZeRO 0, fp32)    ``optimizer.state[W]`` — the model parameter itself
FP16_UnfusedOptimizer         ``optimizer.state[W32]`` with ``W32`` the fp32 copy paired with W
(ZeRO 0, bf16, pp = 1)        in ``fp32_groups`` (index by index with ``fp16_groups``)
ZeRO-1/2 / BF16_Optimizer     one flat fp32 tensor per param group, cut in ``dp`` partitions; rank
                              ``d`` holds partition ``d``, so a parameter may be split between two
                              ranks. ``W._hp_mapping`` says which piece of W lies where in this
                              rank's partition (``lp_fragment_address`` in W, ``hp_fragment_address``
                              in the flat partition); reading W's moment puts the pieces of every
                              replica in one buffer: an all-reduce (sum of disjoint pieces) over DP.
ZeRO-3                        every parameter is cut on its own: W flattened, padded to
(DeepSpeedZeroOptimizer_      ``dp · ⌈n/dp⌉``, rank ``d`` holds elements ``d·⌈n/dp⌉`` to
Stage3)                       ``(d+1)·⌈n/dp⌉ - 1`` (``W.ds_tensor``; ``W`` itself is empty,
                              ``W.ds_shape`` its shape).
                              The fp32 copy and the moments of that piece lie at an offset of one
                              flat fp32 tensor per sub-group (``deepspeed_glue.zero3_fp32_piece``);
                              reading W's moment is again an all-reduce of disjoint pieces over DP.
===========================  ==============================================================

(These are DeepSpeed's own "universal checkpoint" mappings; its ``safe_get_full_optimizer_state``
reads the same pieces, but only once the first step has linked them, and it cannot create state.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from minimegatron.deepspeed_glue import is_zero3_param, zero3_fp32_flats, zero3_fp32_piece

__all__ = ["OptimizerState", "MOMENTS"]

MOMENTS = ("exp_avg", "exp_avg_sq")


class OptimizerState:
    """The fp32 state of ``engine.optimizer``, parameter by parameter (this rank's TP shard)."""

    def __init__(self, engine) -> None:
        optimizer = self.optimizer = engine.optimizer
        self.inner: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)  # the AdamW
        if not isinstance(self.inner, torch.optim.Optimizer):
            raise TypeError(f"cannot read the state of {type(optimizer).__name__}: expected a torch "
                            "optimizer, possibly wrapped by DeepSpeed")
        # what the AdamW steps, with its param group (ZeRO-3 lends them to param_groups in step only)
        self.stepped: list[tuple[torch.Tensor, dict]] = (
            [(flat, self.inner.param_groups[g]) for flat, g in zero3_fp32_flats(optimizer)]
            if hasattr(optimizer, "fp32_partitioned_groups_flat") else
            [(p, group) for group in self.inner.param_groups for p in group["params"]])
        self.fp32_copy: dict[torch.Tensor, torch.Tensor] = {}
        if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
            for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):
                self.fp32_copy.update(zip(low, high))

    # ---- where a parameter's state lives ----------------------------------------------------------
    @staticmethod
    def _partitioned(param: torch.Tensor) -> bool:
        return hasattr(param, "_hp_mapping")  # set on every parameter by ZeRO-1/2 and BF16_Optimizer

    @staticmethod
    def shape(param: torch.Tensor) -> tuple[int, ...]:
        """The shape of this rank's TP shard of ``param`` (under ZeRO-3 the Parameter itself is empty)."""
        return tuple(param.ds_shape) if is_zero3_param(param) else tuple(param.shape)

    def _zero3_piece(self, param: torch.Tensor, key: str, create: bool = False) -> torch.Tensor | None:
        """This rank's ``(⌈n/dp⌉,)`` piece of ``param``'s ``key`` under ZeRO-3 (None: no state yet)."""
        flat, offset, numel = zero3_fp32_piece(self.optimizer, param)
        if key == "master":
            return flat.narrow(0, offset, numel)
        state = self._ensure(flat) if create else self.inner.state[flat]
        return state[key].narrow(0, offset, numel) if key in state else None

    def _flat(self, mapping) -> torch.Tensor:
        """The flat fp32 partition this rank's optimizer steps for the mapping's param group."""
        return self.inner.param_groups[mapping.param_group_index]["params"][0]

    def _ensure(self, target: torch.Tensor) -> dict:
        """AdamW's state of ``target``, created as a fresh one (zero moments) if it has none yet."""
        state = self.inner.state[target]
        if not state:
            group = next(g for p, g in self.stepped if p is target)
            on_device = group.get("capturable") or group.get("fused")
            state["step"] = torch.zeros((), dtype=torch.float32,
                                        device=target.device if on_device else "cpu")
            for key in MOMENTS:
                state[key] = torch.zeros_like(target, memory_format=torch.preserve_format)
        return state

    # ---- read --------------------------------------------------------------------------------------
    @torch.no_grad()
    def get(self, param: torch.Tensor, key: str) -> torch.Tensor:
        """``key`` in ("master", "exp_avg", "exp_avg_sq") of ``param``: an fp32 tensor of its shape.

        Missing state (no step taken yet) reads as zeros. Collective over DP under ZeRO."""
        if is_zero3_param(param):
            group = param.ds_process_group
            flat, _, piece = zero3_fp32_piece(self.optimizer, param)
            source = self._zero3_piece(param, key)  # (⌈n/dp⌉,) or None
            buffer = torch.zeros(piece * dist.get_world_size(group), dtype=torch.float32,
                                 device=flat.device)  # (dp·⌈n/dp⌉,)
            if source is not None:
                buffer.narrow(0, dist.get_rank(group) * piece, piece).copy_(source)
            dist.all_reduce(buffer, group=group)  # the pieces of all replicas
            return buffer[:param.ds_numel].view(param.ds_shape)  # padding dropped
        if self._partitioned(param):
            buffer = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)  # (n,)
            mapping = param._hp_mapping
            if mapping is not None:  # this rank holds a piece of W
                flat = self._flat(mapping)
                source = flat if key == "master" else self.inner.state[flat].get(key)
                if source is not None:
                    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                    buffer.narrow(0, lp.start, lp.numel).copy_(source.narrow(0, hp.start, hp.numel))
            dist.all_reduce(buffer, group=param._dp_group)  # the pieces of all replicas
            return buffer.view(param.shape)
        target = self.fp32_copy.get(param, param)
        if key == "master":
            return target.detach().float().clone()
        value = self.inner.state[target].get(key)
        return torch.zeros_like(target, dtype=torch.float32) if value is None else value.float().clone()

    def step_count(self) -> int:
        """Adam's ``t``: the number of steps it has taken (0 before the first)."""
        for state in self.inner.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    # ---- write -------------------------------------------------------------------------------------
    @torch.no_grad()
    def set(self, param: torch.Tensor, key: str, value: torch.Tensor) -> None:
        """Write ``value`` (``param``'s shape) as its ``key``; this rank's piece only, no communication."""
        if tuple(value.shape) != self.shape(param):
            raise ValueError(f"{key}: got shape {tuple(value.shape)} for a parameter of shape "
                             f"{self.shape(param)}")
        if is_zero3_param(param):
            target = self._zero3_piece(param, key, create=True)  # (⌈n/dp⌉,)
            flat = value.reshape(-1).to(target)
            flat = torch.cat([flat, flat.new_zeros(target.numel() * dist.get_world_size(
                param.ds_process_group) - flat.numel())])  # (dp·⌈n/dp⌉,): zero padding
            rank = dist.get_rank(param.ds_process_group)
            target.copy_(flat.narrow(0, rank * target.numel(), target.numel()))
            return
        if self._partitioned(param):
            mapping = param._hp_mapping
            if mapping is None:
                return  # no piece of W in this rank's partition
            flat = self._flat(mapping)
            target = flat if key == "master" else self._ensure(flat)[key]
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            target.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))
            return
        target = self.fp32_copy.get(param, param)
        if key == "master":
            target.copy_(value)
        else:
            self._ensure(target)[key].copy_(value)

    def set_step_count(self, step: int) -> None:
        """Give every parameter's state Adam's ``t = step`` (creating zero state where there is none)."""
        for p, _ in self.stepped:
            state = self._ensure(p)
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step
