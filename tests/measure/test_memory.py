"""Optimizer state per rank under DeepSpeed ZeRO-1 equals the formula, byte for byte."""
import pytest
import torch

from minimegatron import launch
from minimegatron.config import gpt_config
from minimegatron.measure.memory import (adam_state_bytes, model_state_bytes, optimizer_state_bytes,
                                         zero1_bytes_per_parameter, zero1_optimizer_state_bytes)

CFG = gpt_config(hidden_size=32, num_attention_heads=4, num_layers=2, vocab_size=100, max_seq_len=16)


def _preload_deepspeed():
    """Import DeepSpeed and torch._dynamo in this (parent) process before the ranks fork.

    ``deepspeed.initialize`` imports its Muon optimizer, whose ``@torch.compile`` pulls in
    torch._dynamo (``torch.optim``'s constructor does too): ~2 s of CPU per rank. Imported once here,
    every forked rank inherits it.
    """
    from minimegatron.compat import preload_deepspeed

    preload_deepspeed()


def _zero1_step():
    import deepspeed

    from minimegatron.gpt import GPTModel
    from minimegatron.deepspeed_glue import init_deepspeed_comm

    init_deepspeed_comm()
    torch.manual_seed(0)
    model = GPTModel(CFG)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "steps_per_print": 10**9, "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = torch.randint(0, CFG.vocab_size, (2, 8))
    engine.backward(engine(ids, labels=ids))
    engine.step()
    numel = sum(p.numel() for p in model.parameters())
    return optimizer_state_bytes(engine), numel, model_state_bytes(model)["parameters"]


@pytest.mark.parametrize("dp", [2, 4])
def test_zero1_optimizer_state_per_rank_equals_the_formula(dp):
    _preload_deepspeed()
    results = launch(_zero1_step, dp, timeout=120)
    for measured, numel, param_bytes in results:
        assert measured == zero1_optimizer_state_bytes(numel, dp)
        assert param_bytes == 4 * numel  # fp32 weights stay whole on every rank
        per_param = (param_bytes * 2 + sum(measured.values()) - measured["step"]) / numel
        assert per_param == pytest.approx(zero1_bytes_per_parameter(dp, mixed_precision=False), rel=0.02)


def test_plain_adam_and_the_per_parameter_rule():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 5)).sum().backward()
    opt.step()
    assert optimizer_state_bytes(opt) == adam_state_bytes(model.parameters())
    assert model_state_bytes(model, opt) == {"parameters": 4 * 58, "gradients": 4 * 58,
                                             "optimizer": 8 * 58 + 4 * 4}
    assert zero1_bytes_per_parameter(1, zero=False) == 16 == zero1_bytes_per_parameter(1, False, zero=False)
    assert zero1_bytes_per_parameter(64) == 4 + 12 / 64
    assert zero1_bytes_per_parameter(8, mixed_precision=False) == 8 + 12 / 8
    # DeepSpeed pads each flat group to a multiple of 2·dp elements before slicing it
    assert zero1_optimizer_state_bytes(101, 4)["exp_avg"] == 4 * 26
    assert zero1_optimizer_state_bytes([101, 3], 2)["fp32_master"] == 4 * (52 + 2)
    with pytest.raises(ValueError, match="data-parallel size"):
        zero1_bytes_per_parameter(0)
