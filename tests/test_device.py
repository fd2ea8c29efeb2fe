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
