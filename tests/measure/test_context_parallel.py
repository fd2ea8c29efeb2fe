"""Context parallelism measured on real gloo ranks: the formulas of measure/context_parallel.py.

Two launches (cp = 2 on 2 ranks; cp = 4 and tp = 2 × cp = 2 on 4 ranks), each shared by several
tests through a module fixture: CommCounter on the attention functions and on whole transformer
layers, SavedActivationCounter per layer, and the ring's recorded per-step events.
"""
import importlib.util

import pytest
import torch

from minimegatron import launch
from minimegatron.config import gpt_config, llama_config
from minimegatron.measure import (CommCounter, SavedActivationCounter, cp_attention_comm,
                                  cp_layer_activation_bytes, cp_layer_activation_terms, group_totals,
                                  layer_activation_bytes, plot_ring_timeline, record_ring_timeline,
                                  ring_attention_comm, ring_imbalance, ring_timeline, ring_work,
                                  ring_work_closed_form, tp_layer_comm, ulysses_attention_comm,
                                  ulysses_calls_per_tensor)
from minimegatron.mpu.context_parallel import ulysses_engine

S, B, D = 16, 2, 8          # attention-function cases: (s/cp, b, heads, d)
H, A = 64, 4                # layer cases
TL_SEQ = 32                 # timeline cases
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
CONFIGS = {
    "gpt": gpt_config(hidden_size=H, num_attention_heads=A, num_layers=2, vocab_size=64, final_norm=False),
    "llama": llama_config(hidden_size=H, num_attention_heads=A, num_layers=2, vocab_size=64,
                          final_norm=False),
    "llama-gqa": llama_config(hidden_size=H, num_attention_heads=A, num_kv_heads=2, num_layers=2,
                              vocab_size=64, final_norm=False),
}
LAYERS_CP2 = [(name, comm, "none", False) for name in CONFIGS for comm in ("p2p", "a2a")] + [
    ("gpt", comm, rec, False) for comm in ("p2p", "a2a") for rec in ("selective", "full")]
LAYERS_TP2_CP2 = [("gpt", "p2p", "none", True), ("llama-gqa", "a2a", "none", True),
                  ("llama", "p2p", "none", False)]


# ---- what runs on the ranks -------------------------------------------------------------------------
def _attention(state, comm, n, kv, engine="ours", dtype=torch.float32):
    from minimegatron.mpu import context_parallel as C
    q, k, v = (torch.randn(S // state.cp, B, h, D, dtype=dtype, requires_grad=True) for h in (n, kv, kv))
    with CommCounter() as cc:
        with cc.phase("forward"):
            out = (C.ulysses_attention(q, k, v, state, engine=engine) if comm == "a2a"
                   else C.context_parallel_attention(q, k, v, state))
        with cc.phase("backward"):
            out.float().sum().backward()
    return cc.totals(by_phase=True), [(r.phase, r.op, r.numel, r.dtype, r.ranks) for r in cc.records]


def _layer(name, cp, tp, comm, recompute, sp):
    from minimegatron.layers import ParallelTransformer, RotaryEmbedding
    from minimegatron.mpu import initialize_model_parallel
    from minimegatron.mpu.context_parallel import context_parallel_index

    cfg = CONFIGS[name]
    state = initialize_model_parallel(tp, 1, sequence_parallel=sp, context_parallel_size=cp, cp_comm=comm)
    torch.manual_seed(0)
    model = ParallelTransformer(cfg, state, recompute=recompute)
    local = S // cp
    x = torch.randn(local // tp if sp else local, B, H, requires_grad=True)  # (s/cp[/tp], b, h)
    rotary = None
    if cfg.position_embedding == "rope":  # at the tokens' global (zig-zag) positions
        rotary = RotaryEmbedding(cfg.head_dim)(context_parallel_index(S, state.cp_rank, cp).expand(B, -1))
    with CommCounter() as cc:
        with cc.phase("forward"), SavedActivationCounter(model) as acts:
            y = model(x, rotary)
        with cc.phase("backward"):
            y.sum().backward()
    cp_ops = group_totals(cc.records, state.cp_ranks, by_phase=True) if cp > 1 else {}
    tp_ops = group_totals(cc.records, state.tp_ranks, by_phase=True) if tp > 1 else {}
    return {"bytes": acts.layer_bytes("layers.1"), "cp": cp_ops, "tp": tp_ops, "records": len(cc.records)}


def _timelines(state):
    return {lay: record_ring_timeline(state, TL_SEQ, lay, heads=2, kv_heads=1, head_dim=8, warmup=0)
            for lay in ("zigzag", "contiguous")}


def _on_two_ranks():
    from minimegatron.mpu import initialize_model_parallel
    p2p = initialize_model_parallel(context_parallel_size=2)
    a2a = initialize_model_parallel(context_parallel_size=2, cp_comm="a2a")
    attn = {("p2p", n, kv): _attention(p2p, "p2p", n, kv) for n, kv in HEADS}
    attn["p2p bf16", 4, 2] = _attention(p2p, "p2p", 4, 2, dtype=torch.bfloat16)
    attn.update({("ours", n, kv): _attention(a2a, "a2a", n, kv) for n, kv in HEADS})
    if DEEPSPEED:
        attn["deepspeed", 4, 2] = _attention(a2a, "a2a", 4, 2, engine="deepspeed")
    layers = {case: _layer(case[0], 2, 1, *case[1:]) for case in LAYERS_CP2}
    layers.update({(name, "cp1", rec, False): _layer(name, 1, 1, "p2p", rec, False)
                   for name in CONFIGS for rec in ("none", "selective", "full")})
    return {"attn": attn, "layers": layers, "timeline": _timelines(p2p), "ranks": p2p.cp_ranks}


def _on_four_ranks():
    from minimegatron.mpu import initialize_model_parallel
    p2p = initialize_model_parallel(context_parallel_size=4)
    a2a = initialize_model_parallel(context_parallel_size=4, cp_comm="a2a")
    attn = {("p2p", n, kv): _attention(p2p, "p2p", n, kv) for n, kv in HEADS[:2]}
    attn.update({("ours", n, kv): _attention(a2a, "a2a", n, kv) for n, kv in HEADS})
    if DEEPSPEED:
        attn["deepspeed", 4, 2] = _attention(a2a, "a2a", 4, 2, engine="deepspeed")
    layers = {case: _layer(case[0], 2, 2, *case[1:]) for case in LAYERS_TP2_CP2}
    return {"attn": attn, "layers": layers, "timeline": _timelines(p2p), "ranks": p2p.cp_ranks,
            "cp_rank": p2p.cp_rank}


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_loaded_once():
    """Import DeepSpeed's Ulysses layer here, once, for the forked ranks to inherit (seconds per rank
    otherwise, 4 ranks on 2 cores)."""
    if DEEPSPEED:
        import deepspeed.sequence.layer  # noqa: F401


@pytest.fixture(scope="module")
def two():
    return launch(_on_two_ranks, 2, timeout=120)


@pytest.fixture(scope="module")
def four():
    return launch(_on_four_ranks, 4, timeout=120)


def _expected_attention(key, cp):
    kind, n, kv = key
    if kind.startswith("p2p"):
        return ring_attention_comm(S, B, kv, D, cp, by_phase=True)
    return ulysses_attention_comm(S, B, n, kv, D, cp, engine=kind, by_phase=True)


def _times(k, total):  # num_layers × one layer's OpTotal
    return type(total)(k * total.count, k * total.bytes, k * total.wire_bytes)


# ---- 1. communication --------------------------------------------------------------------------------
@pytest.mark.parametrize("world", ["two", "four"])
def test_attention_comm_equals_the_formula(world, request):
    ranks = request.getfixturevalue(world)
    cp = len(ranks)
    for rank in ranks:
        for key, (totals, records) in rank["attn"].items():
            assert totals == _expected_attention(key, cp), f"cp={cp} {key}: {totals}"
            kind, n, kv = key
            if kind.startswith("p2p"):  # k, v blocks (b, kv, s/cp, d), fp32 even for a bf16 model
                assert {(r[2], r[3]) for r in records} == {(B * kv * (S // cp) * D, torch.float32)}
            elif kind == "ours":  # q, k, v, out; k, v repeated to the query heads unless cp | kv
                kv_sent = kv if kv % cp == 0 else n
                nq, nk = S // cp * B * n * D, S // cp * B * kv_sent * D
                for phase in ("forward", "backward"):
                    assert sorted(r[2] for r in records if r[0] == phase) == sorted([nq, nk, nk, nq])


def test_ring_sends_to_the_next_rank_and_receives_from_the_previous(four):
    for rank in four:
        ring, i = rank["ranks"], rank["cp_rank"]
        _, records = rank["attn"]["p2p", 4, 2]
        assert {r[4] for r in records if r[1] == "send"} == {(ring[(i + 1) % 4],)}
        assert {r[4] for r in records if r[1] == "recv"} == {(ring[(i - 1) % 4],)}
        sends = [r for r in records if r[1] == "send"]
        assert len(sends) == 3 * 2 * (4 - 1)  # 2(cp-1) forward + 4(cp-1) backward


@pytest.mark.skipif(not DEEPSPEED, reason="DeepSpeed is not installed")
@pytest.mark.parametrize("world", ["two", "four"])
def test_deepspeed_ulysses_moves_the_same_bytes(world, request):
    """DeepSpeed < 0.15 (``compat.deepspeed_ulysses``) runs one DistributedAttention per sequence:
    4b + 4b calls instead of 4 + 4, of 1/b the elements each — the bytes are the formula's."""
    ranks = request.getfixturevalue(world)
    cp, calls = len(ranks), ulysses_calls_per_tensor("deepspeed", B)
    ours = ulysses_attention_comm(S, B, 4, 2, D, cp, by_phase=True)
    for rank in ranks:
        totals, _ = rank["attn"]["deepspeed", 4, 2]
        for key, t in ours.items():
            assert (totals[key].bytes, totals[key].wire_bytes) == (t.bytes, t.wire_bytes)
            assert totals[key].count == 4 * calls
    assert ulysses_calls_per_tensor("ours", B) == 1


def test_transformer_layer_comm_is_ours_on_the_cp_group_and_megatrons_on_the_tp_group(two, four):
    """Counting only the CP group's ops: num_layers × the attention formula. With tp = 2 × cp = 2 the
    rest is exactly Megatron's TP count at s/cp tokens, and nothing else is communicated."""
    engine = ulysses_engine()
    for rank in two:
        for (name, comm, rec, sp), got in rank["layers"].items():
            if comm != "cp1" and rec == "none":
                one = cp_attention_comm(CONFIGS[name], S, B, 2, comm, engine=engine, by_phase=True)
                assert got["cp"] == {k: _times(2, v) for k, v in one.items()}, (name, comm)
                assert got["records"] == sum(t.count for t in got["cp"].values())
    norms = {"gpt": dict(norm="layernorm", bias=True), "llama": dict(norm="rmsnorm", bias=False)}
    for rank in four:
        for (name, comm, rec, sp), got in rank["layers"].items():
            one = cp_attention_comm(CONFIGS[name], S, B, 2, comm, tp=2, engine=engine, by_phase=True)
            assert got["cp"] == {k: _times(2, v) for k, v in one.items()}, (name, comm)
            tp = tp_layer_comm(S // 2, B, H, 2, sp, by_phase=True, separate_kv=name == "llama-gqa",
                               **norms[name.split("-")[0]])
            assert got["tp"] == {k: _times(2, v) for k, v in tp.items()}, (name, comm)
            assert got["records"] == sum(t.count for t in (*got["cp"].values(), *got["tp"].values()))


# ---- 2. activation memory ----------------------------------------------------------------------------
def test_saved_bytes_per_layer_per_rank_equal_the_cp_formula(two, four):
    engine = ulysses_engine()
    for rank in two:
        for (name, comm, rec, _), got in rank["layers"].items():
            cp, comm = (1, "p2p") if comm == "cp1" else (2, comm)
            expected = cp_layer_activation_bytes(CONFIGS[name], S, B, cp, comm, recompute=rec, engine=engine)
            assert got["bytes"] == expected, f"{name} cp={cp} {comm} {rec}: {got['bytes']} != {expected}"
    for rank in four:
        for (name, comm, rec, sp), got in rank["layers"].items():
            expected = cp_layer_activation_bytes(CONFIGS[name], S, B, 2, comm, 2, sp, rec, engine)
            assert got["bytes"] == expected, f"{name} tp=2 cp=2 {comm} sp={sp}: {got['bytes']} != {expected}"


def test_cp2_keeps_about_half_of_cp1(two):
    """Not exactly ½: the ring keeps k, v copies and a dense-input copy, the all-to-all its gathered
    q, k, v and its int64 position indices, while cp = 1 keeps the fused QKV output (and RoPE's
    rotated q, k) — see the module docstring: GPT ring ≈ 19/32, a2a ≈ 17/32, LLaMA ≈ 23/48, GQA ½."""
    layers = two[0]["layers"]
    ratios = {}
    for name in CONFIGS:
        cp1 = layers[name, "cp1", "none", False]["bytes"]
        assert cp1 == layer_activation_bytes(CONFIGS[name], S, B)
        for comm in ("p2p", "a2a"):
            ratios[name, comm] = layers[name, comm, "none", False]["bytes"] / cp1
    assert all(0.45 < r < 0.62 for r in ratios.values()), ratios
    assert ratios["gpt", "p2p"] == pytest.approx(19 / 32, abs=0.01)
    assert ratios["llama", "p2p"] == pytest.approx(23 / 48, abs=0.01)
    assert ratios["llama-gqa", "p2p"] == 0.5
    for rec in ("selective", "full"):  # recompute: everything kept is token-wise, exactly halved
        assert layers["gpt", "p2p", rec, False]["bytes"] * 2 == layers["gpt", "cp1", rec, False]["bytes"]


def test_activation_terms_name_what_differs_from_cp1():
    ring = cp_layer_activation_terms(CONFIGS["gpt"], S, B, 2, "p2p")
    a2a = cp_layer_activation_terms(CONFIGS["llama-gqa"], S, B, 2, "a2a", engine="ours")
    lbh = S // 2 * B * H
    assert ring["fused QKV output (q's storage)"] == 3 * lbh
    assert ring["k, v (contiguous fp32 copies)"] == 2 * lbh
    assert a2a["q, k, v gathered (n/cp heads, position order)"] == 3 * lbh
    assert a2a["position-order indices (int64)"] == 2 * S
    with pytest.raises(ValueError, match="divisible|cp dividing"):
        cp_layer_activation_terms(CONFIGS["gpt"], S, B, 8, "a2a")


# ---- 3. load balance -------------------------------------------------------------------------------
def test_ring_work_closed_forms_and_imbalance():
    for cp in (2, 4, 8):
        for s in (8 * cp, 64 * cp):
            for layout in ("zigzag", "contiguous"):
                assert ring_work(s, cp, layout) == ring_work_closed_form(s, cp, layout)
            assert ring_imbalance(ring_work(s, cp)) == 1.0
            assert sum(ring_work(s, cp)) == sum(ring_work(s, cp, "contiguous"))  # same total work
        c = 4096
        long = ring_imbalance(ring_work(c * cp, cp, "contiguous"))
        assert long == pytest.approx((2 * cp - 1) / cp, rel=1e-3)


@pytest.mark.parametrize("world", ["two", "four"])
def test_recorded_timeline_work_equals_the_formula(world, request):
    ranks = request.getfixturevalue(world)
    cp = len(ranks)
    for layout in ("zigzag", "contiguous"):
        events = [e for r in ranks for e in r["timeline"][layout]]
        steps = sorted((e["rank"], e["step"]) for e in events)
        assert steps == [(r, t) for r in range(cp) for t in range(cp)]
        work = [sum(e["scores"] for e in events if e["rank"] == r) for r in range(cp)]
        assert work == ring_work_closed_form(TL_SEQ, cp, layout), layout
        assert all(e["end"] >= e["start"] for e in events)  # recorded times; never asserted as a speed


def test_plot_ring_timeline_draws_one_bar_per_event(two):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for r in two for e in r["timeline"]["contiguous"]]
    ax = plot_ring_timeline(events)
    assert len(ax.patches) == len(events) == 4
    # contiguous, cp = 2, c = 16: rank 0 136 scores, rank 1 136 + 256: max/mean = 392/264 ≈ 1.48
    assert f"{ring_imbalance(ring_work_closed_form(TL_SEQ, 2, 'contiguous')):.2f}" == "1.48" in ax.get_title()
    plt.close(ax.figure)
    _, ax = plt.subplots()
    assert plot_ring_timeline(events, ax=ax, title="t") is ax and ax.get_title() == "t"
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="no ring events"):
        plot_ring_timeline([])


def test_ring_timeline_launches_and_returns_every_ranks_events():
    """The notebook's helper (its own launch: the smallest sizes)."""
    timelines = ring_timeline(seq_len=8, cp=2, heads=1, kv_heads=1, head_dim=4, warmup=0)
    for layout, events in timelines.items():
        assert len(events) == 4 and {e["layout"] for e in events} == {layout}
        work = [sum(e["scores"] for e in events if e["rank"] == r) for r in range(2)]
        assert work == ring_work(8, 2, layout)
