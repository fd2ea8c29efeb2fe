"""The planner's predictions against what ``measure`` counts on real gloo ranks.

One launch of 4 ranks (tp = 2 with sequence parallelism × dp = 2), a tiny GPT (tied, learned
positions, LayerNorm with biases) and a tiny LLaMA with GQA: for ZeRO stages 1, 2, 3 (our
``ZeroAdamW`` / ``Zero3AdamW`` over the data-parallel group) each rank counts its parameters,
gradients and optimizer state (``measure.zero.zero_state_bytes``), the activations each layer keeps
(``SavedActivationCounter``) and every collective of one step (``CommCounter``), split by group (TP,
DP). The planner, told the same layout with ``dtype="fp32"``, must give the same numbers.
"""
import pytest
import torch

from minimegatron import launch
from minimegatron.config import gpt_config, llama_config
from minimegatron.plan import Layout, estimate

SEQ, MICRO, TP, DP = 8, 2, 2, 2
CONFIGS = {
    "gpt": gpt_config(hidden_size=16, num_attention_heads=4, num_layers=2, vocab_size=50, max_seq_len=SEQ),
    "llama": llama_config(hidden_size=16, num_attention_heads=4, num_kv_heads=2, num_layers=2,
                          vocab_size=50, max_seq_len=SEQ, ffn_hidden_size=32),
}
CASES = [("gpt", 1, "none"), ("gpt", 2, "none"), ("gpt", 3, "none"), ("gpt", 1, "full"),
         ("llama", 1, "none"), ("llama", 2, "none"), ("llama", 3, "none"), ("llama", 1, "selective")]


def _count(cases):
    import torch.distributed as dist

    from minimegatron.data_parallel.zero import ZeroAdamW
    from minimegatron.data_parallel.zero3 import Zero3AdamW
    from minimegatron.measure import CommCounter, SavedActivationCounter, group_totals
    from minimegatron.measure.zero import zero_state_bytes
    from minimegatron.models import model_class
    from minimegatron.mpu import initialize_model_parallel

    state = initialize_model_parallel(TP, 1, sequence_parallel=True)
    out = []
    for name, stage, recompute in cases:
        model = model_class(name)(CONFIGS[name], state, recompute=recompute, init_seed=0)
        n_params = sum(p.numel() for p in model.parameters())
        opt = (Zero3AdamW(model, process_group=state.dp_group) if stage == 3 else
               ZeroAdamW(model.parameters(), stage=stage, process_group=state.dp_group))
        g = torch.Generator().manual_seed(state.dp_rank)  # one batch per replica, the same on its TP ranks
        ids = torch.randint(0, 50, (MICRO, SEQ), generator=g)
        # ZeRO-3's gathered weights are not parameters' storages to the activation counter (they are
        # gathered into a buffer of their unit): count activations where the weights stay put
        acts = SavedActivationCounter(model if stage < 3 else None, layers=None if stage < 3 else {})
        with CommCounter() as comm:
            with acts:
                loss = model(ids, labels=ids)
            loss.backward()
            memory = zero_state_bytes(model, opt)  # after backward, before the step
            opt.step()
        out.append({"params": n_params, "memory": memory, "acts": acts.per_layer(),
                    "tp": group_totals(comm.records, state.tp_ranks),
                    "dp": group_totals(comm.records, state.dp_ranks),
                    "other": [r.op for r in comm.records if tuple(r.ranks) not in
                              (tuple(state.tp_ranks), tuple(state.dp_ranks))]})
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def counted():
    return launch(_count, TP * DP, CASES, timeout=120)


def _predict(name, stage, recompute):
    layout = Layout(tp=TP, dp=DP, zero=stage, recompute=recompute, micro_batch=MICRO)
    return estimate(CONFIGS[name], layout, DP * MICRO, SEQ, "cpu", dtype="fp32")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{n}-zero{s}-{r}" for n, s, r in CASES])
def test_memory_and_traffic_equal_the_counted_run(counted, case):
    name, stage, recompute = CASES[case]
    p = _predict(name, stage, recompute)
    for rank, results in enumerate(counted):
        res, where = results[case], None
        where = f"{name} ZeRO-{stage} recompute={recompute} rank {rank}"
        assert res["other"] == [], f"{where}: collectives outside the TP and DP groups: {res['other']}"
        # parameters of this TP rank (padded vocab slice, replicated norms and row biases)
        assert 4 * res["params"] == p.memory["parameters"] or stage == 3, where
        for kind in ("parameters", "gradients", "optimizer"):
            assert res["memory"][kind] == p.memory[kind], (where, kind, res["memory"], p.memory)
        # activations kept by a layer (layer 1: layer 0 also holds RoPE's shared cos/sin)
        if stage < 3:
            assert res["acts"]["layers.1"] == p.activation_per_layer, (where, res["acts"])
        # every TP and DP collective: calls, logical bytes, bytes on the wire
        assert res["tp"] == p.comm["tp"], (where, res["tp"], p.comm["tp"])
        assert res["dp"] == p.comm["dp"], (where, res["dp"], p.comm["dp"])
