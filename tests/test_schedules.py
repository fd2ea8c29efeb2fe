"""minimegatron.schedules: the orders equal DeepSpeed's, the ideal bubble equals (p-1)/(m+p-1), and the
teaching executor reproduces the unsplit model and DeepSpeed's PipelineEngine."""
import pytest
import torch
from torch import nn

from minimegatron import launch, schedules
from minimegatron.mpu.state import initialize_model_parallel

pytest.importorskip("deepspeed")


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_1f1b_order_is_deepspeeds_train_schedule(p):
    for m in (1, 2, 3, 5, 8, 16):
        for s in range(p):
            assert schedules.one_f_one_b_order(s, p, m) == schedules.deepspeed_order(s, p, m)


@pytest.mark.parametrize("order_fn", [schedules.gpipe_order, schedules.one_f_one_b_order])
def test_ideal_bubble_is_the_formula(order_fn):
    for p in (1, 2, 4, 8):
        for m in (1, 2, 4, 8, 32):
            slots = schedules.simulate(order_fn, p, m, forward_time=1.0, backward_time=2.0)
            assert len(slots) == 2 * p * m
            assert max(x.end for x in slots) == pytest.approx((m + p - 1) * 3.0)
            assert schedules.simulated_bubble_fraction(slots) == pytest.approx((p - 1) / (m + p - 1))


def test_in_flight_activations():
    """GPipe holds m micro-batches on every stage; 1F1B at most p - s on stage s."""
    def peak(order):
        live, best = 0, 0
        for kind, _ in order:
            live += 1 if kind == "F" else -1
            best = max(best, live)
        return best

    p, m = 4, 8
    assert [peak(schedules.gpipe_order(s, p, m)) for s in range(p)] == [m] * p
    assert [peak(schedules.one_f_one_b_order(s, p, m)) for s in range(p)] == [4, 3, 2, 1]


def test_bad_arguments_and_deadlocks_are_named():
    with pytest.raises(ValueError, match="0 <= stage < num_stages"):
        schedules.one_f_one_b_order(2, 2, 4)
    with pytest.raises(ValueError, match="num_micro_batches >= 1"):
        schedules.gpipe_order(0, 2, 0)
    backwards_first = lambda s, p, m: [("B", 0), ("F", 0)]  # noqa: E731
    with pytest.raises(ValueError, match="the orders deadlock"):
        schedules.simulate(backwards_first, 2, 1)


def _toy(p):
    torch.manual_seed(0)
    return nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(p))


def _data(m):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)) for _ in range(m)]


def _mse(out, y):
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize("p", [2, 4])
def test_run_schedule_matches_the_unsplit_model(p):
    m = 5
    dense = _toy(p)
    losses = []
    for x, y in _data(m):
        for layer in dense:
            x = layer(x)
        losses.append(_mse(x, y))
    torch.stack(losses).mean().backward()

    def rank(order_fn):
        state = initialize_model_parallel(1, p)
        stage = _toy(p)[state.pp_rank]
        res = schedules.run_schedule(stage, order_fn(state.pp_rank, p, m), _data(m), _mse, state, (3, 6))
        return res, [q.grad for q in stage.parameters()]

    for order_fn, peaks in ((schedules.gpipe_order, [m] * p),
                            (schedules.one_f_one_b_order, list(range(p, 0, -1)))):
        out = launch(rank, p, order_fn, timeout=60)
        assert out[-1][0].loss == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)
        assert [res.max_in_flight for res, _ in out] == peaks
        for s, (res, grads) in enumerate(out):
            assert (res.loss is None) == (s < p - 1)
            for got, q in zip(grads, dense[s].parameters()):
                torch.testing.assert_close(got, q.grad)


@pytest.mark.parametrize("order_fn", [schedules.one_f_one_b_order, schedules.zb_h1_order])
def test_run_schedule_equals_deepspeeds_pipeline_engine_on_gpt(order_fn):
    """Same tied GPT, same micro-batches: the teaching executor's gradients are DeepSpeed's SGD step —
    with ZB-H1's split backward too (token ids: B is empty on stage 0; the tied table is all-reduced)."""
    from minimegatron.config import gpt_config
    from minimegatron.training.loop import preload

    preload()
    cfg = gpt_config(vocab_size=64, hidden_size=16, num_layers=2, num_attention_heads=2, max_seq_len=8)
    m, b, s, lr = 3, 2, 8, 1.0

    def rank():
        import deepspeed

        from minimegatron.pipe import GPTModelPipe

        state = initialize_model_parallel(1, 2)
        g = torch.Generator().manual_seed(3)
        data = [(torch.randint(0, 64, (b, s), generator=g), torch.randint(0, 64, (b, s), generator=g))
                for _ in range(m)]
        teach = GPTModelPipe(cfg, state, init_seed=5)
        res = schedules.run_schedule(teach, order_fn(state.pp_rank, 2, m), data,
                                     teach.loss_fn, state, (s, b, cfg.hidden_size))
        pipe = GPTModelPipe(cfg, state, init_seed=5)
        ds = {"train_batch_size": b * m, "train_micro_batch_size_per_gpu": b, "gradient_clipping": 0.0,
              "optimizer": {"type": "SGD", "params": {"lr": lr}}, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=pipe, config=ds, model_parameters=list(pipe.parameters()))
        loss = float(engine.train_batch(iter(data)))
        for (name, after), before in zip(pipe.named_parameters(), teach.parameters()):
            torch.testing.assert_close(after, before.detach() - lr * before.grad, rtol=0, atol=1e-6,
                                       msg=lambda e: f"{name}: {e}")
        return res.loss, loss

    out = launch(rank, 2, timeout=120)
    assert out[1][0] == pytest.approx(out[1][1], rel=1e-6)
