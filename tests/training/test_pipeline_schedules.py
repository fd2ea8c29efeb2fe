"""Pipeline schedules on DeepSpeed's real engine: ZB-H1 (B and W apart) and uneven stage splits.

* The schedule itself, without ranks: every stage runs F, B and W of every micro-batch once, in an
  order DeepSpeed's buffers allow; both ends of every link meet each message in the same step and
  order (so blocking sends and receives cannot deadlock); the ideal step lasts ``3m + p - 1`` units.
* ZB-H1 against DeepSpeed's own 1F1B (``TrainSchedule``) on the same model: the same losses, the
  same parameter gradients at the optimizer step, the same weights after it — with the tie (GPT, 4
  stages: the middle ones run W after the next gradient has arrived), with TP and SP (W re-gathers),
  with DP and ZeRO-1 and clipping.
* The trainer: ``--pipeline-schedule zb-h1`` and ``--pipeline-layers`` give the one-rank losses.
* The bubble measured on FixedTimeLayer stages next to ``zb_h1_bubble_fraction`` and 1F1B's.
* Bad flags: one line, before any rank starts.
"""
import pytest
import torch

pytest.importorskip("deepspeed")
from minimegatron.config import gpt_config  # noqa: E402
from minimegatron.launch import launch  # noqa: E402
from minimegatron.pipe_balance import balanced_stage_layers, stage_flops  # noqa: E402
from minimegatron.pipe_schedules import (PIPELINE_SCHEDULES, BackwardWeightPass,  # noqa: E402
                                         ZeroBubbleH1Schedule, zb_h1_timeline)
from minimegatron.train import main  # noqa: E402
from minimegatron.training import TrainConfig, train, validate  # noqa: E402
from minimegatron.training import config as train_config  # noqa: E402

TINY = dict(steps=3, num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=128, seq_len=16,
            micro_batch_size=2, global_batch_size=8, lr=3e-3, warmup_steps=2, clip_grad=0.0,
            progress=False)
ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")  # imported once, before any fork


# ---- the schedule, without ranks ------------------------------------------------------------------

def _link_messages(cmds_per_step, kinds):
    return [[(type(c).__name__, c.buffer_id) for c in step if type(c).__name__ in kinds]
            for step in cmds_per_step]


@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (3, 5), (4, 4), (4, 9)])
def test_the_schedule_pairs_every_message_and_keeps_the_buffers_apart(p, m):
    from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, RecvGrad, SendActivation, SendGrad
    scheds = [ZeroBubbleH1Schedule(micro_batches=m, stages=p, stage_id=s) for s in range(p)]
    steps = [list(s) for s in scheds]
    assert len({len(s) for s in steps}) == 1  # one step count: the steps line up across stages
    for s in range(p - 1):  # link (s, s+1): the same messages, in the same step, in the same order
        upper = [[("act" if n == "SendActivation" else "grad") for n, _ in step]
                 for step in _link_messages(steps[s], {"SendActivation", "RecvGrad"})]
        lower = [[("act" if n == "RecvActivation" else "grad") for n, _ in step]
                 for step in _link_messages(steps[s + 1], {"RecvActivation", "SendGrad"})]
        assert upper == lower
    for s, sched in enumerate(scheds):  # what sits in each buffer slot: the micro-batch expected there
        slot, forwards, backwards, weights, last_forward = {}, 0, 0, 0, None
        for cmd in (c for step in steps[s] for c in step):
            if isinstance(cmd, ForwardPass):
                assert cmd.buffer_id not in slot, "a slot reused while its micro-batch is in flight"
                slot[cmd.buffer_id], last_forward, forwards = forwards, forwards, forwards + 1
            elif isinstance(cmd, BackwardPass):
                assert slot[cmd.buffer_id] == backwards
                assert s < p - 1 or last_forward == backwards  # last stage: B right after its F
                backwards += 1
                if s == 0:
                    del slot[cmd.buffer_id]
            elif isinstance(cmd, SendGrad):
                del slot[cmd.buffer_id]
            elif isinstance(cmd, (SendActivation, RecvGrad)):
                assert cmd.buffer_id in slot
            elif isinstance(cmd, BackwardWeightPass):
                assert cmd.micro_batch == weights < backwards  # W in B's order, after it
                weights += 1
        assert forwards == backwards == weights == m
        assert sched.num_pipe_buffers() <= p  # 1F1B's count on stage 0: p


def test_the_steps_follow_zb_h1_order_and_last_3m_plus_p_minus_1():
    from minimegatron.schedules import zb_h1_order

    for p, m in [(2, 2), (3, 6), (4, 8)]:
        timeline = zb_h1_timeline(p, m)
        for s in range(p):  # each stage's ops, by start time: the order of schedules.zb_h1_order
            assert [timeline[s][t] for t in sorted(timeline[s])] == zb_h1_order(s, p, m)
        assert max(max(tl) for tl in timeline) + 1 == 3 * m + p - 1  # m >= p: the ideal step length
    assert PIPELINE_SCHEDULES == train_config.PIPELINE_SCHEDULES


def test_balanced_split_moves_layers_off_the_head_stage():
    gpt2 = gpt_config(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12,
                      max_seq_len=1024)
    costs = stage_flops(gpt2, (3, 3, 3, 3), 1024)
    assert costs[-1] / costs[0] == pytest.approx(2.49, abs=0.01)  # the head: ~4.5 layers of FLOPs
    assert balanced_stage_layers(gpt2, 4, 1024) == (4, 4, 3, 1)
    tiny = gpt_config(vocab_size=128, hidden_size=32, num_layers=4, num_attention_heads=4, max_seq_len=16)
    assert balanced_stage_layers(tiny, 2, 16) == (2, 2)


def test_deferred_weight_gradients_add_up_to_one_backward():
    from minimegatron.gpt import GPTModel
    from minimegatron.mpu.weight_grad import WeightGradStore
    from minimegatron.pipe_engine import attach_weight_grad_store

    torch.manual_seed(0)
    model = GPTModel(gpt_config(vocab_size=64, hidden_size=16, num_layers=2, num_attention_heads=2,
                                max_seq_len=8))
    ids, labels = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    model(ids, labels).backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    store = WeightGradStore()
    assert attach_weight_grad_store(model, store) == 9  # 4 linears per layer and the (tied) head
    for _ in range(2):  # two micro-batches: B, B, then W, W
        loss = model(ids, labels) / 2
        with store.defer():
            loss.backward()
    assert model.layers[0].mlp.dense_h_to_4h.weight.grad is None and len(store) == 2  # W still queued
    store.run_oldest()
    store.run_oldest()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(RuntimeError, match="no deferred weight gradients queued"):
        store.run_oldest()


def test_use_pipeline_schedule_refuses_what_it_cannot_run():
    from minimegatron.deepspeed_glue import adopt_pipeline_engine
    from minimegatron.pipe_engine import ZeroBubblePipelineEngine, use_pipeline_schedule

    with pytest.raises(TypeError, match="not a DeepSpeed PipelineEngine"):
        use_pipeline_schedule(torch.nn.Linear(2, 2), "zb-h1")
    with pytest.raises(ValueError, match="choose one of"):
        use_pipeline_schedule(torch.nn.Linear(2, 2), "gpipe")
    with pytest.raises(TypeError, match="must be deepspeed.initialize's PipelineEngine"):
        adopt_pipeline_engine(torch.nn.Linear(2, 2), ZeroBubblePipelineEngine)


# ---- ZB-H1 against DeepSpeed's 1F1B on the same model ---------------------------------------------

def _both_schedules(kind, tp, pp, sp=False, zero=0, clip=0.0, kv_heads=None, bf16=False, steps=2):
    """On each rank: the same model trained by TrainSchedule, then ZB-H1; losses, gradients at the
    optimizer step, weights after the last step."""
    import copy

    import deepspeed
    from deepspeed.runtime.pipe.schedule import OptimizerStep

    from minimegatron.deepspeed_glue import init_deepspeed_comm
    from minimegatron.config import llama_config
    from minimegatron.mpu.state import initialize_model_parallel
    from minimegatron.pipe import GPTModelPipe, LLaMAModelPipe, model_state_dict
    from minimegatron.pipe_engine import use_pipeline_schedule

    init_deepspeed_comm()
    state = initialize_model_parallel(tp, pp, sequence_parallel=sp)
    preset, cls = (gpt_config, GPTModelPipe) if kind == "gpt" else (llama_config, LLaMAModelPipe)
    config = preset(vocab_size=100, hidden_size=32, num_layers=4, num_attention_heads=4, max_seq_len=16,
                    num_kv_heads=kv_heads)
    mb, m = 2, 4
    ds = {"train_batch_size": mb * m * state.dp, "train_micro_batch_size_per_gpu": mb,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
          "gradient_clipping": clip, "zero_optimization": {"stage": zero}, "bf16": {"enabled": bf16},
          "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}, "steps_per_print": 10**9}
    out = {}
    for schedule in PIPELINE_SCHEDULES:
        pipe = cls(config, state, init_seed=3)
        engine, *_ = deepspeed.initialize(model=pipe, config=copy.deepcopy(ds),  # (0.14 pops keys of it)
                                          model_parameters=list(pipe.parameters()))
        use_pipeline_schedule(engine, schedule)
        grads, step = [], type(engine)._INSTRUCTION_MAP[OptimizerStep]

        def recording_step(self, *args, **kwargs):
            grads.append({k: None if p.grad is None else p.grad.detach().clone()
                          for k, p in model_state_dict(pipe, keep_vars=True, tied_copies=True).items()})
            return step(self, *args, **kwargs)
        engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, OptimizerStep: recording_step}
        losses = []
        for i in range(steps):
            g = torch.Generator().manual_seed(100 + i)
            tokens, labels = (torch.randint(0, 100, (mb * m * state.dp, 16), generator=g) for _ in range(2))
            mine = slice(state.dp_rank * mb * m, (state.dp_rank + 1) * mb * m)
            micro = [(tokens[mine][j:j + mb], labels[mine][j:j + mb]) for j in range(0, mb * m, mb)]
            losses.append(float(engine.train_batch(iter(micro))))
        weights = {k: v.detach().clone() for k, v in model_state_dict(pipe).items()}
        out[schedule] = losses, grads, weights, type(engine).__name__
    return out


@pytest.mark.parametrize("kind, tp, pp, dp, kw", [
    ("gpt", 1, 4, 1, {}),                                  # tied; stages 1, 2 run W after a RecvGrad
    ("llama", 2, 2, 1, dict(sp=True, kv_heads=1)),         # W re-gathers the SP shard over TP; the
                                                           # replicated k/v weight all-reduces in W
    ("gpt", 1, 2, 2, dict(zero=1, clip=0.05)),             # ZeRO-1 over dp, clipping active
    ("llama", 1, 2, 1, dict(bf16=True, clip=0.05)),        # bf16: BF16_Optimizer's fp32 gradients
], ids=["gpt-pp4", "llama-tp2-pp2-sp-mqa", "gpt-pp2-dp2-zero1-clip", "llama-pp2-bf16"])
def test_zb_h1_gives_deepspeeds_1f1b_losses_and_gradients(kind, tp, pp, dp, kw):
    for rank in launch(_both_schedules, tp * pp * dp, kind, tp, pp, **kw, timeout=180):
        (l1, g1, w1, e1), (l2, g2, w2, e2) = rank["1f1b"], rank["zb-h1"]
        assert (e1, e2) == ("PipelineEngine", "ZeroBubblePipelineEngine")
        torch.testing.assert_close(l2, l1, rtol=0, atol=1e-6)
        for before, after in zip(g1, g2) if not kw.get("bf16") else ():  # (bf16: .grad is scratch)
            assert before.keys() == after.keys()
            for name, grad in before.items():
                assert (grad is None) == (after[name] is None), name
                if grad is not None:  # (ZeRO-1 has moved them into its partitions by then)
                    torch.testing.assert_close(after[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        for name, weight in w1.items():
            torch.testing.assert_close(w2[name], weight, rtol=1e-5, atol=1e-7, msg=name)


# ---- the trainer ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(model):
        if model not in cache:
            cache[model] = train(TrainConfig(**{**TINY, "model": model})).loss
        return cache[model]
    return get


@pytest.mark.parametrize("model, layout", [
    ("gpt", dict(pp=2, pipeline_schedule="zb-h1", eval_interval=2, eval_iters=1)),  # eval: 1F1B's forward
    ("llama", dict(pp=2, pipeline_schedule="zb-h1", recompute="full")),
    ("gpt", dict(tp=2, pp=2, pipeline_schedule="zb-h1")),
    ("llama", dict(pp=2, dp=2, zero_stage=1, pipeline_schedule="zb-h1")),
    ("gpt", dict(pp=2, pipeline_layers=(3, 1))),
    ("llama", dict(pp=2, pipeline_layers=(1, 3), pipeline_schedule="zb-h1")),
], ids=["gpt-pp2-zb", "llama-pp2-zb-full", "gpt-tp2-pp2-zb", "llama-pp2-dp2-zero1-zb", "gpt-pp2-3,1",
        "llama-pp2-1,3-zb"])
def test_every_schedule_and_split_gives_the_one_rank_losses(reference, model, layout):
    history = train(TrainConfig(**{**TINY, "model": model, **layout}))
    torch.testing.assert_close(history.loss, reference(model), rtol=0, atol=ATOL)
    assert len(history.eval_loss) == (2 if layout.get("eval_interval") else 0)


def _stages_hold(cfg):
    from minimegatron.mpu.state import initialize_model_parallel
    from minimegatron.training.engine import build_model

    state = initialize_model_parallel(cfg.tp, cfg.pp)
    model = build_model(cfg, validate(cfg, preflight=False), state)
    return model.layer_range, model.describe()


def test_pipeline_layers_set_what_each_stage_holds():
    cfg = TrainConfig(**{**TINY, "model": "gpt", "pp": 2, "pipeline_layers": (3, 1)})
    (first, _), (last, describe) = launch(_stages_hold, 2, cfg, timeout=120)
    assert first == (0, 4) and last == (4, 7)  # embedding + 3 layers | 1 layer + final norm + head
    assert describe.splitlines()[1] == "stage 1: layers [4, 7) TransformerLayerPipe, LayerNorm, EmbeddingPipe"


# ---- the bubble, measured ------------------------------------------------------------------------

# Seconds: T_F = T_B = T_W per micro-batch per stage. ZB-H1 crosses 3m + p - 1 instruction steps, each
# with a blocking send/recv (gloo's wait for the receiver, a process wake-up: a few ms on a loaded
# 2-core machine), which the formula ignores: the measured bubble exceeds it by about that latency / T
# (1-3 points at 0.15 s; 2-6 at 0.08 s, and more under load), so T must be long; and each is measured
# twice, the better step counted: a load spike on a shared machine only ever adds idle time.
T = 0.15


def _record_bubbles(stages, micro_batches):
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from minimegatron.deepspeed_glue import init_deepspeed_comm
    from minimegatron.measure.timeline import FixedTimeLayer, PipelineTimeline
    from minimegatron.pipe_engine import use_pipeline_schedule

    init_deepspeed_comm()
    torch.manual_seed(0)
    module = PipelineModule([FixedTimeLayer(T, T, weight_s=T) for _ in range(stages)], num_stages=stages,
                            loss_fn=lambda out, y: ((out - y) ** 2).mean(), partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "steps_per_print": 10**9, "optimizer": {"type": "SGD", "params": {"lr": 0.01}}}
    engine, *_ = deepspeed.initialize(model=module, config=config, model_parameters=list(module.parameters()))
    data = iter(lambda: (torch.randn(1, 4), torch.randn(1, 4)), None)
    engine.train_batch(data)  # warm-up: the first step also exchanges tensor shapes
    out = {}
    for schedule in PIPELINE_SCHEDULES:  # 1F1B first: B + W in one backward of 2T
        use_pipeline_schedule(engine, schedule)
        for m in micro_batches:
            engine.set_train_batch_size(m)
            with PipelineTimeline(engine) as timeline:
                engine.train_batch(data)
                engine.train_batch(data)
            out[schedule, m] = timeline.events
    return out


def test_measured_bubbles_match_zb_h1_and_1f1b_formulas():
    from minimegatron.measure.timeline import (measured_bubble_fraction, pipeline_bubble_fraction,
                                               zb_h1_bubble_fraction)
    p, ms = 4, (4,)  # ZB-H1: (p-1)/(3m+p-1) = 20%; 1F1B: (p-1)/(m+p-1) = 43%
    per_rank = launch(_record_bubbles, p, p, ms, timeout=180)
    for m in ms:
        one_f, zb = ([e for rank in per_rank for e in rank[s, m]] for s in PIPELINE_SCHEDULES)
        assert {e.kind for e in zb} >= {"forward", "backward", "weight"}
        assert sum(e.kind == "weight" for e in zb) == 2 * p * m and not any(e.kind == "weight" for e in one_f)
        measured = {}
        for name, events, theory in (("1f1b", one_f, pipeline_bubble_fraction(p, m)),
                                     ("zb-h1", zb, zb_h1_bubble_fraction(p, m, T, T, T))):
            measured[name] = min(measured_bubble_fraction(events, step=k) for k in (0, 1))
            assert abs(measured[name] - theory) < 0.05, (
                f"{name} p={p} m={m}: measured {measured[name]:.3f}, theory {theory:.3f}")
        assert measured["zb-h1"] < measured["1f1b"] - 0.1


# ---- bad flags -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--pipeline-schedule", "zb-h1"], r"--pipeline-schedule zb-h1 with pp=1: .* give --pp 2 or more, "
                                       r"or leave the flag out"),
    (["--pp", "2", "--pipeline-layers", "3,2"], r"--pipeline-layers 3,2: 2 stage\(s\) holding 5 layers, but "
                                                r"the pp=2 stages hold num_layers=4; give 2 counts summing "
                                                r"to 4, e\.g\. --pipeline-layers 2,2"),
    (["--pp", "2", "--pipeline-layers", "4"], r"--pipeline-layers 4: 1 stage\(s\) holding 4 layers, but the pp=2"),
    (["--pp", "2", "--pipeline-layers", "4,0"], r"--pipeline-layers 4,0: every pipeline stage needs at least "
                                                r"one transformer layer; .* e\.g\. --pipeline-layers 2,2"),
    (["--pp", "2", "--pipeline-layers", "3,x"], r"argument --pipeline-layers: invalid list of layers per "
                                                r"stage: '3,x' \(comma-separated ints"),
    (["--pp", "2", "--pipeline-schedule", "gpipe"], r"argument --pipeline-schedule: invalid choice: 'gpipe'"),
], ids=["zb-pp1", "layers-sum", "layers-count", "layers-zero", "layers-not-int", "unknown-schedule"])
def test_bad_pipeline_flags_are_one_line(capsys, args, message):
    import re

    with pytest.raises(SystemExit) as exit_info:
        main(["--num-layers", "4", "--hidden-size", "32", "--vocab-size", "64", "--seq-len", "16",
              "--no-progress", *args])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("python -m minimegatron.train: error: "), lines
    assert re.search(message, lines[0]), lines[0]
