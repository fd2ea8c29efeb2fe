"""A stand-in for Habana's ``habana_frameworks`` package, for tests on machines without a Gaudi.

``install(monkeypatch)`` puts fake modules into ``sys.modules`` (undone after the test) and returns a
recorder. The fake kernels have the call signatures of Habana's autograd Functions, record every
call (arguments' shapes and dtypes) and compute the textbook result with plain tensor ops, so a test
can check both that the dispatcher called the kernel the documented way and that the answer is right.
"""
from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Recorder:
    calls: list[tuple[str, Any]] = field(default_factory=list)
    lazy: bool = True  # what the fake bridge's is_lazy() answers

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def install(monkeypatch, lazy: bool = True, kernels: bool = True) -> Recorder:
    rec = Recorder(lazy=lazy)

    class FusedRMSNorm:
        @staticmethod
        def apply(x, weight, eps):
            rec.calls.append(("FusedRMSNorm", (tuple(x.shape), x.dtype, weight.dtype, eps)))
            assert x.dim() == 3 and x.dtype == weight.dtype
            return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    class RotaryPosEmbeddingHelperV1:
        @staticmethod
        def apply(p, cos, sin, offset):
            rec.calls.append(("RotaryPosEmbeddingHelperV1", (tuple(p.shape), tuple(cos.shape), offset)))
            assert cos.dtype == p.dtype == sin.dtype and offset == 0
            half = p.shape[-1] // 2
            rotated = torch.cat((-p[..., half:], p[..., :half]), dim=-1)
            return p * cos + rotated * sin

    class FusedSDPA:
        @staticmethod
        def apply(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *rest):
            rec.calls.append(("FusedSDPA", (tuple(q.shape), tuple(k.shape), attn_mask, dropout_p,
                                            is_causal, scale)))
            assert q.shape[1] == k.shape[1], "the dispatcher expands kv heads before the kernel"
            scores = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
            if is_causal:
                s = q.shape[-2]
                scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
            return scores.softmax(-1) @ v

    def module(name: str, **attrs: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    module("habana_frameworks")
    module("habana_frameworks.torch")
    module("habana_frameworks.torch.core", mark_step=lambda *a, **k: rec.calls.append(("mark_step", a)))
    module("habana_frameworks.torch.distributed")
    module("habana_frameworks.torch.distributed.hccl")
    module("habana_frameworks.torch.utils")
    module("habana_frameworks.torch.utils.internal", is_lazy=lambda: rec.lazy)
    if kernels:
        module("habana_frameworks.torch.hpex")
        module("habana_frameworks.torch.hpex.kernels", FusedSDPA=FusedSDPA,
               RotaryPosEmbeddingHelperV1=RotaryPosEmbeddingHelperV1)
        module("habana_frameworks.torch.hpex.normalization", FusedRMSNorm=FusedRMSNorm)
    else:  # a bridge without hpex: every import of it fails
        monkeypatch.setitem(sys.modules, "habana_frameworks.torch.hpex", None)
    return rec
