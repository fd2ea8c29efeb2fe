"""CommCounter on real gloo ranks: a transformer layer's bytes equal Megatron's count exactly."""
import pytest
import torch
import torch.distributed as dist

from minimegatron import launch
from minimegatron.config import gpt_config, llama_config
from minimegatron.measure.comm import CommCounter, OpTotal, ring_wire_bytes, tp_layer_comm

S, B = 8, 2


def _layer_comm(tp):
    """Forward + backward of one ParallelTransformerLayer per (model, SP) case, counted by phase."""
    from minimegatron.layers import ParallelTransformerLayer, RotaryEmbedding
    from minimegatron.mpu import initialize_model_parallel

    out = {}
    for name, cfg in (("gpt", gpt_config(hidden_size=32, num_attention_heads=4, vocab_size=64)),
                      ("llama", llama_config(hidden_size=32, num_attention_heads=4, vocab_size=64)),
                      ("llama-gqa", llama_config(hidden_size=32, num_attention_heads=8, num_kv_heads=tp,
                                                 vocab_size=64))):
        for sp in (False, True):
            state = initialize_model_parallel(tp, 1, sequence_parallel=sp)
            torch.manual_seed(0)
            layer = ParallelTransformerLayer(cfg, state)
            x = torch.randn(S // tp if sp else S, B, cfg.hidden_size, requires_grad=True)
            rotary = None
            if cfg.position_embedding == "rope":
                rotary = RotaryEmbedding(cfg.head_dim)(torch.arange(S).expand(B, S))
            with CommCounter() as comm:
                with comm.phase("forward"):
                    y = layer(x, rotary)
                with comm.phase("backward"):
                    y.sum().backward()
            out[name, sp] = comm.totals(by_phase=True)
    return out


LAYERS = {"gpt": dict(norm="layernorm", bias=True), "llama": dict(norm="rmsnorm", bias=False),
          "llama-gqa": dict(norm="rmsnorm", bias=False)}


@pytest.mark.parametrize("tp", [2, 4])
def test_transformer_layer_bytes_equal_the_formula(tp):
    measured = launch(_layer_comm, tp, tp, timeout=120)
    for rank_result in measured:
        for (name, sp), totals in rank_result.items():
            expected = tp_layer_comm(S, B, 32, tp, sequence_parallel=sp, by_phase=True,
                                     separate_kv=name == "llama-gqa", **LAYERS[name])
            assert totals == expected, f"{name} sp={sp} tp={tp}: {totals} != {expected}"
    # the point of sequence parallelism: its RS/AG pairs move the same bytes as the all-reduces; on
    # top, each column layer (QKV, fc1) re-gathers its kept input shard in backward, as Megatron does,
    # and each replicated h-vector on the s/tp slice (GPT: 2 LayerNorms × (γ, β), 2 row biases) has
    # its gradient all-reduced by its f
    plain, sp = (sum(tp_layer_comm(S, B, 32, tp, s).values(), OpTotal()) for s in (False, True))
    one = (tp - 1) * S * B * 32 * 4 // tp  # wire bytes/rank of one all-gather of s·b·h fp32
    assert plain.wire_bytes == 4 * 2 * one
    backward = tp_layer_comm(S, B, 32, tp, True, by_phase=True)
    assert backward["backward", "all_gather"].count == 2 + 2  # ḡ's backward + the two re-gathers
    small = ring_wire_bytes("all_reduce", 32, 4, tp)  # one h = 32 element fp32 all-reduce
    assert sp.wire_bytes == plain.wire_bytes + 2 * one + 6 * small
    assert backward["backward", "all_reduce"] == OpTotal(6, 6 * 32 * 4, 6 * small)
    llama = tp_layer_comm(S, B, 32, tp, True, by_phase=True, norm="rmsnorm", bias=False)
    assert llama["backward", "all_reduce"].count == 2  # the two RMSNorms' γ


def _all_kinds():
    rank = dist.get_rank()
    pair = dist.new_group([0, 1])
    x = torch.ones(6)
    with CommCounter(time_ops=True) as comm:
        dist.all_reduce(x)
        dist.broadcast(x, src=0, group=pair)
        out = torch.empty(12)
        dist.all_gather_into_tensor(out, x)
        dist.reduce_scatter_tensor(torch.empty(3), x)
        if rank == 0:
            dist.send(torch.ones(5, dtype=torch.float64), 1)
        else:
            dist.recv(torch.empty(5, dtype=torch.float64), 0)
        objs = [None, None]
        dist.all_gather_object(objs, rank)  # a pickled object travels as tensors: counted too
        dist.barrier()
    return [(r.op, r.group_size, r.ranks, r.numel, r.dtype, r.bytes, r.wire_bytes)
            for r in comm.records], comm.seconds(), comm.table()


def test_counts_every_kind_of_collective_however_it_is_called():
    (rank0, seconds, table), (rank1, _, _) = launch(_all_kinds, 2, timeout=60)
    f32, f64 = torch.float32, torch.float64
    assert rank0[:5] == [("all_reduce", 2, (0, 1), 6, f32, 24, 24),
                         ("broadcast", 2, (0, 1), 6, f32, 24, 24),
                         ("all_gather", 2, (0, 1), 12, f32, 48, 24),
                         ("reduce_scatter", 2, (0, 1), 6, f32, 24, 12),
                         ("send", 2, (1,), 5, f64, 40, 40)]
    assert rank1[4] == ("recv", 2, (0,), 5, f64, 40, 40)
    assert [r[0] for r in rank0[5:]] == ["all_gather", "all_gather", "barrier"]
    assert seconds > 0 and "| all_reduce | 2 | float32 | 1 | 24 | 24 |" in table


def test_ring_bytes():
    # all-reduce of 8 elements on 4 ranks: 2·(4-1) chunks of 2 elements
    assert ring_wire_bytes("all_reduce", 8, 4, 4) == 2 * 3 * 2 * 4
    assert ring_wire_bytes("all_gather", 8, 2, 4) == 3 * 2 * 2
    assert ring_wire_bytes("reduce_scatter", 9, 4, 2) == 1 * 5 * 4  # ring pads 9 to 2 chunks of 5
    assert ring_wire_bytes("all_reduce", 8, 4, 1) == 0
    assert tp_layer_comm(8, 2, 32, 1) == {}
    assert tp_layer_comm(8, 2, 32, 2) == {"all_reduce": OpTotal(4, 4 * 8 * 2 * 32 * 4, 4 * 8 * 2 * 32 * 4)}


def test_outside_a_process_group_nothing_is_recorded():
    with CommCounter() as comm:
        torch.ones(3).sum()
    assert comm.records == [] and comm.totals() == {}
