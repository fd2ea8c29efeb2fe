"""Which accelerator this process runs on, and everything that depends on it.

The one place in the package that knows about CUDA and Gaudi. Model code asks this module for the
device, the torch.distributed backend, whether to call ``mark_step()`` and which dtype to autocast to;
it never calls ``torch.cuda`` or imports ``habana_frameworks`` itself.

=========  ===========  =========  ===============  ==========================================
device     backend      mark_step  torch.compile    notes
=========  ===========  =========  ===============  ==========================================
``cpu``    ``gloo``     no-op      off (opt-in)     simulated ranks on a laptop; autocast bf16
``cuda``   ``nccl``     no-op      ``inductor``     one GPU per local rank
``hpu``    ``hccl``     lazy mode  ``hpu_backend``  Intel Gaudi; ``habana_frameworks`` is
                                   (eager mode)     imported only here, only when present
=========  ===========  =========  ===============  ==========================================

Override the choice with ``MINIMEGATRON_DEVICE`` (or DeepSpeed's ``DS_ACCELERATOR``), e.g. to force
``cpu`` on a machine that has a GPU. DeepSpeed's accelerator abstraction makes the same choice for the
engine; :func:`device_type` agrees with it (cpu→gloo, cuda→nccl, hpu→hccl).

**Gaudi's two execution modes** (``PT_HPU_LAZY_MODE``, read by Habana's bridge at start-up):

* lazy (``=1``; the default of the torch-2.6-era images): ops are *recorded*, not run; ``mark_step()``
  compiles the recorded graph (cached by shape) and launches it. A training step needs one after
  ``backward()`` and one after ``optimizer.step()`` — :func:`backward_and_step` does exactly that.
* eager (``=0``; the default of newer releases): ops run one by one, and ``torch.compile(model,
  backend="hpu_backend")`` (:func:`compile_model`) turns the model into graphs. ``mark_step`` is a no-op.

**Static shapes.** Both modes compile one graph per input shape. Keep shapes fixed: every batch
``(micro_batch, seq_len)`` (our samples are fixed-length windows; use ``drop_last=True`` or pad the last
batch), no data-dependent shapes inside the step (``x[mask]``, ``nonzero``, ``.item()`` in the loop).
A new shape is not an error, only a recompilation — which shows up as a slow step.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Any, Iterator

import torch

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "hpu": "hccl"}
ENV_VARS = ("MINIMEGATRON_DEVICE", "DS_ACCELERATOR")

# Peak dense BF16 matrix throughput, in TFLOP/s, from the vendors' public spec sheets (sparsity off):
# NVIDIA H100 datasheet (SXM 989, PCIe 756; the sheet's 1979/1513 assume 2:4 sparsity), H200 = H100 SXM
# compute, A100 datasheet 312; Intel Gaudi 3 white paper (Gaudi 2: 432, Gaudi 3: 1835 BF16 MME).
PEAK_BF16_TFLOPS = {"gaudi3": 1835.0, "gaudi2": 432.0, "h200": 989.0, "h100 pcie": 756.0,
                    "h100": 989.0, "a100": 312.0}


def _import(name: str) -> ModuleType | None:
    """``importlib.import_module(name)``, or None when that module (or its package) is absent."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def habana_core() -> ModuleType | None:
    """``habana_frameworks.torch.core`` if installed (Habana's containers), else None."""
    return _import("habana_frameworks.torch.core")


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


def align_deepspeed() -> str:
    """Tell DeepSpeed the device chosen here (``DS_ACCELERATOR``, unless already set) and return it.

    DeepSpeed picks its accelerator once, when first imported, by its own detection, and on a CPU
    machine warns "Setting accelerator to CPU ... we were unable to detect it". ``import minimegatron``
    calls this first, so the engine and the package agree by construction (also when
    ``MINIMEGATRON_DEVICE=cpu`` forces the CPU on a machine that has a GPU) and nothing warns."""
    kind = device_type()
    os.environ.setdefault("DS_ACCELERATOR", kind)
    return kind


def dist_backend(kind: str | None = None) -> str:
    """The torch.distributed backend for a device type: gloo | nccl | hccl."""
    kind = kind or device_type()
    if kind == "hpu":  # registers the 'hccl' backend with torch.distributed
        try:
            importlib.import_module("habana_frameworks.torch.distributed.hccl")
        except ImportError as err:
            raise RuntimeError("the hccl backend comes with Habana's habana_frameworks, which is not "
                               "installed here: run inside Habana's PyTorch container, or choose "
                               "another device (MINIMEGATRON_DEVICE=cpu)") from err
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


def device_count(kind: str) -> int:
    """How many cards of ``kind`` this machine really has (ignores the env override)."""
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "hpu":
        return torch.hpu.device_count() if _hpu_available() else 0
    return 1


def device_name(kind: str | None = None) -> str:
    """A human name: 'cpu', 'NVIDIA H100 80GB HBM3', 'GAUDI2', ..."""
    kind = kind or device_type()
    if kind == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    if kind == "hpu" and _hpu_available():
        return torch.hpu.get_device_name()
    return kind


def peak_flops(name: str | None = None) -> float | None:
    """Peak dense BF16 FLOP/s of a device (by :func:`device_name`), None when not in the table."""
    key = (name if name is not None else device_name()).lower().replace("-", " ").replace("_", " ")
    for model, tflops in PEAK_BF16_TFLOPS.items():  # "h100 pcie" is tested before "h100"
        if model in key or model.replace(" ", "") in key.replace(" ", ""):
            return tflops * 1e12
    return None


def is_lazy_mode() -> bool:
    """Gaudi's lazy mode accumulates ops into a graph that runs at ``mark_step()``.

    ``PT_HPU_LAZY_MODE`` decides when set; otherwise the bridge is asked (its default changed across
    releases), and a bridge too old to answer is lazy.
    """
    if device_type() != "hpu":
        return False
    env = os.environ.get("PT_HPU_LAZY_MODE")
    if env is not None:
        return env == "1"
    internal = _import("habana_frameworks.torch.utils.internal")
    if internal is not None and hasattr(internal, "is_lazy"):
        return bool(internal.is_lazy())
    return True


def mark_step() -> None:
    """Flush Gaudi's lazy graph (call after backward and after optimizer.step); no-op elsewhere."""
    if is_lazy_mode():
        core = habana_core()
        if core is not None:
            core.mark_step()


def backward_and_step(loss: torch.Tensor, optimizer: Any) -> None:
    """One optimizer step, with the two ``mark_step()`` calls Gaudi's lazy mode needs.

    ``optimizer`` is a ``torch.optim.Optimizer`` (its grads are zeroed afterwards) or a DeepSpeed
    engine (``engine.backward(loss)``; ``engine.step()`` zeroes the grads itself)::

        backward  ─ mark_step ─  step  ─ mark_step      (mark_step is a no-op off Gaudi / in eager mode)
    """
    engine = hasattr(optimizer, "backward")  # a DeepSpeedEngine; torch optimizers have no backward
    if engine:
        optimizer.backward(loss)
    else:
        loss.backward()
    mark_step()  # graph 1: forward + backward
    optimizer.step()
    mark_step()  # graph 2: the optimizer update
    if not engine:
        optimizer.zero_grad(set_to_none=True)


def autocast_dtype(kind: str | None = None) -> torch.dtype:
    """Mixed-precision dtype per device: bf16 on Gaudi and CPU, bf16 on CUDA when supported."""
    kind = kind or device_type()
    if kind == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16  # pre-Ampere GPUs: fp16 needs a loss scaler (DeepSpeed's fp16 config)
    return torch.bfloat16


@contextlib.contextmanager
def autocast(kind: str | None = None, dtype: torch.dtype | None = None,
             enabled: bool = True) -> Iterator[None]:
    """``torch.autocast`` for this device: matmuls in bf16 (fp32 weights and reductions stay fp32)."""
    kind = kind or device_type()
    with torch.autocast(device_type=kind, dtype=dtype or autocast_dtype(kind), enabled=enabled):
        yield


def compile_backend(kind: str | None = None, cpu: bool = False) -> str | None:
    """The ``torch.compile`` backend for a device, None where the model should run uncompiled.

    hpu: ``"hpu_backend"`` in eager mode, None in lazy mode (lazy mode builds its own graphs and
    Habana's bridge refuses torch.compile there). cuda: ``"inductor"``. cpu: None unless ``cpu=True``
    (inductor needs a C++ compiler and compiles for longer than a notebook experiment runs).
    """
    kind = kind or device_type()
    if kind == "hpu":
        return None if is_lazy_mode() else "hpu_backend"
    if kind == "cuda" or cpu:
        return "inductor"
    return None


def compile_model(model: torch.nn.Module, kind: str | None = None, cpu: bool = False,
                  **compile_kwargs: Any) -> torch.nn.Module:
    """``torch.compile(model, backend=compile_backend(kind))``, or ``model`` itself when None."""
    backend = compile_backend(kind, cpu=cpu)
    if backend is None:
        return model
    if backend == "hpu_backend":  # registers the backend with torch._dynamo
        importlib.import_module("habana_frameworks.torch.core")
    return torch.compile(model, backend=backend, **compile_kwargs)


def synchronize() -> None:
    """Wait for queued device work (for honest timings); no-op on CPU."""
    kind = device_type()
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "hpu":
        mark_step()  # in lazy mode nothing is queued until the graph is flushed
        torch.hpu.synchronize()


def max_memory_allocated() -> int | None:
    """Peak bytes allocated on this rank's card since start (None on CPU)."""
    kind = device_type()
    if kind == "cuda":
        return torch.cuda.max_memory_allocated()
    if kind == "hpu":
        return torch.hpu.max_memory_allocated()
    return None


def describe() -> dict[str, Any]:
    """What this process would use: device, backend, mark_step, autocast, compile, peak FLOP/s."""
    kind = device_type()
    peak = peak_flops(device_name(kind))
    return {"device": kind, "name": device_name(kind), "dist_backend": BACKENDS[kind],
            "lazy_mode (mark_step)": is_lazy_mode(), "autocast_dtype": str(autocast_dtype(kind)),
            "compile_backend": compile_backend(kind),
            "peak_bf16_tflops": None if peak is None else peak / 1e12,
            "habana_frameworks installed": habana_core() is not None}
