"""benchmarks/gpu_llama_1b.py stays runnable (--tiny on CPU) and its FLOP count is the PaLM formula."""
import pytest

from benchmarks import gpu_llama_1b as bench
from minimegatron.config import llama_config


def test_flops_per_token_and_mfu_arithmetic():
    assert bench.training_flops_per_token(1000, 2, 8, 16, attention=False) == 6000
    assert bench.training_flops_per_token(1000, 2, 8, 16) == 6000 + 12 * 2 * 8 * 16
    assert bench.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert bench.mfu(1000.0, 6e9, None) is None


def test_1b_config_is_about_a_billion_parameters():
    cfg = bench.llama_1b_config()
    h, f, L, kv = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.num_kv_heads * cfg.head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * f + 2 * h  # q, k/v, dense, SwiGLU, two RMSNorms
    total = cfg.vocab_size * h * 2 + L * per_layer + h  # untied embedding and head, final norm
    assert 0.85e9 < total < 1.0e9 and cfg == llama_config(**{**cfg.to_dict()})


def test_tiny_benchmark_runs_on_cpu(capsys):
    [row] = bench.main(["--tiny", "--steps", "2"])
    cfg = bench.tiny_config()
    h, L, kv = cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads * cfg.head_dim
    expected_matmul = L * (2 * h * h + 2 * h * kv + 3 * h * cfg.ffn_hidden_size) \
        + cfg.padded_vocab_size() * h  # the LM head counts, the input table and the norms do not
    norms = L * 2 * h + h
    assert row["params"] == expected_matmul + norms + cfg.padded_vocab_size() * h
    assert row["tokens_per_s"] > 0 and row["mfu_6n"] is None  # no peak FLOP/s for a CPU
    assert row["model_tflops"] == pytest.approx(row["tokens_per_s"] * 6 * expected_matmul / 1e12)
    assert "tokens/s" in capsys.readouterr().out
