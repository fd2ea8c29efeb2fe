"""minimegatron.compile_model: the compiled model computes what the eager one does, and says no clearly.

Compiling is slow (inductor generates and builds C++ on CPU), so the size is the benchmark's "quick"
LLaMA: the trainer test (tests/training/test_engine.py) and the benchmark's smoke test compile the same
graphs and reuse inductor's on-disk cache.
"""
import copy
import shutil

import pytest
import torch

from minimegatron import compile_model
from minimegatron.compile import resolve_backend
from minimegatron.llama import LLaMAModel
from benchmarks.throughput_vs_hf import model_config


def test_compiled_forward_backward_equals_eager():
    config, batch, seq = model_config("llama", "quick")
    torch._dynamo.reset()  # the benchmark's smoke test may have traced this very model in this process
    torch.manual_seed(0)
    eager = LLaMAModel(config).train()
    compiled = compile_model(copy.deepcopy(eager))
    assert compiled._compiled_call_impl is not None  # compiled in place ...
    assert list(compiled.state_dict()) == list(eager.state_dict())  # ... keeping the weights' names
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    labels = torch.roll(ids, -1, dims=1)
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    losses = []
    for model in (eager, compiled):
        loss = model(ids, labels=labels)
        loss.backward()
        losses.append(loss.detach())
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo really traced it
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_backend_per_device(monkeypatch):
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    assert resolve_backend(kind="cpu") == "inductor"
    assert resolve_backend(kind="cuda") == "inductor"
    assert resolve_backend("aot_eager", kind="cpu") == "aot_eager"
    monkeypatch.setenv("MINIMEGATRON_DEVICE", "hpu")  # device_type() decides lazy mode for "hpu"
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    assert resolve_backend(kind="hpu") == "hpu_backend"
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "1")
    with pytest.raises(ValueError, match=r"^torch.compile on Gaudi in lazy mode .*PT_HPU_LAZY_MODE=0"):
        resolve_backend(kind="hpu")


def test_no_cpp_compiler_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"needs a C\+\+ compiler, and none .* is on PATH; install one"):
        resolve_backend(kind="cpu")
