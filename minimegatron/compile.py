"""``torch.compile`` for a minimegatron model: one call, the right backend for the device.

    model = minimegatron.compile_model(GPTModel(config))      # in place; returns the same module
    loss = model(ids, labels=labels)                          # first call: traces and compiles

**What compile does.** TorchDynamo traces ``forward`` into an FX graph (Python control flow
resolved for these shapes), AOTAutograd derives the backward graph from it ahead of time, and the
backend turns both into code: ``"inductor"`` fuses the element-wise chains (bias + GELU, RMSNorm,
RoPE, the residual adds, the loss's exp/sum) into generated C++ (CPU) or Triton (CUDA) kernels and
leaves the matmuls to the BLAS library; on Gaudi ``"hpu_backend"`` hands the graphs to Habana's
graph compiler. The arithmetic is the same, so losses and gradients match eager to fp32 round-off
(the order of a fused reduction may differ). The first call of each input shape pays the compile
(seconds to minutes); a new shape compiles again, so keep shapes fixed (see ``device.py``).

=========  ===============  ===================================================================
device     backend          notes
=========  ===============  ===================================================================
cpu        ``inductor``     needs a C++ compiler (g++/clang); no triton needed
cuda       ``inductor``     Triton kernels
hpu        ``hpu_backend``  eager mode only (``PT_HPU_LAZY_MODE=0``): lazy mode builds its own
                            graphs and is refused here in one line
=========  ===============  ===================================================================

``nn.Module.compile`` compiles *in place*: the parameters, their names (``state_dict`` keys, no
``_orig_mod.`` prefix), hooks and the TP marks stay as they are, so checkpoints, DeepSpeed's engine
(``engine.compile()`` calls exactly this) and the rest of the package see the same module.
"""
from __future__ import annotations

import importlib
import shutil
from typing import Any

from torch import nn

from minimegatron import device

__all__ = ["compile_model", "resolve_backend"]


def resolve_backend(backend: str | None = None, kind: str | None = None) -> str:
    """The backend to compile with on ``kind`` (default: this process's device); ValueError where
    compiling cannot work (Gaudi in lazy mode, inductor on a CPU without a C++ compiler)."""
    kind = kind or device.device_type()
    if backend is None:
        backend = device.compile_backend(kind, cpu=True)
        if backend is None:  # only Gaudi's lazy mode says "do not compile"
            raise ValueError("torch.compile on Gaudi in lazy mode (PT_HPU_LAZY_MODE=1): the bridge builds "
                             "its own graphs there and refuses torch.compile; run with PT_HPU_LAZY_MODE=0 "
                             "to compile with hpu_backend, or leave compile off")
    if backend == "inductor" and kind == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ValueError("torch.compile with inductor on CPU generates C++ and needs a C++ compiler, and "
                         "none (g++, c++, clang++) is on PATH; install one (apt-get install g++), or "
                         "leave compile off")
    return backend


def compile_model(model: nn.Module, backend: str | None = None, **compile_kwargs: Any) -> nn.Module:
    """Compile ``model`` in place with ``backend`` (None: the device's, see the table); returns it."""
    backend = resolve_backend(backend)
    if backend == "hpu_backend":  # registers the backend with torch._dynamo
        importlib.import_module("habana_frameworks.torch.core")
    model.compile(backend=backend, **compile_kwargs)
    return model
