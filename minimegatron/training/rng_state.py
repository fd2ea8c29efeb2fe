"""Every rank's random generators in a training checkpoint: saved always, restored at the same layout.

Dropout masks (and anything else random) come from per-rank generators: torch's default one(s) and the
tracker's model-parallel stream (:mod:`minimegatron.mpu.random`). A save gathers every rank's states
into ``rng.safetensors`` as ``rank<r>/<generator>`` (uint8 tensors: no pickle)::

    rank0/cpu, rank0/model-parallel-rng, rank1/cpu, ...       (+ rank<r>/cuda or hpu on a device)

A resume at the same tp/pp/dp gives rank ``r`` back exactly its states, so the run continues with the
masks it would have drawn. At another layout rank ``r`` is another shard of another stage: the states
cannot carry over, so every rank is reseeded from ``seed + step`` (the losses still match when
dropout is 0; a warning says so when it is not).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from minimegatron.checkpoint.files import RNG_NAME, open_safetensors
from minimegatron.mpu.state import ParallelState
from minimegatron.training.config import TrainConfig

__all__ = ["gather_rng_states", "restore_rng_states"]


def _rng_states(state: ParallelState) -> dict[str, torch.Tensor]:
    """This rank's generators: the default one(s) and the model-parallel stream of ``state.rng_tracker``."""
    from minimegatron.device import device_type

    states = {"cpu": torch.get_rng_state()}
    kind = device_type()
    if kind != "cpu":
        states[kind] = torch.get_device_module(kind).get_rng_state()
    states.update(state.rng_tracker.get_states())
    return states


def gather_rng_states(state: ParallelState, device: torch.device) -> dict[str, torch.Tensor]:
    """rank<r>/<generator> for every rank (all ranks hold generators of the same sizes)."""
    mine = _rng_states(state)
    blob = torch.cat([v.reshape(-1).to(torch.uint8) for v in mine.values()]).to(device)  # (bytes,)
    blobs = [torch.empty_like(blob) for _ in range(state.world_size)]
    dist.all_gather(blobs, blob)
    out = {}
    for rank, b in enumerate(blobs):
        for (name, v), piece in zip(mine.items(), b.cpu().split([v.numel() for v in mine.values()])):
            out[f"rank{rank}/{name}"] = piece.clone()
    return out


def restore_rng_states(path: Path, trainer: dict, cfg: TrainConfig, state: ParallelState, step: int) -> None:
    """This rank's generators from ``path``'s rng.safetensors if the layout is the one it was saved at;
    else reseeded from ``seed + step`` (with a warning when dropout makes the difference visible)."""
    from minimegatron.device import device_type
    from minimegatron.mpu.random import model_parallel_seed

    saved = trainer["layout"]
    if (saved["tp"], saved["pp"], saved["dp"], saved.get("cp", 1)) == (state.tp, state.pp, state.dp,
                                                                          state.cp) and \
            (path / RNG_NAME).is_file():
        with open_safetensors(path / RNG_NAME) as fh:
            states = {k.split("/", 1)[1]: fh.get_tensor(k) for k in fh.keys()
                      if k.startswith(f"rank{state.rank}/")}
        torch.set_rng_state(states.pop("cpu"))
        kind = device_type()
        if kind in states:
            torch.get_device_module(kind).set_rng_state(states.pop(kind))
        state.rng_tracker.set_states(states)
        return
    model_parallel_seed(cfg.seed + step, state)
    if cfg.dropout > 0 and state.rank == 0:
        warnings.warn(f"resuming at tp={state.tp} pp={state.pp} dp={state.dp} from a checkpoint saved at "
                      f"tp={saved['tp']} pp={saved['pp']} dp={saved['dp']}: the per-rank random generators "
                      f"cannot carry over, dropout masks are new draws (seeded {cfg.seed} + {step})")
