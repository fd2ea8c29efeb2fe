"""Which accelerator this process runs on, and everything that depends on it.

The one place in the package that knows about CUDA and Gaudi. Model code asks this module for the
device, the torch.distributed backend, whether to call ``mark_step()`` and which dtype to autocast to;
it never calls ``torch.cuda`` or imports ``habana_frameworks`` itself.

=========  ===========  =========  ==========================================================
device     backend      mark_step  notes
=========  ===========  =========  ==========================================================
``cpu``    ``gloo``     no-op      simulated ranks on a laptop; autocast to bfloat16
``cuda``   ``nccl``     no-op      one GPU per local rank
``hpu``    ``hccl``     lazy mode  Intel Gaudi; ``habana_frameworks`` is imported only here,
                                   only when present
=========  ===========  =========  ==========================================================

Override the choice with ``MINIMEGATRON_DEVICE`` (or DeepSpeed's ``DS_ACCELERATOR``), e.g. to force
``cpu`` on a machine that has a GPU. DeepSpeed's accelerator abstraction makes the same choice for the
engine; :func:`device_type` agrees with it (cpu→gloo, cuda→nccl, hpu→hccl).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "hpu": "hccl"}
ENV_VARS = ("MINIMEGATRON_DEVICE", "DS_ACCELERATOR")


def habana_core() -> ModuleType | None:
    """``habana_frameworks.torch.core`` if installed (Habana's containers), else None."""
    try:
        return importlib.import_module("habana_frameworks.torch.core")
    except ImportError:
        return None


def _hpu_available() -> bool:
    if habana_core() is None:
        return False
    hpu = getattr(torch, "hpu", None)
    return bool(hpu is not None and hpu.is_available())


def device_type() -> str:
    """'cpu', 'cuda' or 'hpu': the env override if set, else the best accelerator present."""
    for var in ENV_VARS:
        forced = os.environ.get(var)
        if forced:
            forced = forced.lower()
            if forced not in BACKENDS:
                raise ValueError(f"{var}={forced!r} is not a device minimegatron knows; "
                                 f"use one of {sorted(BACKENDS)}.")
            return forced
    if _hpu_available():
        return "hpu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def dist_backend(kind: str | None = None) -> str:
    """The torch.distributed backend for a device type: gloo | nccl | hccl."""
    kind = kind or device_type()
    if kind == "hpu":  # registers the 'hccl' backend with torch.distributed
        importlib.import_module("habana_frameworks.torch.distributed.hccl")
    return BACKENDS[kind]


def get_device(local_rank: int | None = None) -> torch.device:
    """The torch.device this rank computes on (``cuda:<local_rank>`` on a multi-GPU node)."""
    kind = device_type()
    if kind == "cpu":
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if kind == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device("hpu")  # Habana exposes one card per process as plain "hpu"


def set_device_for_rank(local_rank: int) -> torch.device:
    """Pin this process to its card before init_process_group (needed by nccl; harmless elsewhere)."""
    dev = get_device(local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def is_lazy_mode() -> bool:
    """Gaudi's lazy mode accumulates ops into a graph that runs at ``mark_step()``."""
    return device_type() == "hpu" and os.environ.get("PT_HPU_LAZY_MODE", "1") == "1"


def mark_step() -> None:
    """Flush Gaudi's lazy graph (call after backward and after optimizer.step); no-op elsewhere."""
    if is_lazy_mode():
        core = habana_core()
        if core is not None:
            core.mark_step()


def autocast_dtype(kind: str | None = None) -> torch.dtype:
    """Mixed-precision dtype per device: bf16 on Gaudi and CPU, bf16 on CUDA when supported."""
    kind = kind or device_type()
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def synchronize() -> None:
    """Wait for queued device work (for honest timings); no-op on CPU."""
    kind = device_type()
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "hpu":
        torch.hpu.synchronize()
