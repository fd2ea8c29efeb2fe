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


def _count_pipeline(name):
    """pp = 2 in DeepSpeed's PipelineEngine, 2 micro-batches: the pipeline group's traffic of a step."""
    import deepspeed

    from minimegatron.measure import CommCounter, group_totals
    from minimegatron.models import model_class
    from minimegatron.mpu import initialize_model_parallel

    state = initialize_model_parallel(1, 2)
    pipe = model_class(name, pipeline=True)(CONFIGS[name], state, init_seed=0)
    ds = {"train_batch_size": 2 * MICRO, "train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 10**9,
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "gradient_clipping": 0.0,
          "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}
    engine, *_ = deepspeed.initialize(model=pipe, config=ds, model_parameters=list(pipe.parameters()))
    ids = torch.randint(0, 50, (2 * MICRO, SEQ), generator=torch.Generator().manual_seed(0))
    micro = [(ids[:MICRO], ids[:MICRO]), (ids[MICRO:], ids[MICRO:])]
    engine.train_batch(iter(micro))  # the first step also sends the tensors' shapes: count the second
    with CommCounter() as comm:
        engine.train_batch(iter(micro))
    return group_totals(comm.records, state.pp_ranks)


@pytest.mark.usefixtures("deepspeed_preloaded")
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_pipeline_traffic_equals_deepspeeds_engine(name):
    counted = launch(_count_pipeline, 2, name, timeout=120)
    layout = Layout(pp=2, zero=0, micro_batch=MICRO)
    for stage, measured in enumerate(counted):
        from minimegatron.plan import cost

        predicted = cost.add_totals(cost.add_totals(cost.pp_comm(CONFIGS[name], layout, SEQ, stage, "fp32"),
                                                    times=2),
                                    cost.pp_step_comm(CONFIGS[name], layout, stage, "fp32"))
        assert measured == predicted, (name, stage, measured, predicted)
    # the planner's per-rank view is the fuller stage's
    assert estimate(CONFIGS[name], layout, 2 * MICRO, SEQ, "cpu", dtype="fp32").comm["pp"] in counted


BIG = llama_config(hidden_size=1024, num_attention_heads=8, num_kv_heads=4, num_layers=8, vocab_size=4096,
                   max_seq_len=2048)


def test_plans_are_ranked_fitting_and_described_in_one_line():
    from minimegatron.plan import plan, table

    plans = plan(BIG, 64, 2048, "gaudi2", 8)
    steps = [p.times["step"] for p in plans]
    assert steps == sorted(steps) and all(p.fits for p in plans)
    best = plans[0]
    assert "\n" not in best.describe() and best.layout.short() in best.describe()
    assert best.tokens_per_s == pytest.approx(64 * 2048 / best.times["step"])
    assert 0 < best.mfu < 0.5  # efficiency 0.5 of peak, minus communication and bubble
    lines = table(plans[:3]).splitlines()
    assert len(lines) == 5 and lines[0].startswith("| # | tp |")


def test_bad_input_is_one_line_naming_the_fix():
    from minimegatron.plan import Device, plan

    with pytest.raises(ValueError, match="seq_len=4096 exceeds the model's max_seq_len=2048"):
        plan(BIG, 64, 4096, "h100", 8)
    with pytest.raises(ValueError, match="unknown device 'a100'"):
        plan(BIG, 64, 2048, "a100", 8)
    with pytest.raises(ValueError, match="dtype='fp16'"):
        plan(BIG, 64, 2048, "h100", 8, dtype="fp16")
    with pytest.raises(ValueError, match="efficiency=1.5 must be in"):
        plan(BIG, 64, 2048, "h100", 8, efficiency=1.5)
    with pytest.raises(TypeError, match="config must be a ModelConfig"):
        plan({"hidden_size": 8}, 64, 2048, "h100", 8)
    with pytest.raises(ValueError, match="no layout of 7 devices divides"):
        plan(BIG, 64, 2048, "h100", 7)
    tiny = Device("tiny", 1e12, 1e8, 1e9, 1e9, 8)
    with pytest.raises(ValueError, match=r"no layout fits on 8 × tiny .* needs [\d.]+ GB per rank; use more"):
        plan(BIG, 64, 2048, tiny, 8)
    with pytest.raises(ValueError, match="layout tp8 pp1 dp1 .*tp=8 does not divide"):
        estimate(BIG, Layout(tp=8), 64, 2048, "h100")
