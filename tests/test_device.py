"""device.py: device/backend mapping, env override, mark_step only in Gaudi's lazy mode."""
import sys
import types

import pytest
import torch

from minimegatron import device


@pytest.fixture
def clean_env(monkeypatch):
    for var in device.ENV_VARS + ("PT_HPU_LAZY_MODE",):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_backend_per_device():
    assert device.BACKENDS == {"cpu": "gloo", "cuda": "nccl", "hpu": "hccl"}
    assert device.dist_backend("cpu") == "gloo"
    assert device.dist_backend("cuda") == "nccl"


def test_default_on_this_machine_is_cpu_without_accelerators(clean_env):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert device.device_type() == "cpu"
    assert device.get_device() == torch.device("cpu")
    assert device.dist_backend() == "gloo"


@pytest.mark.parametrize("var", device.ENV_VARS)
def test_env_override(clean_env, var):
    clean_env.setenv(var, "CUDA")
    assert device.device_type() == "cuda"
    clean_env.setenv(var, "cpu")
    assert device.device_type() == "cpu"


def test_bad_override_names_the_choices(clean_env):
    clean_env.setenv("MINIMEGATRON_DEVICE", "tpu")
    with pytest.raises(ValueError, match="cpu.*cuda.*hpu"):
        device.device_type()


def test_gaudi_modules_imported_only_when_present(clean_env):
    """Without habana_frameworks installed, nothing tries to import it; hpu is never chosen."""
    sys.modules.pop("habana_frameworks", None)
    assert device.habana_core() is None or "habana_frameworks" in sys.modules
    if device.habana_core() is None:
        assert device.device_type() in ("cpu", "cuda")


def test_mark_step_only_in_lazy_mode(clean_env):
    calls = []
    core = types.ModuleType("habana_frameworks.torch.core")
    core.mark_step = lambda: calls.append(1)
    fake = {"habana_frameworks": types.ModuleType("habana_frameworks"),
            "habana_frameworks.torch": types.ModuleType("habana_frameworks.torch"),
            "habana_frameworks.torch.core": core}
    clean_env.setattr(sys, "modules", {**sys.modules, **fake})
    device.mark_step()  # cpu: no call
    assert calls == []
    clean_env.setenv("MINIMEGATRON_DEVICE", "hpu")
    device.mark_step()  # hpu, lazy by default
    assert calls == [1]
    clean_env.setenv("PT_HPU_LAZY_MODE", "0")  # eager / torch.compile mode: no mark_step
    device.mark_step()
    assert calls == [1]


def test_autocast_dtype():
    assert device.autocast_dtype("cpu") == torch.bfloat16
    assert device.autocast_dtype("hpu") == torch.bfloat16


# ---- extensions: lazy mode from the bridge, the training step, autocast, compile, peak FLOP/s ------
from tests import fake_habana  # noqa: E402


def test_lazy_mode_asks_the_bridge_when_the_env_is_silent(clean_env):
    rec = fake_habana.install(clean_env, lazy=False)  # a newer release: eager by default
    clean_env.setenv("MINIMEGATRON_DEVICE", "hpu")
    assert not device.is_lazy_mode()
    rec.lazy = True
    assert device.is_lazy_mode()
    clean_env.setenv("PT_HPU_LAZY_MODE", "0")  # the env var wins
    assert not device.is_lazy_mode()


def _tiny_step_setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(5, 4)).square().mean()
    return model, opt, loss


@pytest.mark.parametrize("kind,lazy,expected_marks", [("cpu", True, 0), ("hpu", True, 2), ("hpu", False, 0)])
def test_backward_and_step_marks_steps_only_in_lazy_mode(clean_env, kind, lazy, expected_marks):
    rec = fake_habana.install(clean_env, lazy=lazy)
    clean_env.setenv("MINIMEGATRON_DEVICE", kind)
    model, opt, loss = _tiny_step_setup()
    before = model.weight.detach().clone()
    device.backward_and_step(loss, opt)
    assert rec.names().count("mark_step") == expected_marks
    assert not torch.equal(model.weight, before), "the optimizer did not step"
    assert all(p.grad is None for p in model.parameters()), "grads were not zeroed"


def test_backward_and_step_drives_a_deepspeed_style_engine(clean_env):
    """Order matters in lazy mode: backward, flush, step, flush."""
    rec = fake_habana.install(clean_env)
    clean_env.setenv("MINIMEGATRON_DEVICE", "hpu")

    class Engine:  # the two methods of deepspeed.DeepSpeedEngine the step uses
        def backward(self, loss):
            rec.calls.append(("backward", loss))

        def step(self):
            rec.calls.append(("step", None))

    device.backward_and_step(torch.tensor(1.0), Engine())
    assert rec.names() == ["backward", "mark_step", "step", "mark_step"]


def test_autocast_runs_matmuls_in_bf16_on_cpu():
    a = torch.randn(4, 4)
    with device.autocast("cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with device.autocast("cpu", enabled=False):
        assert (a @ a).dtype == torch.float32
    assert device.autocast_dtype("cuda") in (torch.bfloat16, torch.float16)


def test_compile_backend_per_device(clean_env):
    assert device.compile_backend("cpu") is None
    assert device.compile_backend("cpu", cpu=True) == "inductor"
    assert device.compile_backend("cuda") == "inductor"
    rec = fake_habana.install(clean_env)
    clean_env.setenv("MINIMEGATRON_DEVICE", "hpu")
    assert device.compile_backend("hpu") is None  # lazy mode: the bridge builds the graphs
    rec.lazy = False
    assert device.compile_backend("hpu") == "hpu_backend"
    model = torch.nn.Linear(2, 2)
    assert device.compile_model(model, "cpu") is model  # CPU: no compile unless asked
    assert device.compile_model(model, "cpu", cpu=True) is not model


def test_hccl_without_habana_is_a_clear_error(clean_env):
    if device.habana_core() is not None:
        pytest.skip("habana_frameworks is installed here")
    with pytest.raises(RuntimeError, match="Habana's PyTorch container"):
        device.dist_backend("hpu")
    fake_habana.install(clean_env)
    assert device.dist_backend("hpu") == "hccl"


def test_peak_flops_from_device_names():
    assert device.peak_flops("GAUDI2") == 432e12
    assert device.peak_flops("GAUDI3") == 1835e12
    assert device.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert device.peak_flops("cpu") is None


def test_describe_on_this_machine(clean_env):
    clean_env.setenv("MINIMEGATRON_DEVICE", "cpu")
    d = device.describe()
    assert d["device"] == "cpu" and d["dist_backend"] == "gloo" and d["compile_backend"] is None
    assert d["lazy_mode (mark_step)"] is False and d["peak_bf16_tflops"] is None
    assert device.synchronize() is None and device.max_memory_allocated() is None


# ---- real collectives on real cards (skipped without two of them) -----------------------------------
ALL_REDUCE_SCRIPT = """
import torch, torch.distributed as dist
from minimegatron import device, launch

def work():
    x = torch.full((4,), float(dist.get_rank() + 1), device=device.get_device())
    dist.all_reduce(x)
    device.mark_step()
    return x.cpu(), dist.get_backend()

results = launch(work, 2, timeout=300)
if dist.get_rank() == 0:
    for x, backend in results:
        assert torch.equal(x, torch.full((4,), 3.0)), x
    print("ALL-REDUCE OK", results[0][1])
"""


@pytest.mark.parametrize("kind", ["cuda", "hpu"])
def test_all_reduce_on_two_real_cards(kind, tmp_path):
    """torchrun → launch() joins the world with nccl (CUDA) / hccl (Gaudi) and all-reduces."""
    if device.device_count(kind) < 2:
        pytest.skip(f"needs 2 {kind} devices ({'NCCL' if kind == 'cuda' else 'HCCL'} all-reduce)")
    import os
    import subprocess
    import sys
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MINIMEGATRON_DEVICE": kind, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"ALL-REDUCE OK {device.BACKENDS[kind]}" in out.stdout


def test_deepspeed_is_told_our_device_and_does_not_guess():
    """A fresh interpreter with neither variable set: `import minimegatron` then `import deepspeed` runs
    DeepSpeed on the device device.py chose, without its 'Setting accelerator to CPU' warning."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k not in device.ENV_VARS}
    code = ("import minimegatron, os; from minimegatron import device; import deepspeed; "
            "from deepspeed.accelerator import get_accelerator; "
            "print(device.device_type(), get_accelerator()._name, os.environ['DS_ACCELERATOR'])")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == ["cpu", "cpu", "cpu"]  # DeepSpeed 0.14 logs to stdout first
    assert "Setting accelerator" not in done.stderr + done.stdout
    code = code.replace("import minimegatron, os;", "import os;")  # the control: DeepSpeed alone does warn
    alone = subprocess.run([sys.executable, "-c", code.replace("from minimegatron import device; ", "")
                            .replace("device.device_type(), ", "").replace(", os.environ['DS_ACCELERATOR']", "")],
                           env=env, capture_output=True, text=True, timeout=120)
    assert "Setting accelerator to CPU" in alone.stderr + alone.stdout
