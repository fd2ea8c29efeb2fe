"""measure.flops: the step-FLOP formula against torch's own FLOP counter on a real forward + backward.

``torch.utils.flop_counter.FlopCounterMode`` sees every aten matmul the step runs (mm/addmm for the
linear layers, bmm for attention when SDPA takes its plain "math" path, which spells QKᵀ and P·V out
as bmms) and counts ``2·m·k·n`` each. The formula is written from the model's config; the counter
reads the ops the model really executed. The fused LM head + loss accumulates ∂W with the in-place
``addmm_``, which the counter does not list: it is given torch's own ``addmm`` formula for it.
"""
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, addmm_flop

from minimegatron.config import gpt_config, llama_config
from minimegatron.gpt import GPTModel
from minimegatron.llama import LLaMAModel
from minimegatron.measure.flops import matmul_weights, step_gemms, training_step_flops

aten = torch.ops.aten
SIZE = dict(hidden_size=32, num_layers=2, num_attention_heads=4, vocab_size=200, max_seq_len=16)
CASES = {"gpt": (GPTModel, gpt_config(**SIZE)),  # MHA (fused QKV), 4h GELU MLP, tied head, biases
         "llama-gqa": (LLaMAModel, llama_config(num_kv_heads=2, **SIZE))}  # GQA, SwiGLU, untied


def counted(model, batch: int, seq: int) -> dict:
    """Per-op FLOPs of one forward (with labels: loss) + backward, attention on the math path."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    labels = torch.roll(ids, -1, dims=1)
    def addmm_inplace(self_shape, a_shape, b_shape, *_, out_shape=None, **__) -> int:  # beta, alpha
        return addmm_flop(self_shape, a_shape, b_shape)

    counter = FlopCounterMode(display=False, custom_mapping={aten.addmm_: addmm_inplace})
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(ids, labels=labels).backward()
    return counter.get_flop_counts()["Global"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "unfused-head"])
@pytest.mark.parametrize("name", CASES)
def test_formula_equals_torch_flop_counter(name, fused):
    cls, config = CASES[name]
    config = replace(config, fused_lm_loss=fused, lm_loss_chunk=8 if fused else None)  # 4 chunks
    torch.manual_seed(0)
    model = cls(config).train()
    batch, seq = 2, 16
    ops = counted(model, batch, seq)
    formula = training_step_flops(config, batch, seq)
    linear = sum(ops.get(op, 0) for op in (aten.mm, aten.addmm, aten.addmm_))  # forward, dX and dW
    attention = ops.get(aten.bmm, 0)  # QKᵀ and P·V, forward and backward (math path)
    assert set(ops) <= {aten.mm, aten.addmm, aten.addmm_, aten.bmm}, ops  # nothing else counted
    assert linear == formula.matmul
    assert attention == formula.attention == 12 * config.num_layers * config.hidden_size * seq * batch * seq
    assert formula.total == sum(ops.values())
    assert sum(g.flops for g in step_gemms(config, batch, seq)) == formula.matmul


def test_matmul_weights_are_the_models_weight_matrices():
    """N = every 2-D weight of the model but the lookup tables (the tied head counts once)."""
    for cls, config in CASES.values():
        model = cls(config)
        lookup = ("position_embeddings.weight",) + (() if config.tie_embeddings else ("word_embeddings.weight",))
        mats = {id(p): p.numel() for n, p in model.named_parameters() if p.dim() == 2
                and not n.endswith(lookup)}
        assert matmul_weights(config) == sum(mats.values())


def test_narayanan_closed_form():
    """Narayanan et al. 2021, §5.1 (no recompute): 72·B·s·L·h²·(1 + s/(6h) + V/(12·L·h)) for a GPT."""
    config = gpt_config(hidden_size=256, num_layers=4, num_attention_heads=8, vocab_size=8192,
                        max_seq_len=256, bias=False)
    B, s, L, h, V = 4, 256, 4, 256, config.padded_vocab_size()
    paper = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert training_step_flops(config, B, s).total == pytest.approx(paper, rel=1e-12)


def test_moe_is_refused():
    with pytest.raises(ValueError, match="num_experts=4: the FLOP formula here is for dense models"):
        training_step_flops(llama_config(num_experts=4, **SIZE), 1, 8)
