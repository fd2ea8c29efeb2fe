"""Context parallelism, measured: communication, activation memory and load balance per rank.

Notation: ``s`` sequence, ``b`` micro-batch, ``h`` hidden, ``a`` heads, ``g`` kv heads, ``d`` head dim,
``t`` TP size, ``cp`` CP size, ``L = s/cp`` tokens per rank, ``n = a/t`` and ``g_t = g/t`` (1 when the
kv heads are replicated, g < t) heads per rank, ``e`` bytes per element. Every formula is checked
against :class:`CommCounter` / :class:`SavedActivationCounter` on gloo ranks
(``tests/measure/test_context_parallel.py``).

**Ring (p2p), one attention layer, per rank** (``mpu/ring_attention.py``). A block is k or v in the
(b, g_t, L, d) view, ``B = b·g_t·L·d`` elements, always **fp32** (``ring_attention`` casts with
``.float()`` whatever the model dtype: 4 bytes). Steps 0 … cp-2 each post one send to the next rank
and one recv from the previous one per tensor (``batch_isend_irecv``: c10d ``send`` / ``recv_``)::

    forward    2(cp-1) sends + 2(cp-1) recvs of B     k, v once round the ring
    backward   4(cp-1) sends + 4(cp-1) recvs of B     k, v again (steps 0 … cp-2) + their travelling
                                                      gradients dK, dV (steps 1 … cp-1; zeros-padded
                                                      to the whole block even when half is computed)

so a rank sends ``8(cp-1)·B`` bytes forward and ``16(cp-1)·B`` backward (CommCounter's
``ring_wire_bytes`` charges each recv its bytes too). Nothing depends on the layout (zig-zag or not).

**All-to-all (a2a, Ulysses)** (``ulysses_attention``). ``_kv_for_heads`` sends k, v with ``g_a = g_t``
heads when cp | g_t, else repeated to ``g_a = n``. Forward: q (L·b·n·d), k, v (L·b·g_a·d each), the
output (gathered over heads back to L·b·n·d); backward: the four conjugate all-to-alls of the same
sizes. Per call of N elements a rank sends ``(cp-1)·⌈N/cp⌉·e``. ``engine="deepspeed"``: DeepSpeed ≥
0.15 takes the batch dim, the same 4 + 4 calls; DeepSpeed < 0.15 is called once per sequence
(``compat.deepspeed_ulysses``): ``4b + 4b`` calls of N/b elements — the same bytes.

**Activation memory, one ParallelTransformerLayer, per rank** (dropout 0, flash attention, fp32;
derived op by op as ``activation_formulas.py``). Everything token-wise is
:func:`layer_activation_terms` at ``s/cp`` tokens: norms, the QKV and fc1 inputs, the MLP. The
attention core keeps instead (``lbh = L·b·h/t``)::

    ring  q          ring_attention's (b, g_t, a/g, L, d) q is a *view*: it keeps its storage, the
                     fused QKV output 3·lbh (MHA without RoPE), else the rotated q / ``query``
                     output lbh
          k, v       ``.contiguous()`` copies in (b, g_t, L, d): 2·L·b·g_t·d (not repeated)
          o, lse     the merged output lbh and the log-sum-exp a·L·b/t, both fp32
          dense in   the output permuted back to (L, b, h/t), a copy: lbh
    a2a   q, k, v    the gathered, position-ordered (``index_select``) copies at n/cp heads over the
                     whole s — k, v repeated by _kv_for_heads or the kernel's GQA repeat: 3·lbh
          out, lse   flash attention's (b, n/cp, s, d) output lbh and lse a·L·b/t
          dense in   the reverse all-to-all's output (L, b, h/t): lbh
          indices    ``natural`` and ``order`` (int64, s each) of the index_selects: 2s (×b for
                     DeepSpeed < 0.15, one local attention per sequence), not split by cp

At cp = 1 flash keeps 4·sbh/t for MHA (the fused QKV output 3, the output 1 — a view as dense's
input), 6 with RoPE (+ rotated q, k), 4 for GQA (q, k and v repeated, out). So cp = 2 is not exactly
half: GPT ring 19/16·½ ≈ 0.59 (k, v and dense-input copies on top), GPT a2a 17/16·½ ≈ 0.53, LLaMA
ring 23/24·½ ≈ 0.48 (the fused QKV output and rotated k are no longer kept), GQA (g = a/2) ring exactly
½; the per-token statistics and lse halve exactly. Selective recompute keeps the checkpoint's inputs
and output, all token-wise: the cp = 1 terms at s/cp; full recompute the layer input /cp.

**Load balance** (``ring_schedule``; work = q·k scores, c = L = s/cp): zig-zag rank i computes
``c(c+1)/2 + (cp-1)·c²/2`` — every rank the same; contiguous rank i ``c(c+1)/2 + i·c²``, so
max/mean = ``(c(c+1)/2 + (cp-1)c²) / (c(c+1)/2 + (cp-1)c²/2) → (2cp-1)/cp`` for long sequences.
:func:`ring_timeline` records each rank's per-step events, :func:`plot_ring_timeline` draws them.
"""
from __future__ import annotations

import importlib.metadata

import torch
import torch.distributed as dist

from minimegatron.compat import version_tuple
from minimegatron.config import ModelConfig
from minimegatron.measure.activation_formulas import layer_activation_terms
from minimegatron.measure.comm import CommRecord, OpTotal, ring_wire_bytes
from minimegatron.mpu.context_parallel import context_parallel_index, context_parallel_split
from minimegatron.mpu.ring_attention import LAYOUTS, ring_attention, ring_schedule

__all__ = ["ring_attention_comm", "ulysses_calls_per_tensor", "ulysses_attention_comm",
           "cp_attention_comm", "group_totals", "cp_layer_activation_terms", "cp_layer_activation_bytes",
           "ring_work", "ring_work_closed_form", "ring_imbalance", "record_ring_timeline", "ring_timeline",
           "plot_ring_timeline"]

Calls = list[tuple[str, str, int, int, int, int]]  # (phase, op, calls, elements each, bytes/element, group)


def _local_kv(kv_heads: int, tp: int) -> int:
    """kv heads per TP rank: g/t, or 1 where they are replicated (g < t; ParallelAttention keeps one)."""
    return kv_heads // tp if kv_heads >= tp else 1


def _totals(calls: Calls, by_phase: bool) -> dict:
    out: dict = {}
    for phase, op, count, numel, e, group in calls:
        key = (phase, op) if by_phase else op
        one = OpTotal(1, numel * e, ring_wire_bytes(op, numel, e, group))
        for _ in range(count):
            out[key] = out.get(key, OpTotal()) + one
    return out


# ---- communication --------------------------------------------------------------------------------
def ring_attention_comm(seq: int, batch: int, kv_heads: int, head_dim: int, cp: int, tp: int = 1,
                        by_phase: bool = False) -> dict:
    """Sends/recvs of one ring-attention layer per rank, as :meth:`CommCounter.totals` (docstring)."""
    if cp == 1:
        return {}
    block = batch * _local_kv(kv_heads, tp) * (seq // cp) * head_dim  # (b, g_t, s/cp, d), fp32
    return _totals([("forward", "send", 2 * (cp - 1), block, 4, 2),
                    ("forward", "recv", 2 * (cp - 1), block, 4, 2),
                    ("backward", "send", 4 * (cp - 1), block, 4, 2),
                    ("backward", "recv", 4 * (cp - 1), block, 4, 2)], by_phase)


def ulysses_calls_per_tensor(engine: str, batch: int) -> int:
    """All-to-all calls per tensor: 1 (ours, DeepSpeed ≥ 0.15), ``batch`` (DeepSpeed < 0.15, whose
    ``DistributedAttention`` has no ``batch_dim_idx``: ``compat.deepspeed_ulysses`` loops over sequences)."""
    if engine == "ours":
        return 1
    if engine != "deepspeed":
        raise ValueError(f"engine={engine!r}: use 'ours' or 'deepspeed'")
    return batch if version_tuple(importlib.metadata.version("deepspeed")) < (0, 15) else 1


def ulysses_attention_comm(seq: int, batch: int, heads: int, kv_heads: int, head_dim: int, cp: int,
                           tp: int = 1, bytes_per_element: int = 4, engine: str = "ours",
                           by_phase: bool = False) -> dict:
    """All-to-alls of one Ulysses attention layer per rank: 4 forward (q, k, v, out), 4 backward."""
    if cp == 1:
        return {}
    n, g = heads // tp, _local_kv(kv_heads, tp)
    g_a = g if g % cp == 0 else n  # _kv_for_heads: repeated up to the query heads
    local = seq // cp
    nq, nk = local * batch * n * head_dim, local * batch * g_a * head_dim  # (s/cp, b, heads, d)
    c = ulysses_calls_per_tensor(engine, batch)
    return _totals([(phase, "all_to_all", c, numel // c, bytes_per_element, cp)
                    for phase in ("forward", "backward") for numel in (nq, nk, nk, nq)], by_phase)


def cp_attention_comm(config: ModelConfig, seq: int, batch: int, cp: int, cp_comm: str = "p2p",
                      tp: int = 1, bytes_per_element: int = 4, engine: str = "ours",
                      by_phase: bool = False) -> dict:
    """The CP-group communication of one layer of ``config`` (ring or all-to-all by ``cp_comm``)."""
    a, g, d = config.num_attention_heads, config.num_kv_heads, config.head_dim
    if cp_comm == "p2p":
        return ring_attention_comm(seq, batch, g, d, cp, tp, by_phase)
    return ulysses_attention_comm(seq, batch, a, g, d, cp, tp, bytes_per_element, engine, by_phase)


def group_totals(records: list[CommRecord], ranks: list[int], by_phase: bool = False) -> dict:
    """Totals of the records on the group of global ``ranks`` (a send/recv: its peer is in it)."""
    out: dict = {}
    for r in records:
        ours = set(r.ranks) <= set(ranks) if r.op in ("send", "recv") else tuple(r.ranks) == tuple(ranks)
        if ours and r.ranks and r.op != "barrier":
            key = (r.phase, r.op) if by_phase else r.op
            out[key] = out.get(key, OpTotal()) + OpTotal(1, r.bytes, r.wire_bytes)
    return out


# ---- activation memory ----------------------------------------------------------------------------
_TOKENWISE = ("norm inputs", "norm statistics (mean, rstd)", "normalised x (before γ)",
              "norm statistics (rstd)", "QKV input", "fc1 input", "GeLU input", "fc1 output [gate | up]",
              "silu(gate)", "fc2 input")


def cp_layer_activation_terms(config: ModelConfig, seq: int, batch: int, cp: int = 1,
                              cp_comm: str = "p2p", tp: int = 1, sequence_parallel: bool = False,
                              recompute: str = "none", engine: str = "ours") -> dict[str, float]:
    """Elements one ``ParallelTransformerLayer`` keeps for backward per rank under CP, term by term
    (module docstring); terms named ``(int64)`` count 8-byte elements. cp = 1: ``layer_activation_terms``."""
    if cp == 1:
        return layer_activation_terms(config, seq, batch, tp, sequence_parallel, recompute)
    config.validate_cp(cp, cp_comm, tp)
    local = context_parallel_split(seq, cp, tp, sequence_parallel)  # s/cp tokens per rank
    base = layer_activation_terms(config, local, batch, tp, sequence_parallel, recompute)
    if recompute != "none":  # the checkpoint keeps q, k, v and the core's output: token-wise
        return base
    terms = {k: v for k, v in base.items() if k in _TOKENWISE}
    a, g, d, h = config.num_attention_heads, config.num_kv_heads, config.head_dim, config.hidden_size
    lbh, rope = local * batch * h / tp, config.position_embedding == "rope"
    if cp_comm == "p2p":
        if g == a and not rope:
            terms["fused QKV output (q's storage)"] = 3 * lbh
        else:
            terms["q" + (" rotated" if rope else "")] = lbh
        terms["k, v (contiguous fp32 copies)"] = 2 * local * batch * _local_kv(g, tp) * d
        terms["ring output o"] = lbh
    else:
        terms["q, k, v gathered (n/cp heads, position order)"] = 3 * lbh
        terms["attention output (b, n/cp, s, d)"] = lbh
        terms["position-order indices (int64)"] = 2 * seq * ulysses_calls_per_tensor(engine, batch)
    terms["logsumexp"] = a * local * batch / tp
    terms["attention output (dense input)"] = lbh
    return terms


def cp_layer_activation_bytes(config: ModelConfig, seq: int, batch: int, cp: int = 1,
                              cp_comm: str = "p2p", tp: int = 1, sequence_parallel: bool = False,
                              recompute: str = "none", engine: str = "ours",
                              bytes_per_element: int = 4) -> float:
    """Bytes per layer per rank: Σ terms · element size (8 for the int64 index terms)."""
    terms = cp_layer_activation_terms(config, seq, batch, cp, cp_comm, tp, sequence_parallel,
                                      recompute, engine)
    return sum(v * (8 if "(int64)" in k else bytes_per_element) for k, v in terms.items())


# ---- load balance ---------------------------------------------------------------------------------
def ring_work(seq_len: int, cp: int, layout: str = "zigzag") -> list[int]:
    """Scores (q·k pairs) each rank computes in one ring-attention forward, from ``ring_schedule``."""
    local = seq_len // cp
    return [sum(st.scores(local) for st in ring_schedule(r, cp, layout)) for r in range(cp)]


def ring_work_closed_form(seq_len: int, cp: int, layout: str = "zigzag") -> list[int]:
    """zig-zag: ``c(c+1)/2 + (cp-1)c²/2`` on every rank; contiguous: ``c(c+1)/2 + i·c²`` (c = s/cp)."""
    c = seq_len // cp
    if layout == "zigzag":
        return [c * (c + 1) // 2 + (cp - 1) * c * c // 2] * cp
    return [c * (c + 1) // 2 + i * c * c for i in range(cp)]


def ring_imbalance(work: list[float]) -> float:
    """max/mean of per-rank work: 1 is balanced; the slowest rank sets the step time."""
    return max(work) / (sum(work) / len(work))


def record_ring_timeline(state, seq_len: int, layout: str = "zigzag", batch: int = 1, heads: int = 4,
                         kv_heads: int = 4, head_dim: int = 32, warmup: int = 1) -> list[dict]:
    """On each CP rank (inside a launch): one ring-attention forward of this rank's ``layout`` piece,
    after ``warmup`` untimed ones; returns its events ``{rank, step, source, start, end, scores}``."""
    g = torch.Generator().manual_seed(0)
    whole = [torch.randn(batch, n, seq_len, head_dim, generator=g) for n in (heads, kv_heads, kv_heads)]
    idx = context_parallel_index(seq_len, state.cp_rank, state.cp, layout=layout)
    q, k, v = (t.index_select(2, idx) for t in whole)  # (b, heads, s/cp, d): this rank's tokens
    args = (state.cp_group, state.cp_ranks, state.cp_rank, layout)
    with torch.no_grad():
        for _ in range(warmup):
            ring_attention(q, k, v, *args)
        dist.barrier(group=state.cp_group)  # start together
        events: list[dict] = []
        ring_attention(q, k, v, *args, timeline=events)
    return [{**e, "layout": layout} for e in events]


def _timeline_rank(cp: int, seq_len: int, layouts: tuple[str, ...], kwargs: dict) -> dict:
    from minimegatron.mpu.state import initialize_model_parallel
    state = initialize_model_parallel(context_parallel_size=cp)
    return {lay: record_ring_timeline(state, seq_len, lay, **kwargs) for lay in layouts}


def ring_timeline(seq_len: int = 1024, cp: int = 4, layouts: tuple[str, ...] = LAYOUTS,
                  timeout: float = 120.0, **kwargs) -> dict[str, list[dict]]:
    """Launch ``cp`` gloo ranks, record one ring forward per layout; ``{layout: events of all ranks}``.
    ``kwargs``: batch, heads, kv_heads, head_dim, warmup (:func:`record_ring_timeline`)."""
    from minimegatron.launch import launch
    per_rank = launch(_timeline_rank, cp, cp, seq_len, tuple(layouts), kwargs, timeout=timeout)
    return {lay: [e for r in per_rank for e in r[lay]] for lay in layouts}


def plot_ring_timeline(events: list[dict], ax=None, title: str | None = None):
    """One row per rank, one bar per ring step (start → end, ms), coloured by its work and labelled
    with the source block; the title gives the work imbalance max/mean. Returns the axis."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not events:
        raise ValueError("no ring events: pass what ring_attention(..., timeline=[]) recorded")
    ranks = sorted({e["rank"] for e in events})
    t0, top = min(e["start"] for e in events), max(e["scores"] for e in events) or 1
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.6 * len(ranks) + 1.2))
    cmap = plt.get_cmap("viridis")
    for e in events:
        y, left, width = len(ranks) - 1 - ranks.index(e["rank"]), (e["start"] - t0) * 1e3, \
            (e["end"] - e["start"]) * 1e3
        ax.barh(y, width, left=left, height=0.8, color=cmap(0.15 + 0.85 * e["scores"] / top),
                edgecolor="white", linewidth=0.5)
        ax.text(left + width / 2, y, f"{e['source']}", ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r}" for r in reversed(ranks)])
    ax.set_xlabel("time (ms)")
    ax.legend(handles=[Patch(color=cmap(0.15), label="few scores"),
                       Patch(color=cmap(1.0), label="most scores")],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=7, ncol=2, frameon=False)
    work = [sum(e["scores"] for e in events if e["rank"] == r) for r in ranks]
    layout = events[0].get("layout", "")
    ax.set_title(title or f"ring attention {layout} (bar label: source block): work max/mean "
                          f"{ring_imbalance(work):.2f}", pad=18)
    return ax
