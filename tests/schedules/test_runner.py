"""The teaching executor runs interleaved 1F1B and ZB-H1 on gloo ranks: the loss and every parameter
gradient equal the single-process model's and those of DeepSpeed's 1F1B PipelineEngine on the same
layers; each stage ran its order and held the activations its schedule's formula says."""
import pytest
import torch
from torch import nn

from minimegatron import launch, schedules
from minimegatron.mpu.state import ParallelState, initialize_model_parallel

pytest.importorskip("deepspeed")

L, H, B = 8, 6, 3  # layers of the toy model, width, micro-batch size


class ToyLayer(nn.Sequential):
    """Global layer i: Linear(H, H) + tanh, the same weights on any rank (seeded by i)."""

    def __init__(self, i: int) -> None:
        torch.manual_seed(100 + i)
        super().__init__(nn.Linear(H, H), nn.Tanh())


def _chunk(j, n):
    """Virtual stage j of n: layers [j·L/n, (j+1)·L/n) as one module, with their global indices."""
    layers = list(range(j * L // n, (j + 1) * L // n))
    return nn.Sequential(*(ToyLayer(i) for i in layers)), layers


def _data(m):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)) for _ in range(m)]


def _mse(out, y):
    return ((out - y) ** 2).mean()


def _dense(m):
    """The unsplit model on one process: mean loss and each layer's gradients."""
    model = nn.Sequential(*(ToyLayer(i) for i in range(L)))
    loss = torch.stack([_mse(model(x), y) for x, y in _data(m)]).mean()
    loss.backward()
    return loss.item(), {i: [q.grad for q in layer.parameters()] for i, layer in enumerate(model)}


def _teach_and_deepspeed(name, p, v, m):
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    from minimegatron.deepspeed_glue import init_deepspeed_comm

    state = initialize_model_parallel(1, p)
    s = state.pp_rank
    order = (schedules.interleaved_order(s, p, m, v) if name == "interleaved" else
             schedules.zb_h1_order(s, p, m))
    built = [_chunk(c * p + s, p * v) for c in range(v)]
    res = schedules.run_schedule([chunk for chunk, _ in built], order, _data(m), _mse, state, (B, H))
    teach = {i: [q.grad for q in layer.parameters()] for chunk, layers in built
             for i, layer in zip(layers, chunk)}

    init_deepspeed_comm()
    module = PipelineModule([LayerSpec(ToyLayer, i) for i in range(L)], num_stages=p, loss_fn=_mse,
                            partition_method="uniform")
    before = {n: q.detach().clone() for n, q in module.named_parameters()}
    config = {"train_batch_size": B * m, "train_micro_batch_size_per_gpu": B, "gradient_clipping": 0.0,
              "optimizer": {"type": "SGD", "params": {"lr": 1.0}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=module, config=config, model_parameters=list(module.parameters()))
    ds_loss = float(engine.train_batch(iter(_data(m))))
    children = dict(module.named_children())
    ds = {i: [before[f"{i}.{n}"] - q.detach() for n, q in children[str(i)].named_parameters()]
          for i in range(L) if str(i) in children}  # lr = 1: the step is the gradient
    return res, order, teach, ds_loss, ds


CASES = [("interleaved", 2, 2, 4), ("interleaved", 4, 2, 4), ("zb-h1", 2, 1, 4), ("zb-h1", 4, 1, 4)]


@pytest.mark.parametrize("name, p, v, m", CASES)
def test_equals_the_unsplit_model_and_deepspeeds_1f1b_engine(name, p, v, m):
    from minimegatron.compat import preload_deepspeed

    preload_deepspeed()
    dense_loss, dense_grads = _dense(m)
    out = launch(_teach_and_deepspeed, p, name, p, v, m, timeout=120)
    teach, ds = {}, {}
    for s, (res, order, t, ds_loss, d) in enumerate(out):
        teach.update(t)
        ds.update(d)
        assert (res.loss is None) == (s < p - 1)
        assert [(x.kind, x.micro_batch, x.chunk) for x in res.timeline] == \
            [schedules.work_item(w) for w in order]  # ran its order, every unit once
        assert res.max_in_flight == schedules.peak_in_flight_formula(name, s, p, m, v)
        assert max(n for _, n in res.in_flight) == res.max_in_flight and res.in_flight[-1][1] == 0
    assert out[-1][0].loss == pytest.approx(dense_loss, rel=1e-6)
    assert out[-1][3] == pytest.approx(dense_loss, rel=1e-6)
    assert sorted(teach) == sorted(ds) == list(range(L))
    for i in range(L):
        for got, from_ds, want in zip(teach[i], ds[i], dense_grads[i]):
            torch.testing.assert_close(got, want, msg=lambda e: f"{name} layer {i}: {e}")
            torch.testing.assert_close(from_ds, want, rtol=0, atol=1e-6,
                                       msg=lambda e: f"DeepSpeed layer {i}: {e}")


def test_one_rank_with_two_chunks_needs_no_messages():
    """p = 1: chunk 0's output goes to chunk 1 on the same rank (the ring wraps onto itself)."""
    m = 2
    dense_loss, dense_grads = _dense(m)
    built = [_chunk(c, 2) for c in range(2)]
    res = schedules.run_schedule([chunk for chunk, _ in built], schedules.interleaved_order(0, 1, m, 2),
                                 _data(m), _mse, ParallelState(), (B, H))
    assert res.loss == pytest.approx(dense_loss, rel=1e-6)
    for chunk, layers in built:
        for i, layer in zip(layers, chunk):
            for got, want in zip(layer.parameters(), dense_grads[i]):
                torch.testing.assert_close(got.grad, want)


def test_wrong_number_of_chunks_is_named_before_any_message():
    order = schedules.interleaved_order(0, 1, 2, 2)
    for given in ([ToyLayer(0)], [ToyLayer(0)] * 3):
        with pytest.raises(ValueError, match=rf"runs 2 model chunk\(s\) per stage but {len(given)} module"):
            schedules.run_schedule(given, order, _data(2), _mse, ParallelState(), (B, H))
    with pytest.raises(ValueError, match="lacks"):
        schedules.run_schedule(ToyLayer(0), [("F", 0), ("B", 0)], _data(2), _mse, ParallelState(), (B, H))
