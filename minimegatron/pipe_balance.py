"""How many transformer layers each pipeline stage should hold: the stages' costs, and a balanced split.

A pipeline runs at the pace of its slowest stage: every micro-batch crosses every stage, so a stage
that does more work per micro-batch than the others makes them wait (idle time on top of the
schedule's bubble). Equal *layer counts* are not equal work, because the first stage also holds the
embedding and the last one the final norm, the LM head and the loss. Per token, forward (backward
is about twice that, for every matrix alike)::

    piece            parameters                       matmul FLOPs per token
    embedding        V·h (+ s·h positions, GPT)       ~0 (a table lookup: no matmul)
    layer (GPT)      12h² (+ biases, norms)           2·12h² = 24h²  +  4·s·h  (QKᵀ, probs·V)
    layer (any)      h(h + 2·kv) + h² + h·u + f·h     2·(those weights)  +  4·s·h
    LM head          V·h (GPT: the tied table, again) 2·V·h          (the loss: a few·V more)

(``kv = num_kv_heads·head_dim``, ``u = f`` or ``2f`` with SwiGLU, ``V`` the padded vocab.) The head
is a layer's worth of FLOPs or more as soon as ``V ≳ 12h``: GPT-2 small (h = 768, V = 50257) has
2·V·h = 77 MFLOP per token against 24h² + 4sh = 17 MFLOP per layer (s = 1024): the head is ~4.5
layers. Split 12 layers 3,3,3,3 over 4 stages and the last stage does ~7.5 layers' work while the
others do 3 — they idle more than half the step, waiting for it. In a timeline the last stage is
the busy one and the others show the extra gaps. :func:`balanced_stage_layers` moves layers off the
last stage until the most loaded stage is as light as it can be (DeepSpeed's
``partition_method="parameters"`` balances *parameters* instead, which also unloads the first stage
for its embedding table: memory, not time). The tiny test models (h = 32, V = 128) have a head of
a third of a layer, so there 3,1 is *unbalanced* on purpose.
"""
from __future__ import annotations

from minimegatron.config import ModelConfig
from minimegatron.sizes import is_int

__all__ = ["layer_flops_per_token", "head_flops_per_token", "stage_flops", "balanced_stage_layers",
           "check_stage_layers"]


def layer_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward matmul FLOPs of one transformer layer per token: ``2·(weights) + 4·s·a``
    (``a`` = heads·head_dim, = h unless ``head_dim`` is set)."""
    h, f, a = config.hidden_size, config.ffn_hidden_size, config.attention_width
    kv = 2 * config.num_kv_heads * config.head_dim
    up = (2 if config.activation == "swiglu" else 1) * f
    return 2 * (h * (a + kv) + a * h + h * up + f * h) + 4 * seq_len * a


def head_flops_per_token(config: ModelConfig) -> int:
    """Forward FLOPs of the LM head per token: ``2·h·V`` (V padded, as the matrix is)."""
    return 2 * config.hidden_size * config.padded_vocab_size(1)


def stage_flops(config: ModelConfig, stage_layers: list[int] | tuple[int, ...], seq_len: int) -> list[int]:
    """Forward FLOPs per token of each stage: its layers, plus the head on the last one."""
    per_layer = layer_flops_per_token(config, seq_len)
    costs = [n * per_layer for n in stage_layers]
    costs[-1] += head_flops_per_token(config)
    return costs


def balanced_stage_layers(config: ModelConfig, stages: int, seq_len: int) -> tuple[int, ...]:
    """Layers per stage (each >= 1, summing to ``num_layers``) that minimise the busiest stage's FLOPs,
    the head counted on the last stage; ties keep the split closest to uniform."""
    L = config.num_layers
    if not 1 <= stages <= L:
        raise ValueError(f"cannot split num_layers={L} over {stages} pipeline stages: every stage needs at "
                         "least one transformer layer")
    candidates = []
    for last in range(1, L - stages + 2):  # layers on the last stage; the others as even as can be
        rest, others = L - last, stages - 1
        if others == 0 and rest:
            continue
        split = tuple(rest // others + (i < rest % others) for i in range(others)) if others else ()
        candidates.append(split + (last,))
    return min(candidates, key=lambda c: (max(stage_flops(config, c, seq_len)), abs(c[-1] - L / stages)))


def check_stage_layers(stage_layers, pp: int, num_layers: int, flag: str = "stage_layers") -> None:
    """A ValueError naming the fix unless ``stage_layers`` is None or ``pp`` ints >= 1 summing to
    ``num_layers`` (the transformer layers of each pipeline stage, first to last)."""
    if stage_layers is None:
        return
    counts = list(stage_layers) if isinstance(stage_layers, (list, tuple)) else None
    shown = repr(stage_layers) if counts is None else ",".join(map(str, counts))
    example = ",".join(str(num_layers // pp + (i < num_layers % pp)) for i in range(pp))
    if counts is None or not all(is_int(n) and n >= 1 for n in counts):
        raise ValueError(f"{flag} {shown}: every pipeline stage needs at least one transformer layer; give "
                         f"one positive int per stage, first to last, e.g. {flag} {example}")
    if len(counts) != pp or sum(counts) != num_layers:
        raise ValueError(f"{flag} {shown}: {len(counts)} stage(s) holding {sum(counts)} layers, but the "
                         f"pp={pp} stages hold num_layers={num_layers}; give {pp} counts summing to "
                         f"{num_layers}, e.g. {flag} {example}")
