"""Moving a checkpoint's full tensors to the rank that writes it (global rank 0), without pickle.

After ``checkpointing.save_training_checkpoint`` has made each tensor whole over TP (and ZeRO's DP
pieces), the ranks that hold something rank 0 lacks send it, point to point::

    stage p > 0:      its (tp 0, cp 0, dp 0) rank sends every full tensor of its stage
    ep > 1:           the (tp 0, cp 0, dp 1 … ep-1) ranks of every stage send their experts (other
                      experts than dp rank 0's; already named by their global index)

A message is a length, a JSON header ``[[name, shape, dtype], …]`` as uint8 bytes, then each tensor.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

from minimegatron.mpu.state import ParallelState

__all__ = ["gather_to_writer"]


def _send(tensors: dict[str, torch.Tensor], dst: int, device: torch.device) -> None:
    header = json.dumps([[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
                         for k, v in tensors.items()]).encode()
    dist.send(torch.tensor([len(header)], device=device), dst)
    dist.send(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device), dst)
    for v in tensors.values():
        dist.send(v.contiguous().to(device), dst)


def _recv(src: int, device: torch.device) -> dict[str, torch.Tensor]:
    size = torch.zeros(1, dtype=torch.long, device=device)
    dist.recv(size, src)
    header = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.recv(header, src)
    out = {}
    for name, shape, dtype in json.loads(header.cpu().numpy().tobytes()):
        out[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.recv(out[name], src)
    return out


def gather_to_writer(tensors: dict[str, torch.Tensor], state: ParallelState, device: torch.device,
                     experts: set[str]) -> dict[str, torch.Tensor] | None:
    """Every stage's full tensors, in stage order, on global rank 0; None on every other rank.

    ``experts``: the global names of this rank's expert tensors (a moment ``exp_avg/<name>`` by its
    ``<name>``); with ep > 1 the dp ranks 1 … ep-1 of (tp 0, cp 0) hold other experts and send those."""
    ep = getattr(state, "ep", 1)
    if state.tp_rank != 0 or state.cp_rank != 0 or state.dp_rank >= ep:
        return None  # its replica/shard twin on (tp 0, cp 0, dp < ep) has the same full tensors
    if state.dp_rank > 0:  # another EP rank: only its experts are not on dp rank 0
        _send({k: v for k, v in tensors.items() if k.split("/", 1)[-1] in experts}, 0, device)
        return None
    if state.pp_rank > 0:
        _send(tensors, 0, device)
        return None
    out = dict(tensors)
    for stage in range(state.pp):
        for d in range(0 if stage else 1, ep):
            out.update(_recv(ParallelState.rank_of(0, d, stage, state.tp, state.dp, 0, state.cp), device))
    return out
