"""recompute(fn, *args, state): only the inputs are kept, and the rerun replays state.rng_tracker."""
import torch
import torch.nn.functional as F

from minimegatron.layers.recompute import recompute
from minimegatron.mpu.random import model_parallel_rng, model_parallel_seed
from minimegatron.mpu.state import ParallelState


def _dropout_inside_tp_region(state):
    def fn(x):
        with model_parallel_rng(state):  # the tracker's per-rank stream (tp > 1)
            return F.dropout(x, 0.5) * x  # the mask enters the gradient: a new mask would show
    return fn


def _grad(use_recompute: bool, state: ParallelState) -> tuple[torch.Tensor, torch.Tensor]:
    model_parallel_seed(7, state, device_type="cpu")
    x = torch.linspace(0.5, 1.5, 64).requires_grad_()
    fn = _dropout_inside_tp_region(state)
    y = recompute(fn, x, state=state) if use_recompute else fn(x)
    with model_parallel_rng(state):  # the stream moves on before backward (other layers draw)
        torch.rand(10)
    y.sum().backward()
    return y.detach(), x.grad


def test_recompute_replays_the_states_own_tracker():
    state = ParallelState(tp=2, rank=1)  # no collectives inside fn: no ranks needed
    y, g = _grad(False, state)
    y_re, g_re = _grad(True, state)
    assert torch.equal(y, y_re) and torch.equal(g, g_re)
    other = ParallelState(tp=2, rank=1)
    assert other.rng_tracker is not state.rng_tracker and not other.rng_tracker.states_  # per state
