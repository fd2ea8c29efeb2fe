"""Communication per step of each schedule, counted on gloo ranks with CommCounter, against its formula.

Per training step of ``m`` micro-batches on stage ``s`` of ``p`` with ``v`` chunks per rank: every
virtual stage but the last sends each micro-batch's activation forward, every one but the first sends
its input gradient back. So stage ``s`` sends ``m·(v - [s = p-1])`` activations and ``m·(v - [s = 0])``
gradients (receiving as many from its neighbours): interleaving moves ``v`` times the messages of
1F1B for the same bytes of model, a cost the bubble formula leaves out; splitting the backward (ZB-H1)
moves exactly what 1F1B does.
"""
import pytest
import torch
from torch import nn

from minimegatron import launch, schedules
from minimegatron.measure import CommCounter
from minimegatron.mpu.state import initialize_model_parallel

H, B, M = 4, 2, 4


def sends_formula(s: int, p: int, m: int, v: int) -> int:
    return m * (v - (s == p - 1)) + m * (v - (s == 0))


def _count(name, p, v):
    state = initialize_model_parallel(1, p)
    s = state.pp_rank
    order = {"1f1b": lambda: schedules.one_f_one_b_order(s, p, M),
             "interleaved": lambda: schedules.interleaved_order(s, p, M, v),
             "zb-h1": lambda: schedules.zb_h1_order(s, p, M)}[name]()
    torch.manual_seed(0)
    chunks = [nn.Sequential(nn.Linear(H, H), nn.Tanh()) for _ in range(v)]
    data = [(torch.randn(B, H), torch.randn(B, H)) for _ in range(M)]
    with CommCounter() as comm:
        schedules.run_schedule(chunks, order, data, lambda out, y: ((out - y) ** 2).mean(), state, (B, H))
    sends = comm.select("send")
    return len(sends), sum(r.bytes for r in sends), len(comm.select("recv"))


@pytest.mark.parametrize("name,p,v", [("1f1b", 4, 1), ("interleaved", 4, 2), ("zb-h1", 4, 1)])
def test_messages_per_step_are_the_formula(name, p, v):
    for s, (sends, sent_bytes, recvs) in enumerate(launch(_count, p, name, p, v, timeout=120)):
        assert sends == recvs == sends_formula(s, p, M, v), (name, s, sends, recvs)
        assert sent_bytes == sends * B * H * 4  # every message one (B, H) fp32 activation or gradient
