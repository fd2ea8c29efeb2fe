"""Exercise 13: what a training run's numbers mean on an accelerator.

13.1  model_flops_utilization — MFU from a log line.

A run logs the tokens/s of ALL its cards. MFU (Chowdhery et al. 2022, PaLM, appendix B) is the FLOP/s
the model needs at that speed divided by one card's peak::

    flops_per_token = 6·N  (+ 12·L·h·s when ``attention``)      N = weights that multiply activations
    MFU             = flops_per_token · (tokens/s of ONE card) / (peak FLOP/s of one card)

``peak_tflops`` is given in TFLOP/s (10¹² FLOP/s). Return MFU as a fraction (0.42, not 42).
Example: 8 Gaudi 2 cards (432 TFLOP/s each) at 160 000 tokens/s in all, N = 1e9, no attention term:
6e9 · 20 000 / 432e12 ≈ 0.278.

Grade it with:  grade_model_flops_utilization(model_flops_utilization)
The reference is the benchmark's formula (benchmarks/gpu_llama_1b.py: ``training_flops_per_token`` and
``mfu``); the grader tries several runs and names the first one your function gets wrong.
"""
from __future__ import annotations

import math
from typing import Callable

from exercises.grading import GradingError, call_candidate, grader, kind_of, passed, run_isolated

TIMEOUT = 10.0  # s: five numbers in one process


def model_flops_utilization(tokens_per_s: float, num_cards: int, n_params: float, num_layers: int,
                            hidden_size: int, seq_len: int, peak_tflops: float,
                            attention: bool = True) -> float:
    """Your code: MFU (a fraction) of a run that trains ``tokens_per_s`` tokens/s on ``num_cards`` cards."""
    # Hint: first the FLOPs per token, then the tokens/s of one card, then mind the units of the peak.
    raise NotImplementedError("Exercise 13.1: return (6N [+ 12·L·h·s]) · tokens/s per card / peak FLOP/s")


# --- grading -----------------------------------------------------------------------------------------

def _one_b_matmul_params() -> tuple[int, int, int]:
    """(N, L, h) of the 0.9B LLaMA of notebook 13: every weight but the input embedding table."""
    from benchmarks.gpu_llama_1b import llama_1b_config

    cfg = llama_1b_config()
    h, L, f = cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size
    kv = cfg.num_kv_heads * cfg.head_dim
    n = L * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h) + h + cfg.vocab_size * h  # + the LM head
    return n, L, h


def _cases() -> list[tuple[str, tuple, bool]]:
    n, L, h = _one_b_matmul_params()
    return [  # (what, (tokens/s, cards, N, L, h, s, peak TFLOP/s), attention)
        ("the log line: 0.9B LLaMA on 8 Gaudi 2", (160000, 8, n, L, h, 2048, 432), True),
        ("the log line without the attention term", (160000, 8, n, L, h, 2048, 432), False),
        ("GPT-2 small on one H100 SXM", (3000, 1, 124e6, 12, 768, 1024, 989), True),
        ("a 7B model on 64 Gaudi 3", (1.5e6, 64, 7e9, 32, 4096, 4096, 1835), True),
        ("one card, a peak that is not a round number", (12345.6, 1, 3.3e8, 24, 1024, 512, 756.5), True),
    ]


@grader
def grade_model_flops_utilization(candidate: Callable[..., float],
                                  timeout: float = TIMEOUT) -> str:
    """Compare ``candidate`` with the benchmark's formula on several runs; GradingError on the first miss.

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    import benchmarks.gpu_llama_1b  # noqa: F401  (imported once here, not in every grading process)
    return run_isolated(_grade_model_flops_utilization, candidate, timeout=timeout,
                        role="model_flops_utilization")


def _mistakes(mfu: Callable, cards: int) -> list[tuple[Callable, str]]:
    """(model(tokens/s, cards, N, L, h, s, peak, attention) -> the MFU that mistake gives, message)."""
    def flops(n, layers, h, s, attention, per_n=6.0, per_attn=12.0):
        return per_n * n + (per_attn * layers * h * s if attention else 0.0)

    return [(lambda t, c, n, L, h, s, p, a: mfu(t, flops(n, L, h, s, a), p * 1e12),
             "that is the all-cards number: divide tokens/s by num_cards") if cards > 1 else
            (lambda *a: math.nan, ""),
            (lambda t, c, n, L, h, s, p, a: 100 * mfu(t / c, flops(n, L, h, s, a), p * 1e12),
             "that is a percentage: return a fraction"),
            (lambda t, c, n, L, h, s, p, a: mfu(t / c, flops(n, L, h, s, False), p * 1e12) if a else math.nan,
             "the attention term 12·L·h·s is missing"),
            (lambda t, c, n, L, h, s, p, a: mfu(t / c, flops(n, L, h, s, True), p * 1e12) if not a else math.nan,
             "the attention term was added although attention=False"),
            (lambda t, c, n, L, h, s, p, a: mfu(t / c, flops(n, L, h, s, a), p),
             "peak_tflops is in TFLOP/s: multiply by 1e12 to get FLOP/s"),
            (lambda t, c, n, L, h, s, p, a: mfu(t / c, flops(n, L, h, s, a, per_n=2.0, per_attn=4.0), p * 1e12),
             "2N FLOPs per token is the forward pass alone: training is 6N (forward 2N + backward 4N), and the "
             "attention term 12·L·h·s"),
            (lambda t, c, n, L, h, s, p, a: mfu(t / c, flops(n, L, h, s, a, per_attn=6.0), p * 1e12),
             "the attention term is 12·L·h·s (forward 4·L·h·s + backward 8·L·h·s), not 6·L·h·s"),
            (lambda t, c, n, L, h, s, p, a: mfu(t * c, flops(n, L, h, s, a), p * 1e12),
             "tokens/s was multiplied by num_cards: the logged tokens/s is already of ALL cards — divide")]


def _grade_model_flops_utilization(candidate: Callable) -> str:
    from benchmarks.gpu_llama_1b import mfu, training_flops_per_token

    for what, (tps, cards, n, layers, hidden, seq, peak), attention in _cases():
        expected = mfu(tps / cards, training_flops_per_token(n, layers, hidden, seq, attention), peak * 1e12)
        args = f"tokens_per_s={tps}, num_cards={cards}, n_params={n:.4g}, num_layers={layers}, " \
               f"hidden_size={hidden}, seq_len={seq}, peak_tflops={peak}, attention={attention}"
        got = call_candidate(f"{what} ({args})", candidate, tps, cards, n, layers, hidden, seq, peak,
                             attention=attention, exercise="Exercise 13.1")
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise GradingError(f"{what}: expected a float (MFU as a fraction), got {kind_of(got)}")
        if not math.isclose(got, expected, rel_tol=1e-9):
            hint = next((" — " + message for model, message in _mistakes(mfu, cards)
                         if math.isclose(got, model(tps, cards, n, layers, hidden, seq, peak, attention),
                                         rel_tol=1e-9)), "")
            raise GradingError(f"{what} ({args}): got {got:.6g}, expected {expected:.6g}{hint}")
    log_line = call_candidate(f"{_cases()[0][0]}", candidate, *_cases()[0][1], attention=True,
                              exercise="Exercise 13.1")
    if not isinstance(log_line, (int, float)) or isinstance(log_line, bool):
        raise GradingError(f"{_cases()[0][0]}: expected a float (MFU as a fraction), got {kind_of(log_line)}")
    return passed(f"Exercise 13.1: model_flops_utilization matches the benchmark's formula on "
                  f"{len(_cases())} runs; the log line's MFU is {log_line:.1%}")
