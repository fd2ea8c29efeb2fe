"""FLOPs of one training step (forward + backward), the formula every throughput number divides by.

**The matmuls.** A linear layer ``Y = X·Wᵀ`` with ``X`` (T, k) and ``W`` (n, k) costs ``2·T·k·n``
FLOPs forward (one multiply and one add per weight per token). Backward runs two matmuls of the same
size: ``dX = dY·W`` (T, n)·(n, k) and ``dW = dYᵀ·X`` (n, T)·(T, k). So every weight that multiplies an
activation costs 6 FLOPs per token per step, and the whole network::

    matmul FLOPs = 6 · N · T          T = batch · seq tokens, N = the weights of the matmuls

N here is exact: the entries of the weight *matrices* (QKV, attention output, the MLP's two or three,
the LM head), not biases, norm gains or the input embedding table (a lookup, whose backward is an
index-add, not a matmul; a tied table is counted once, as the head). Biases and norms are O(h) per
token against O(h²): the usual "6N" (which counts every non-embedding parameter) differs from this
count by well under 1 % at any real size.

**Attention** has no weights, so it is not in N: per layer and sequence, ``Q·Kᵀ`` is (s, d)·(d, s) per
head, ``2·s²·h`` FLOPs over the heads (h = heads · head_dim, whatever the number of kv heads), and
``P·V`` another ``2·s²·h``; backward is twice forward (dP, dV from ``P·V``; dQ, dK from ``Q·Kᵀ``)::

    attention FLOPs = 3 · 4 · s² · h · L · batch  =  12 · L · h · s · T

The causal mask is not discounted (half of the scores are masked): the same convention as PaLM's
MFU appendix and as ``torch.utils.flop_counter`` (the test compares with the latter).

Summed, per token, this is PaLM's ``6N + 12·L·h·s`` (Chowdhery et al. 2022, appendix B) and, with
``N = 12·L·h² + V·h`` for a GPT (4h MLP), Narayanan et al. 2021 (§5.1, "Efficient Large-Scale
Language Model Training on GPU Clusters Using Megatron-LM") without recomputation:
``72·B·s·L·h²·(1 + s/(6h) + V/(12·L·h))``. Recomputation is not counted: model FLOPs charge the model,
not the implementation (MFU, not HFU).

:func:`step_gemms` lists the same matmuls as shapes — what a roofline times alone to find the peak
the step could reach (``benchmarks/throughput_vs_hf.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from minimegatron.config import ModelConfig

__all__ = ["StepFlops", "Gemm", "matmul_weights", "training_flops_per_token", "training_step_flops",
           "step_gemms"]


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step: ``matmul`` (6·N·T) + ``attention`` (12·L·h·s·T)."""

    matmul: int
    attention: int

    @property
    def total(self) -> int:
        return self.matmul + self.attention


@dataclass(frozen=True)
class Gemm:
    """``count`` matmuls of (m, k) · (k, n): ``2·m·k·n`` FLOPs each. ``a_t`` / ``b_t``: that operand is
    a transposed view of a row-major tensor, as in the step (``X·Wᵀ`` forward, ``dYᵀ·X`` for dW)."""

    name: str
    m: int
    k: int
    n: int
    count: int = 1
    a_t: bool = False
    b_t: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


def _linears(config: ModelConfig) -> list[tuple[str, int, int, int]]:
    """(name, in, out, how many) of every linear layer, as the model builds them (fused where fused)."""
    _dense_only(config)
    h, f, L = config.hidden_size, config.ffn_hidden_size, config.num_layers
    kv = config.num_kv_heads * config.head_dim
    if config.num_kv_heads == config.num_attention_heads:
        attn = [("query_key_value", h, 3 * h, L)]  # (3h, h): one fused matmul
    else:
        attn = [("query", h, h, L), ("key_value", h, 2 * kv, L)]
    up = 2 * f if config.activation == "swiglu" else f  # SwiGLU: [W_gate; W_up] fused, (2f, h)
    return attn + [("dense", h, h, L), ("dense_h_to_4h", h, up, L), ("dense_4h_to_h", f, h, L),
                   ("lm_head", h, config.padded_vocab_size(), 1)]


def _dense_only(config: ModelConfig) -> None:
    if config.num_experts:
        raise ValueError(f"num_experts={config.num_experts}: the FLOP formula here is for dense models "
                         "(an MoE layer's FLOPs depend on the routing); count a dense config")


def matmul_weights(config: ModelConfig) -> int:
    """N: entries of the weight matrices that multiply activations (the LM head once, tied or not)."""
    return sum(i * o * n for _, i, o, n in _linears(config))


def training_flops_per_token(n_params: int, num_layers: int, hidden_size: int, seq_len: int,
                             attention: bool = True) -> float:
    """6·N (+ 12·L·h·s with ``attention``): the model FLOPs of one trained token (PaLM, appendix B)."""
    return 6.0 * n_params + (12.0 * num_layers * hidden_size * seq_len if attention else 0.0)


def training_step_flops(config: ModelConfig, batch: int, seq: int) -> StepFlops:
    """Model FLOPs of one forward + backward over ``batch × seq`` tokens (see the module docstring)."""
    n, L, h, tokens = matmul_weights(config), config.num_layers, config.hidden_size, batch * seq
    matmul = round(training_flops_per_token(n, L, h, seq, attention=False)) * tokens
    return StepFlops(matmul=matmul, attention=round(training_flops_per_token(0, L, h, seq)) * tokens)


def step_gemms(config: ModelConfig, batch: int, seq: int) -> list[Gemm]:
    """The matmuls of one training step, forward and backward, as (m, k)·(k, n) shapes.

    Per linear layer with input (T, k) and weight (n, k): forward (T, k)·(k, n), input gradient
    (T, n)·(n, k), weight gradient (n, T)·(T, k). Their FLOPs sum to ``training_step_flops().matmul``.
    """
    T = batch * seq
    out = []
    for name, k, n, count in _linears(config):
        out += [Gemm(f"{name} fwd", T, k, n, count, b_t=True),  # X·Wᵀ
                Gemm(f"{name} dX", T, n, k, count),  # dY·W
                Gemm(f"{name} dW", n, T, k, count, a_t=True)]  # dYᵀ·X
    return out
