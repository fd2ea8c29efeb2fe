"""Test-wide settings: one thread per process (ranks are processes), CPU device, repo on sys.path."""
import os
import sys

os.environ.setdefault("MINIMEGATRON_DEVICE", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `exercises` and `benchmarks` are importable from the repo root
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(1)

# Loaded once here, inherited by every forked rank: entering a TorchDispatchMode (the comm counter)
# or building an optimizer imports torch's compiler stack, seconds per rank otherwise.
import torch._dynamo  # noqa: E402,F401


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def deepspeed_preloaded():
    """DeepSpeed's heavy modules imported once in this process, so that every forked rank starts with
    them (the trainer's test modules use it: ``pytestmark = pytest.mark.usefixtures(...)``)."""
    from minimegatron.training.loop import preload
    preload()
