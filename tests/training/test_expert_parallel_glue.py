"""The DeepSpeed glue for expert parallelism, on a toy model through a real engine on 4 gloo ranks.

The toy: ``loss_r = mean((expert_{e(r)}(tanh(shared(x_r))))²)``, where rank r (dp index d) holds only
expert ``e = d % ep`` (``param.expert_parallel``): the experts differ across the EP ranks of the
data-parallel group, as an MoE layer's do. The reference is one process holding the whole model (the
shared Linear and all ``ep`` experts) and its loss ``(1/dp) Σ_r loss_r``, stepped by torch's AdamW with
torch's ``clip_grad_norm_`` (clipping active). DeepSpeed's engine, with the glue, must give each rank
its own expert after ``deepspeed.initialize`` (not rank 0's: the broadcast), the reference's gradients
(the shared one averaged over dp, an expert's summed over its ``edp_group`` and divided by dp; the
groups are ``ParallelState``'s, ``initialize_model_parallel(expert_model_parallel_size=ep)``), the
reference's ‖g‖ (each expert counted once) and, after two steps, the reference's weights — at ep = 2
(edp groups of 2) and ep = dp = 4 (each expert on one rank).
"""
import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed")
from minimegatron.launch import launch  # noqa: E402

DP, H, STEPS, LR, CLIP = 4, 8, 2, 1e-2, 0.05

pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")  # imported once, before any fork


def make_linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(H, H)


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, H, generator=torch.Generator().manual_seed(100 * step + rank))


class Toy(nn.Module):
    """One shared Linear and this rank's expert (global index ``expert``), drawn from that index."""

    def __init__(self, expert: int) -> None:
        super().__init__()
        self.shared = make_linear(0)
        self.expert = make_linear(1 + expert)
        for p in self.expert.parameters():
            p.expert_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert(torch.tanh(self.shared(x))).pow(2).mean()


def reference(ep: int) -> dict:
    """One process, every expert: the average of the dp ranks' losses, torch's AdamW and clipping."""
    shared, experts = make_linear(0), [make_linear(1 + e) for e in range(ep)]
    params = [*shared.parameters(), *(p for e in experts for p in e.parameters())]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    out = {"norm": []}
    for step in range(STEPS):
        opt.zero_grad()
        loss = sum(experts[r % ep](torch.tanh(shared(batch(step, r)))).pow(2).mean() for r in range(DP)) / DP
        loss.backward()
        if step == 0:
            out["shared_grad"] = shared.weight.grad.clone()
            out["expert_grad"] = [e.weight.grad.clone() for e in experts]
        out["norm"].append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        opt.step()
    out["shared"] = shared.weight.detach().clone()
    out["experts"] = [e.weight.detach().clone() for e in experts]
    return out


def on_rank(eps: tuple[int, ...]) -> dict:
    import contextlib
    import io

    import deepspeed

    from minimegatron.deepspeed_glue import (DeepSpeedMPU, expert_aware_gradient_reduction,
                                             init_deepspeed_comm, keep_expert_parameters, quiet_deepspeed,
                                             replace_fp32_gradient_clipping)
    from minimegatron.mpu.state import initialize_model_parallel
    from minimegatron.training.engine import clip_grad_norm

    quiet_deepspeed()
    init_deepspeed_comm()
    results = {}
    for ep in eps:
        state = initialize_model_parallel(expert_model_parallel_size=ep)  # ep_group, edp_group
        model = Toy(state.ep_rank)
        config = {"train_batch_size": DP, "train_micro_batch_size_per_gpu": 1,
                  "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8,
                                                            "weight_decay": 0.0, "torch_adam": True}},
                  "gradient_clipping": CLIP, "steps_per_print": 10**9}
        with keep_expert_parameters(model), contextlib.redirect_stdout(io.StringIO()):
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=config, mpu=DeepSpeedMPU(state))
        expert_aware_gradient_reduction(engine, state)
        replace_fp32_gradient_clipping(engine, lambda: clip_grad_norm(model.parameters(), CLIP, state).item())
        out = {"expert": state.ep_rank, "initial_expert": model.expert.weight.detach().clone(), "norm": []}
        for step in range(STEPS):
            engine.backward(engine(batch(step, state.rank)))
            if step == 0:
                out["shared_grad"] = model.shared.weight.grad.clone()
                out["expert_grad"] = model.expert.weight.grad.clone()
            engine.step()
            out["norm"].append(float(engine.get_global_grad_norm()))
        out["shared"] = model.shared.weight.detach().clone()
        out["expert_weight"] = model.expert.weight.detach().clone()
        results[ep] = out
    return results


def test_expert_parameters_through_a_deepspeed_engine():
    ranks = launch(on_rank, DP, (2, 4), timeout=180)
    for ep in (2, 4):
        ref = reference(ep)
        assert ref["norm"][0] > CLIP  # clipping is active
        for r, res in enumerate(ranks):
            got, e = res[ep], r % ep
            assert got["expert"] == e
            torch.testing.assert_close(got["initial_expert"], make_linear(1 + e).weight.detach())
            torch.testing.assert_close(got["shared_grad"], ref["shared_grad"], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got["expert_grad"], ref["expert_grad"][e], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got["norm"], ref["norm"], rtol=1e-5, atol=0)
            torch.testing.assert_close(got["shared"], ref["shared"], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got["expert_weight"], ref["experts"][e], rtol=1e-5, atol=1e-7)
