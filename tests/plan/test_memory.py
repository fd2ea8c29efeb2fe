"""The planner's per-rank parameters and model states against independent counts: the closed-form
parameter count of ``layers.language_model`` and ZeRO's per-parameter bytes (Rajbhandari et al.)."""
import pytest

from minimegatron.config import gpt_config, llama_config
from minimegatron.layers.language_model import count_parameters
from minimegatron.plan import Layout
from minimegatron.plan.memory import model_state_bytes, stage_units

# vocab a multiple of 128 (no padding rows), so the per-rank count is the model's parameter count
CONFIGS = [gpt_config(hidden_size=256, num_attention_heads=8, num_layers=4, vocab_size=1024, max_seq_len=128),
           llama_config(hidden_size=256, num_attention_heads=8, num_kv_heads=2, num_layers=4, vocab_size=1024,
                        max_seq_len=128)]


@pytest.mark.parametrize("config", CONFIGS, ids=["gpt", "llama"])
def test_one_rank_holds_the_whole_model_and_zero_shards_it_as_the_paper(config):
    psi = count_parameters(config)
    assert sum(u["dense"] for u in stage_units(config, Layout(), 0)) == psi
    dp = 64
    for stage, per_param in enumerate([16, 4 + 12 / dp, 2 + 14 / dp, 16 / dp]):  # the paper's table
        states = model_state_bytes(config, Layout(dp=dp, zero=stage), 0, "bf16")
        assert sum(states.values()) == pytest.approx(per_param * psi)


@pytest.mark.parametrize("config", CONFIGS, ids=["gpt", "llama"])
def test_pipeline_stages_hold_the_model_once_plus_the_tied_copy(config):
    psi = count_parameters(config)
    stages = [sum(u["dense"] for u in stage_units(config, Layout(pp=4), s)) for s in range(4)]
    copy = config.vocab_size * config.hidden_size if config.tie_embeddings else 0  # the last stage's table
    assert sum(stages) == psi + copy
    tp = [sum(u["dense"] for u in stage_units(config, Layout(tp=2), 0))]
    assert psi // 2 < tp[0] < psi  # the matrices halve, the norms (and row biases) stay whole
