"""What one training step costs a rank: FLOPs, and the bytes each of its groups moves.

**FLOPs** (Narayanan et al. 2021, §5.1; PaLM, App. B): a token costs ``6·N`` matmul FLOPs forward and
backward for the ``N`` weights it multiplies by (the layers' matrices, ``top_k`` of an MoE layer's
experts, the LM head; not the embedding lookup), plus attention's ``QKᵀ`` and ``AV``: ``12·L·s·h``
per token (non-causal count, the MFU convention). Recomputation re-runs forward: ``full`` adds the
layers' forward (``2·N_layers + 4·L·s·h`` per token), ``selective`` only the attention core's
(``4·L·s·h``). *Model* FLOPs (for MFU) leave recomputation out; *hardware* FLOPs (for time) count it.

**Communication per micro-batch** reuses ``measure``'s formulas, in :meth:`CommCounter.totals` form
(``{op: OpTotal(calls, bytes, wire_bytes)}``), ``s_r = s/cp`` tokens per rank:

* TP, per layer — :func:`~minimegatron.measure.comm.tp_layer_comm` (2 all-reduces forward, 2 backward
  of ``s_r·b·h``; under SP the reduce-scatter / all-gather pairs and their re-gathers); ``full``
  recompute runs the forward collectives again, all but the MLP's closing ``g`` (torch's checkpoint
  stops recomputing once the last saved tensor is rebuilt: "early stop"). Around the layers: the
  vocab-parallel embedding's forward all-reduce (SP: + its scatter's backward all-gather), the
  head's ``f`` (SP: all-gather forward, re-gather + reduce-scatter backward; the final norm's γ[, β]
  all-reduce), and the loss's
  three fp32 all-reduces of ``s_r·b`` (max, target logit, Σ exp; ``mpu.cross_entropy``). The fused
  head + loss (``config.fused_lm_loss``, pp = 1; the pipeline keeps the unfused pair) has no SP
  re-gather (∂W is made in forward) and all-reduces per chunk of ``c`` tokens: the max (``c``) and
  [target logit, Σ exp] (``2c``) — the same bytes in more calls (``mpu.fused_cross_entropy``).
* CP, per layer — :func:`~minimegatron.measure.context_parallel.cp_attention_comm` (ring or
  all-to-all; the ring moves k, v in the model's dtype here, fp32 in our CPU code).
* EP, per MoE layer — :func:`~minimegatron.measure.moe.moe_a2a_comm` (uniform routing).
* PP — a stage sends its ``s_r·b·h`` output (``/tp`` under SP) forward and the input gradient back;
  once per step DeepSpeed's engine all-reduces a tied embedding's gradient between the first and
  last stage and broadcasts the loss (:func:`pp_step_comm`).

**Per step**, over the ``dp·cp`` ranks sharing the weights — :func:`~minimegatron.measure.zero.zero_comm`:
ZeRO-0 all-reduces the gradients once, ZeRO-1 reduce-scatters and all-gathers once; ZeRO-2
reduce-scatters every micro-batch's gradients as backward makes them (and all-gathers once); ZeRO-3
also all-gathers the weights in every micro-batch's forward and backward.
"""
from __future__ import annotations

from minimegatron.config import ModelConfig
from minimegatron.measure.comm import OpTotal, ring_wire_bytes, tp_layer_comm
from minimegatron.measure.context_parallel import cp_attention_comm
from minimegatron.measure.moe import moe_a2a_comm
from minimegatron.measure.zero import zero_comm
from minimegatron.mpu.fused_cross_entropy import default_chunk_tokens
from minimegatron.plan.layout import Layout
from minimegatron.plan.memory import ELEMENT_BYTES, _mlp, stage_units

__all__ = ["model_flops", "tp_comm", "cp_comm", "ep_comm", "pp_comm", "pp_step_comm", "dp_comm",
           "group_is_intra_node",
           "add_totals", "wire"]

Totals = dict[str, OpTotal]


def add_totals(*parts: Totals, times: int = 1) -> Totals:
    """Sum ``{op: OpTotal}`` dicts, the result ``times`` over (``times=0``: ``{}``)."""
    out: Totals = {}
    for part in parts:
        for op, t in part.items():
            out[op] = out.get(op, OpTotal()) + t
    if times == 1:
        return out
    return {op: OpTotal(t.count * times, t.bytes * times, t.wire_bytes * times)
            for op, t in out.items() if times}


def wire(totals: Totals) -> int:
    """Bytes this rank sends (the ring algorithms' count): what the link time is charged for."""
    return sum(t.wire_bytes for op, t in totals.items() if op != "recv")


def _one(op: str, numel: int, e: int, group: int) -> Totals:
    return {op: OpTotal(1, numel * e, ring_wire_bytes(op, numel, e, group))}


def model_flops(config: ModelConfig, seq_len: int, tokens: int, recompute: str = "none") -> dict[str, float]:
    """``{"model", "hardware"}`` FLOPs of ``tokens`` tokens of ``seq_len`` (module docstring)."""
    h, L, V = config.hidden_size, config.num_layers, config.vocab_size
    g, d = config.num_kv_heads, config.head_dim
    attention = (h + 2 * g * d) * h + h * h
    dense_mlp = _mlp(config.replace(bias=False), 1)[0]
    layers = sum(attention + dense_mlp * (config.moe_top_k if config.is_moe_layer(i) else 1)
                 for i in range(L))
    core = 12 * L * seq_len * h  # QKᵀ and AV, forward + backward, per token
    model = (6 * (layers + V * h) + core) * tokens
    extra = {"none": 0, "selective": core / 3, "full": 2 * layers + core / 3}[recompute] * tokens
    return {"model": float(model), "hardware": float(model + extra)}


def tp_comm(config: ModelConfig, layout: Layout, seq_len: int, stage: int, dtype: str = "bf16") -> Totals:
    """TP-group collectives of one micro-batch's forward + backward on ``stage`` (module docstring)."""
    L, e = layout, ELEMENT_BYTES[dtype]
    t = L.tp
    if t == 1:
        return {}
    s, b, h = seq_len // L.cp, L.micro_batch, config.hidden_size
    n = s * b * h
    layer = tp_layer_comm(s, b, h, t, L.sp, e, by_phase=True,
                          separate_kv=config.num_kv_heads != config.num_attention_heads,
                          norm=config.norm, bias=config.bias)
    per_layer = add_totals(*[{op: total} for (_, op), total in layer.items()])
    if L.recompute == "full":  # forward again inside backward — but torch's checkpoint stops once
        # the last saved tensor is rebuilt (early stop): the MLP's closing g is not re-run
        last = "reduce_scatter" if L.sp else "all_reduce"
        again = {op: total for (phase, op), total in layer.items() if phase == "forward"}
        one = OpTotal(1, n * e, ring_wire_bytes(last, n, e, t))
        again[last] = OpTotal(again[last].count - 1, again[last].bytes - one.bytes,
                              again[last].wire_bytes - one.wire_bytes)
        per_layer = add_totals(per_layer, again)
    out = add_totals(per_layer, times=config.num_layers // L.pp)
    if stage == 0:  # the vocab-parallel embedding: all-reduce forward (+ SP scatter's backward gather)
        out = add_totals(out, _one("all_reduce", n, e, t), _one("all_gather", n, e, t) if L.sp else {})
    if stage == L.pp - 1:
        fused = config.fused_lm_loss and L.pp == 1  # the plain model; the pipeline's head is unfused
        if L.sp:  # head: gather forward, [unfused: re-gather +] reduce-scatter backward; final norm's γ[, β]
            norm = (2 if config.norm == "layernorm" and config.bias else 1) if config.final_norm else 0
            out = add_totals(out, _one("all_gather", n, e, t), {} if fused else _one("all_gather", n, e, t),
                             _one("reduce_scatter", n, e, t), *[_one("all_reduce", h, e, t)] * norm)
        else:     # head: f's backward all-reduce
            out = add_totals(out, _one("all_reduce", n, e, t))
        out = add_totals(out, _loss_comm(config, s * b, t, fused))
    return out


def _loss_comm(config: ModelConfig, tokens: int, t: int, fused: bool) -> Totals:
    """The vocab-parallel loss's fp32 all-reduces: 3 of ``tokens`` (max, target logit, Σ exp), or
    fused, per chunk of c tokens, the max (c) and [target logit, Σ exp] (2c)."""
    if not fused:
        return add_totals(_one("all_reduce", tokens, 4, t), times=3)
    c = config.lm_loss_chunk or default_chunk_tokens(config.padded_vocab_size(t) // t)
    chunks = [min(c, tokens - i) for i in range(0, tokens, c)]
    return add_totals(*[add_totals(_one("all_reduce", k, 4, t), _one("all_reduce", 2 * k, 4, t))
                        for k in chunks])


def cp_comm(config: ModelConfig, layout: Layout, seq_len: int, dtype: str = "bf16") -> Totals:
    """CP-group traffic of one micro-batch on one stage (ring k/v in the model's dtype)."""
    L = layout
    if L.cp == 1:
        return {}
    per = cp_attention_comm(config, seq_len, L.micro_batch, L.cp, L.cp_comm, L.tp,
                            ELEMENT_BYTES[dtype], by_phase=True)
    scale = ELEMENT_BYTES[dtype] / 4 if L.cp_comm == "p2p" else 1  # ring_attention_comm counts fp32
    out = add_totals(*[add_totals({op: OpTotal(t.count, int(t.bytes * scale), int(t.wire_bytes * scale))},
                                  times=2 if phase == "forward" and L.recompute == "full" else 1)
                       for (phase, op), t in per.items()])
    return add_totals(out, times=config.num_layers // L.pp)


def ep_comm(config: ModelConfig, layout: Layout, seq_len: int, stage: int, dtype: str = "bf16") -> Totals:
    """EP all-to-alls of one micro-batch on ``stage`` (uniform routing, no drops)."""
    L = layout
    if L.ep == 1:
        return {}
    per = config.num_layers // L.pp
    moe = sum(config.is_moe_layer(i) for i in range(stage * per, (stage + 1) * per))
    one = moe_a2a_comm(seq_len // L.cp * L.micro_batch, config.moe_top_k, config.hidden_size, L.ep,
                       config.num_experts, ELEMENT_BYTES[dtype])
    return add_totals({op: t for (_, op), t in one.items()}, times=moe)


def pp_comm(config: ModelConfig, layout: Layout, seq_len: int, stage: int, dtype: str = "bf16") -> Totals:
    """P2P of one micro-batch on ``stage``: the activation sent forward and the input gradient sent
    back (and their receives), ``s_r·b·h`` elements (``/tp`` under SP: each TP rank sends its shard)."""
    L = layout
    if L.pp == 1:
        return {}
    n = seq_len // L.cp * L.micro_batch * config.hidden_size // (L.tp if L.sp else 1)
    peers = int(stage < L.pp - 1) + int(stage > 0)
    e = ELEMENT_BYTES[dtype]
    return add_totals(_one("send", n, e, 2), _one("recv", n, e, 2), times=peers)


def pp_step_comm(config: ModelConfig, layout: Layout, stage: int, dtype: str = "bf16") -> Totals:
    """Once per step on the pipeline group (DeepSpeed's engine): a tied embedding's gradient
    all-reduce between the first and last stage (``V_pad·h/tp``), and the loss broadcast from the
    last stage (2 fp32 numbers)."""
    L = layout
    if L.pp == 1:
        return {}
    out = _one("broadcast", 2, 4, L.pp)
    if config.tie_embeddings and stage in (0, L.pp - 1):
        v = config.padded_vocab_size(L.tp) * config.hidden_size // L.tp
        out = add_totals(out, _one("all_reduce", v, ELEMENT_BYTES[dtype], 2))
    return out


def dp_comm(config: ModelConfig, layout: Layout, global_batch: int, stage: int, dtype: str = "bf16") -> Totals:
    """One step's ZeRO / data-parallel collectives on ``stage`` (module docstring), all micro-batches."""
    L, e = layout, ELEMENT_BYTES[dtype]
    group = L.dp * L.cp
    units = [u["dense"] + u["expert"] for u in stage_units(config, layout, stage)]
    flat = units if L.zero == 3 else [sum(units)]
    gathers = None
    if L.zero == 3:  # a tied table used twice in one stage is gathered twice forward
        gathers = [2 if i == 0 and stage == 0 and L.pp == 1 and config.tie_embeddings else 1
                   for i in range(len(units))]
    once = zero_comm(flat, group, L.zero, e, forward_gathers=gathers)
    m = L.micro_batches(global_batch)
    if L.zero == 2 and once:  # reduce-scatter every micro-batch, all-gather once
        scatters = add_totals({"reduce_scatter": once["reduce_scatter"]}, times=m)
        return scatters | {"all_gather": once["all_gather"]}
    return add_totals(once, times=m if L.zero == 3 else 1)


def group_is_intra_node(stride: int, size: int, devices_per_node: int) -> bool:
    """Do the ``size`` ranks ``r, r+stride, …`` of a group (rank 0's) sit in one node?"""
    return (size - 1) * stride < devices_per_node
