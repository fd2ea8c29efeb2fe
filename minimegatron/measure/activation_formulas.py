"""Activation memory of one transformer layer: the paper's formula, and the same count for our code.

**Korthikanti et al. 2022** ("Reducing Activation Recomputation in Large Transformer Models", §4), for
16-bit activations with dropout, ``s`` sequence, ``b`` micro-batch, ``h`` hidden, ``a`` heads, ``t``
tensor-parallel size; bytes per layer::

    no parallelism              s·b·h·(34 + 5·a·s/h)
    tensor parallel             s·b·h·(10 + 24/t + 5·a·s/(h·t))
    tensor + sequence parallel  s·b·h/t·(34 + 5·a·s/h)
    selective recompute         the 5·a·s/h term disappears        (34·s·b·h/t with TP+SP)
    full recompute              2·s·b·h (the layer input)           (2·s·b·h/t with SP)

where 34 = attention 11 (QKV input 2, Q and K 4, V 2, dense input 2, dropout mask 1) + MLP 19 (input 2,
GeLU input 8, fc2 input 8, dropout mask 1) + two LayerNorm inputs 4; and 5as²b = softmax output 2 +
dropout mask 1 + dropout output 2. The 10 under TP is what stays replicated: the two LayerNorm inputs,
the QKV and fc1 inputs, and the two dropout masks.

**Our settings**, derived the same way, in *elements* (``e`` bytes each: 4 for fp32), no dropout
(``dropout = 0``: no masks), ``f`` = ffn size, ``g`` = kv heads, ``u = t`` under sequence parallelism
else 1. What each op keeps (checked one by one with :class:`SavedActivationCounter`)::

    norms (×2)     LayerNorm: input s·b·h/u + mean, rstd 2·s·b/u
                   RMSNorm:   input s·b·h/u + normalised x s·b·h/u + rstd s·b/u   (γ·x needs x̂)
    QKV input      s·b·h/u — the norm output; under SP the column layer keeps only its (s/t, b, h)
                   shard and all-gathers it again in backward for ∂L/∂W, as Megatron does (the
                   paper's "/t"); GQA's separate ``query`` and ``key_value`` both save that same
                   shard tensor: one storage, counted once
    attention      SDPA (flash) keeps q, k, v, output, logsumexp (b, a/t, s):
                     MHA: the fused QKV output 3·s·b·h/t (v is a view of it: the whole buffer
                          stays), [RoPE: rotated q and k, 2·s·b·h/t], output s·b·h/t, lse a·s·b/t
                     GQA: q 1, k and v repeated to a heads 2, output 1 (·s·b·h/t), lse a·s·b/t
                   math (ALiBi): contiguous q, k, v copies 3·s·b·h/t, softmax output a·s²·b/t,
                          the output reshaped to (s, b, h/t) for ``dense`` s·b·h/t
                   (the flash output is laid out (s, b, n, d) already: ``dense``'s input is a view)
    MLP            fc1 input s·b·h/u (the shard under SP, re-gathered in backward)
                   GeLU: GeLU input s·b·f/t + fc2 input s·b·f/t
                   SwiGLU: fc1 output [gate | up] 2·s·b·f/t + silu(gate) s·b·f/t + fc2 input s·b·f/t
    selective      ``core_attention`` is checkpointed: it keeps its inputs (q, k, v as above, before
                   GQA's repeat) and its output s·b·h/t; the lse / softmax terms go away
    full           the layer input s·b·h/u only (RoPE's cos/sin are shared by all layers)

So a GPT layer (LayerNorm, GeLU, f = 4h, flash) keeps ``16·s·b·h + (4 + a)·s·b`` elements: the paper's
16 two-byte activations per ``s·b·h`` (34 bytes minus 2 bytes of masks), with the ``a·s²·b``
attention matrix replaced by flash attention's ``a·s·b`` logsumexp. Bias adds (``y + b``) and residual
adds keep nothing. RoPE's cos/sin (2·s·b·d, made once per forward) are charged to the first layer.
"""
from __future__ import annotations

from minimegatron.config import ModelConfig

__all__ = ["korthikanti_activation_bytes", "layer_activation_terms", "layer_activation_bytes"]

RECOMPUTE = ("none", "selective", "full")


def _check(recompute: str, tp: int) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: use one of {RECOMPUTE}")
    if tp < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp}")


def korthikanti_activation_bytes(seq: int, batch: int, hidden: int, heads: int, tp: int = 1,
                                 sequence_parallel: bool = False, recompute: str = "none") -> float:
    """Bytes per layer from Korthikanti et al. 2022 (16-bit, with dropout); see the module docstring."""
    _check(recompute, tp)
    s, b, h, a, t = seq, batch, hidden, heads, tp
    sp = sequence_parallel and t > 1
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    attn = 0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return s * b * h / t * (34 + attn)
    if t == 1:
        return s * b * h * (34 + attn)
    return s * b * h * (10 + 24 / t + attn / t)


def layer_activation_terms(config: ModelConfig, seq: int, batch: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none"
                           ) -> dict[str, float]:
    """Elements kept for backward by one ``ParallelTransformerLayer``, term by term (module docstring).

    Sum and multiply by the element size for bytes (:func:`layer_activation_bytes`).
    """
    _check(recompute, tp)
    if config.dropout > 0:
        raise ValueError(f"the derivation assumes dropout = 0 (no masks kept), got {config.dropout}")
    a, g, d, f, h = (config.num_attention_heads, config.num_kv_heads, config.head_dim,
                     config.ffn_hidden_size, config.hidden_size)
    if a * d != h:
        raise ValueError(f"heads·head_dim = {a}·{d} != hidden_size={h}: the derivation assumes the "
                         "attention is hidden_size wide; leave head_dim unset (None) to measure it")
    if g % tp:
        raise ValueError(f"num_kv_heads={g} < tp={tp}: replicated kv heads are not covered; "
                         "choose tp dividing the kv heads")
    t = tp
    sp = sequence_parallel and t > 1
    u = t if sp else 1
    sbh, sb = seq * batch * h, seq * batch
    rope = config.position_embedding == "rope"
    math_attention = config.position_embedding == "alibi"
    fused = g == a
    if recompute == "full":
        return {"layer input": sbh / u}

    terms: dict[str, float] = {"norm inputs": 2 * sbh / u}
    if config.norm == "layernorm":
        terms["norm statistics (mean, rstd)"] = 2 * 2 * sb / u
    else:
        terms["normalised x (before γ)"] = 2 * sbh / u
        terms["norm statistics (rstd)"] = 2 * sb / u
    terms["QKV input"] = sbh / u  # under SP: the (s/t, b, h) shard, gathered again in backward

    if recompute == "selective":  # checkpoint(core_attention, q, k, v): its inputs + its output
        if fused:
            terms["fused QKV output"] = 3 * sbh / t
            if rope:
                terms["rotated q, k"] = 2 * sbh / t
        else:
            terms["q" + (" rotated" if rope else "")] = sbh / t
            terms["key_value output"] = 2 * g * d * sb / t
            if rope:
                terms["rotated k"] = g * d * sb / t
        terms["attention output (dense input)"] = sbh / t
    elif math_attention:
        terms["q, k, v (contiguous copies)"] = 3 * sbh / t
        terms["softmax output"] = a * seq * seq * batch / t
        terms["attention output (dense input)"] = sbh / t
    else:
        if fused:
            terms["fused QKV output"] = 3 * sbh / t
            if rope:
                terms["rotated q, k"] = 2 * sbh / t
        else:
            terms["q" + (" rotated" if rope else "")] = sbh / t
            terms["k, v repeated to all heads"] = 2 * sbh / t
        terms["attention output (dense input)"] = sbh / t
        terms["logsumexp"] = a * sb / t

    terms["fc1 input"] = sbh / u
    sbf = seq * batch * f
    if config.activation == "gelu":
        terms["GeLU input"] = sbf / t
    else:
        terms["fc1 output [gate | up]"] = 2 * sbf / t
        terms["silu(gate)"] = sbf / t
    terms["fc2 input"] = sbf / t
    return terms


def layer_activation_bytes(config: ModelConfig, seq: int, batch: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none",
                           bytes_per_element: int = 4) -> float:
    """Bytes one layer keeps for backward in our code (fp32 by default): Σ terms · element size."""
    terms = layer_activation_terms(config, seq, batch, tp, sequence_parallel, recompute)
    return bytes_per_element * sum(terms.values())
