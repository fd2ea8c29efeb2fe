"""Per-rank memory of a layout: weights, gradients, optimizer state (per ZeRO stage), activations.

**Parameters per rank** are counted exactly as the model holds them (``layers/``): a tensor-parallel
rank keeps ``1/tp`` of every column/row-parallel weight and of the (padded, ``V_pad``) vocabulary,
and a whole copy of what is replicated — the norms, the row-parallel biases (``dense``, ``fc2``), the
learned position table, MoE's router. Per transformer layer, ``d`` head dim, ``g`` kv heads, ``f``
MLP width, ``n = h·(2 if LayerNorm with bias else 1)``::

    sharded / tp   (h + 2·g·d)·h + h·h + (1 + [SwiGLU])·f·h + f·h
                   [+ biases (h + 2·g·d) + (1 + [SwiGLU])·f]
    replicated     2·n  [+ biases of dense and fc2: 2·h]

Pipeline stage ``i`` of ``pp`` holds layers ``[i·L/pp, (i+1)·L/pp)``; the first stage the embedding,
the last the final norm and the head — an untied head's own table, or with ``pp > 1`` a tied copy of
the embedding (DeepSpeed's ``TiedLayerSpec``; with ``pp = 1`` the tie is one tensor). The planner
reports the fuller of the first and last stage.

**Model states** reuse ``measure.zero``: ``dtype="bf16"`` is the paper's mixed-precision Adam
(:func:`~minimegatron.measure.zero.zero_paper_bytes`: 2Ψ + 2Ψ + 12Ψ, each sharded from its stage
on); ``dtype="fp32"`` is our CPU runs, exact with DeepSpeed's padding
(:func:`~minimegatron.measure.zero.zero_fp32_bytes`) for one flat vector per stage at ZeRO-1/2
(``ZeroAdamW(model.parameters())``) and one per unit at ZeRO-3 (embedding, each layer, final norm,
untied head: ``zero3_units``); stage 0's torch AdamW also keeps a 4-byte ``step`` per tensor, which
is left out. ZeRO shards over the ``dp·cp`` ranks holding the same weights (``dp_cp_group``); expert
weights over their ``dp/ep · cp`` replicas.

**Activations** reuse ``measure.activation_formulas`` / ``measure.context_parallel``
(:func:`~minimegatron.measure.context_parallel.cp_layer_activation_bytes`: Korthikanti et al.'s
derivation for our layer — flash attention, no dropout — at ``s/cp`` tokens, ``/tp`` under SP, and
the selective / full recompute cases). Under 1F1B stage ``i`` holds ``min(pp − i, m)`` micro-batches
in flight (the first stage ``pp``: Korthikanti §4.2.3's "L layers' worth" per device), one without
pipelining. An MoE layer's MLP terms are counted ``top_k`` times (each token visits k experts: an
estimate, not derived op by op). The last stage adds what the loss keeps: the fp32 logits shard
(``s/cp · b · V_pad/tp · 4`` bytes, an estimate) — or, with the fused head + loss (``fused_lm_loss``,
pp = 1), ∂H and the fp32 ∂W (``s/cp · b · h · e + V_pad/tp · h · 4``, ``mpu.fused_cross_entropy``).
"""
from __future__ import annotations

from minimegatron.config import ModelConfig
from minimegatron.measure.context_parallel import cp_layer_activation_terms
from minimegatron.measure.zero import zero_fp32_bytes, zero_paper_bytes
from minimegatron.plan.layout import Layout

__all__ = ["layer_parameters", "stage_units", "model_state_bytes", "activation_bytes", "ELEMENT_BYTES"]

ELEMENT_BYTES = {"bf16": 2, "fp32": 4}
_MLP_TERMS = ("fc1 input", "GeLU input", "fc1 output [gate | up]", "silu(gate)", "fc2 input")


def _norm_size(config: ModelConfig) -> int:
    return config.hidden_size * (2 if config.norm == "layernorm" and config.bias else 1)


def _mlp(config: ModelConfig, tp: int) -> tuple[int, int]:
    """(elements per rank, of which replicated) of one dense MLP."""
    h, f, bias = config.hidden_size, config.ffn_hidden_size, int(config.bias)
    up = 2 if config.activation == "swiglu" else 1
    sharded = (up * f * h + f * h + bias * up * f) // tp
    return sharded + bias * h, bias * h


def layer_parameters(config: ModelConfig, tp: int = 1, ep: int = 1, moe: bool = False) -> dict[str, int]:
    """Elements of one transformer layer on one rank: ``{"dense": …, "expert": …}`` (module docstring)."""
    h, g, d, bias = config.hidden_size, config.num_kv_heads, config.head_dim, int(config.bias)
    qkv = h + 2 * g * d
    attention = (qkv * h + h * h + bias * qkv) // tp + bias * h
    dense = 2 * _norm_size(config) + attention
    if not moe:
        return {"dense": dense + _mlp(config, tp)[0], "expert": 0}
    E = config.num_experts
    return {"dense": dense + E * h, "expert": (E // ep) * _mlp(config, tp)[0]}  # router (E, h) replicated


def stage_units(config: ModelConfig, layout: Layout, stage: int) -> list[dict[str, int]]:
    """The ZeRO-3 units of pipeline ``stage`` on one rank, in model order: embedding, layers, final
    norm, head — each ``{"dense": elements, "expert": elements}``."""
    tp, pp = layout.tp, layout.pp
    h, v_pad = config.hidden_size, config.padded_vocab_size(tp)
    per = config.num_layers // pp
    units = []
    if stage == 0:
        positions = config.max_seq_len * h if config.position_embedding == "learned" else 0
        units.append({"dense": v_pad * h // tp + positions, "expert": 0})
    units += [layer_parameters(config, tp, layout.ep, config.is_moe_layer(i))
              for i in range(stage * per, (stage + 1) * per)]
    if stage == pp - 1:
        if config.final_norm:
            units.append({"dense": _norm_size(config), "expert": 0})
        if not config.tie_embeddings or pp > 1:  # untied head, or the tied table's copy on the last stage
            units.append({"dense": v_pad * h // tp, "expert": 0})
    return units


def model_state_bytes(config: ModelConfig, layout: Layout, stage: int, dtype: str = "bf16"
                      ) -> dict[str, float]:
    """``{"parameters", "gradients", "optimizer"}`` bytes on one rank of ``stage`` (module docstring)."""
    units = stage_units(config, layout, stage)
    shards = {"dense": layout.dp * layout.cp, "expert": layout.dp // layout.ep * layout.cp}
    out = {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0}
    for kind, n in shards.items():
        flat = [u[kind] for u in units if u[kind]]
        if not flat:
            continue
        if dtype == "bf16":
            part = zero_paper_bytes(sum(flat), n, layout.zero)
        else:
            part = zero_fp32_bytes(flat if layout.zero == 3 else [sum(flat)], n, layout.zero)
        for k in out:
            out[k] += part[k]
    return out


def activation_bytes(config: ModelConfig, layout: Layout, seq_len: int, global_batch: int, stage: int,
                     dtype: str = "bf16") -> dict[str, float]:
    """``{"per layer", "in flight", "activations"}`` for one rank of ``stage`` (module docstring);
    "per layer" is a dense layer, "activations" the stage's total with the micro-batches in flight."""
    e, L = ELEMENT_BYTES[dtype], layout
    terms = cp_layer_activation_terms(config, seq_len, L.micro_batch, L.cp, L.cp_comm, L.tp, L.sp,
                                      L.recompute)

    def size(ts: dict[str, float], k_mlp: int = 1) -> float:
        return sum(v * (8 if "(int64)" in k else e) * (k_mlp if k in _MLP_TERMS else 1) for k, v in ts.items())

    per = config.num_layers // L.pp
    layers = range(stage * per, (stage + 1) * per)
    one = sum(size(terms, config.moe_top_k if config.is_moe_layer(i) else 1) for i in layers)
    m = L.micro_batches(global_batch)
    in_flight = min(L.pp - stage, m) if L.pp > 1 else 1
    total = one * in_flight
    if stage == L.pp - 1:
        tokens, v_part = seq_len // L.cp * L.micro_batch, config.padded_vocab_size(L.tp) // L.tp
        fused = config.fused_lm_loss and L.pp == 1  # the pipeline's head is unfused
        total += tokens * config.hidden_size * e + v_part * config.hidden_size * 4 if fused else tokens * v_part * 4
    return {"per layer": size(terms), "in flight": in_flight, "activations": total}
