"""The Gaudi code paths that run without a Gaudi, against ``tests/fake_habana.py`` (both CI stacks).

What a real HPU run depends on and a CPU machine can still check: the device is chosen when
Habana's bridge says a card is there; the hccl backend is registered (its module imported) before
``init_process_group``; the training step flushes lazy mode's graph after backward and after the
optimizer step — and nowhere in between; autocast is asked for the ``hpu`` device type in bf16;
the launch script sets the recipe cache; the kernels fall back cleanly (tests/test_kernels.py).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minimegatron import device
from tests import fake_habana

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hpu(monkeypatch):
    """A machine where Habana's bridge is installed and reports one card (no override env)."""
    for var in device.ENV_VARS + ("PT_HPU_LAZY_MODE",):
        monkeypatch.delenv(var, raising=False)
    rec = fake_habana.install(monkeypatch)
    fake_hpu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8,
                                     get_device_name=lambda: "GAUDI2", synchronize=lambda: None,
                                     max_memory_allocated=lambda: 0)
    monkeypatch.setattr(torch, "hpu", fake_hpu, raising=False)
    return rec


def test_a_gaudi_is_chosen_when_the_bridge_reports_a_card(hpu):
    assert device.device_type() == "hpu"
    assert device.get_device() == torch.device("hpu")
    assert device.dist_backend() == "hccl"
    assert device.device_count("hpu") == 8
    assert device.peak_flops() == 432e12  # GAUDI2 by name
    assert device.describe()["lazy_mode (mark_step)"] is True  # the bridge's default answer


def test_no_card_means_no_hpu_even_with_the_bridge(monkeypatch):
    for var in device.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    fake_habana.install(monkeypatch)
    monkeypatch.setattr(torch, "hpu", types.SimpleNamespace(is_available=lambda: False), raising=False)
    assert device.device_type() in ("cpu", "cuda")


def test_hccl_is_registered_before_the_process_group_starts(hpu, monkeypatch):
    """Under a launcher, the hccl module is imported (registering the backend) and only then
    ``init_process_group(backend="hccl")`` runs."""
    import importlib

    launch_mod = importlib.import_module("minimegatron.launch")  # the package exports launch()

    events = []
    real_import = device.importlib.import_module

    def recording_import(name, *args):
        if name.endswith("distributed.hccl"):
            events.append("import hccl")
        return real_import(name, *args)

    monkeypatch.setattr(device.importlib, "import_module", recording_import)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(events and events[-1].startswith("init")))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: events.append(f"init {backend}"))
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(0, obj))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_mod.launch(lambda: "ran", 1) == ["ran"]
    assert events == ["import hccl", "init hccl"]


class _Recorder:
    """The parts of a DeepSpeed engine the training step calls, logging into fake_habana's list."""

    def __init__(self, rec):
        self.rec, self.device = rec, torch.device("cpu")

    def __call__(self, tokens, labels):
        self.rec.calls.append(("forward", None))
        return torch.tensor(2.0)

    def backward(self, loss):
        self.rec.calls.append(("backward", None))

    def step(self):
        self.rec.calls.append(("step", None))


def test_the_training_step_flushes_after_backward_and_after_step(hpu):
    from minimegatron.mpu.state import ParallelState
    from minimegatron.training.loop import train_step

    batches = [(torch.zeros(1, 4, dtype=torch.long),) * 2] * 2  # two micro-batches
    loss = train_step(_Recorder(hpu), batches, ParallelState())
    assert loss == 2.0
    per_micro_batch = ["forward", "backward", "mark_step", "step", "mark_step"]
    assert hpu.names() == per_micro_batch * 2


def test_the_pipeline_step_flushes_once_after_the_engine_ran_the_schedule(hpu):
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from minimegatron.mpu.state import ParallelState
    from minimegatron.training.loop import train_step

    class Pipe(PipelineEngine):
        def __init__(self):  # no engine build: only train_batch is called
            pass

        def train_batch(self, data_iter):
            hpu.calls.append(("train_batch", None))
            return torch.tensor(3.0)

    assert train_step(Pipe(), [], ParallelState()) == 3.0
    assert hpu.names() == ["train_batch", "mark_step"]


def test_eager_mode_never_flushes(hpu, monkeypatch):
    from minimegatron.mpu.state import ParallelState
    from minimegatron.training.loop import train_step

    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    train_step(_Recorder(hpu), [(torch.zeros(1, 4, dtype=torch.long),) * 2], ParallelState())
    assert "mark_step" not in hpu.names()
    assert device.compile_backend() == "hpu_backend"  # eager mode compiles instead


def test_autocast_asks_for_the_hpu_device_type_in_bf16(hpu, monkeypatch):
    seen = []

    class FakeAutocast:
        def __init__(self, device_type, dtype=None, enabled=True):
            seen.append((device_type, dtype, enabled))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", FakeAutocast)
    with device.autocast():
        pass
    assert seen == [("hpu", torch.bfloat16, True)]


def test_the_gaudi_script_sets_lazy_mode_and_the_recipe_cache():
    text = (ROOT / "scripts" / "gaudi_8x.sh").read_text()
    assert "export MINIMEGATRON_DEVICE=hpu" in text
    assert "export PT_HPU_LAZY_MODE=${PT_HPU_LAZY_MODE:-1}" in text
    cache = next(line for line in text.splitlines() if line.startswith("export PT_HPU_RECIPE_CACHE_CONFIG"))
    value = cache.split(":-", 1)[1].rstrip("}")
    directory, clear, size_mb = value.split(",")  # Habana's format: <dir>,<clear at start>,<max MB>
    assert directory.startswith("/") and clear in ("true", "false") and int(size_mb) > 0


def test_the_habana_modules_stay_out_of_cpu_runs():
    """On a machine without the bridge, nothing imports habana_frameworks (no fake installed)."""
    import subprocess

    code = ("import sys, minimegatron.device as d, minimegatron.kernels, minimegatron.launch; "
            "d.describe(); print('habana_frameworks' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
