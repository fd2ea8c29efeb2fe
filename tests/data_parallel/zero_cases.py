"""What the ZeRO tests share: tiny GPT (tied) and LLaMA models, the batches, the whole-batch AdamW
reference, and DeepSpeed's and FSDP2's engines, built the same way on every rank."""
from __future__ import annotations

import contextlib
import io

import torch
import torch.distributed as dist

from minimegatron.config import gpt_config
from minimegatron.llama import llama_config

# hidden 10 and ffn 25: flat vectors that are not multiples of alignment·dp (the padding is exercised)
CONFIGS = {"gpt": gpt_config(hidden_size=10, num_attention_heads=2, num_layers=2, vocab_size=50,
                             max_seq_len=9),
           "llama": llama_config(hidden_size=10, num_attention_heads=5, num_layers=2, vocab_size=50,
                                 max_seq_len=8, ffn_hidden_size=25)}
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
MICRO, SEQ, STEPS = 2, 8, 3
TOL = dict(rtol=1e-4, atol=5e-5)  # fp32, different reduction orders; Adam near g ≈ ε amplifies them


def build(name: str):
    from minimegatron.models import model_class

    return model_class(name)(CONFIGS[name], init_seed=0)


def global_batch(step: int, dp: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 50, (dp * MICRO, SEQ), generator=g)  # (dp·micro, s): one slice per replica


def my_batch(step: int) -> torch.Tensor:
    r = dist.get_rank()
    return global_batch(step, dist.get_world_size())[r * MICRO:(r + 1) * MICRO]  # (micro, s)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


def reference(name: str, dp: int) -> dict:
    """torch.optim.AdamW on one process and the whole batch: parameters after each step, losses."""
    from minimegatron.training.engine import param_groups

    model = build(name)
    opt = torch.optim.AdamW(param_groups(model, ADAMW["weight_decay"]), **ADAMW)
    out = {"params": [], "losses": []}
    for step in range(STEPS):
        ids = global_batch(step, dp)
        loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out["params"].append(flat(model.parameters()))
        out["losses"].append(loss.item())
    return out


def mean_loss(loss: torch.Tensor) -> float:
    """The data-parallel mean of the replicas' losses: the whole batch's loss (equal token counts)."""
    t = loss.detach().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def deepspeed_engine(model, stage: int):
    """DeepSpeed's engine at ZeRO ``stage``: AdamW (torch's), no clipping, decay on matrices only."""
    import deepspeed

    from minimegatron.deepspeed_glue import init_deepspeed_comm, quiet_deepspeed
    from minimegatron.training.engine import param_groups

    quiet_deepspeed()
    init_deepspeed_comm()
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
              "train_batch_size": MICRO * dist.get_world_size(), "gradient_clipping": 0,
              "optimizer": {"type": "AdamW", "params": {**{k: v for k, v in ADAMW.items() if k != "betas"},
                                                        "betas": list(ADAMW["betas"]), "torch_adam": True}},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                    "stage3_prefetch_bucket_size": 0},  # no prefetch: the plain schedule
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          model_parameters=param_groups(model, ADAMW["weight_decay"]))
    if stage == 3 and model.config.tie_embeddings:  # the head reads the table outside its module
        deepspeed.zero.register_external_parameter(model.lm_head, model.embedding.word_embeddings.weight)
    return engine


def deepspeed_run(name: str, stage: int) -> dict:
    """DeepSpeed at ``stage``: the whole parameters after each step, the losses, the optimizer state."""
    from minimegatron.measure.memory import optimizer_state_bytes

    model = build(name)
    engine = deepspeed_engine(model, stage)
    out = {"params": [], "losses": []}
    for step in range(STEPS):
        ids = my_batch(step)
        loss = engine(ids, labels=ids)
        engine.backward(loss)
        engine.step()
        out["losses"].append(mean_loss(loss))
        params = list(model.parameters())
        out["params"].append(flat(_from_partitions(params) if stage == 3 else params))
    out["optimizer"] = optimizer_state_bytes(engine)
    return out


def _from_partitions(params) -> list[torch.Tensor]:
    """ZeRO-3's whole parameters from every rank's own partition (``p.ds_tensor``), gathered here:
    what the engine stores, read without its gather machinery (DeepSpeed 0.14's GatheredParameters
    sometimes returned a stale final-norm buffer right after a step on CPU)."""
    from minimegatron.collectives import all_gather_into_tensor

    out = []
    for p in params:
        part = p.ds_tensor.detach().reshape(-1)                        # (⌈n/dp⌉,)
        whole = part.new_empty(part.numel() * dist.get_world_size())   # (dp·⌈n/dp⌉,)
        all_gather_into_tensor(whole, part)
        out.append(whole[:p.ds_numel].view(p.ds_shape))
    return out
