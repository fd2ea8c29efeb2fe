"""--compile in the trainer: DeepSpeed's engine.compile() trains to the eager run's losses (1 rank).

The model is the benchmark's "quick" LLaMA, the one tests/test_compile.py compiles: inductor's on-disk
cache makes the second compilation of the same graphs cheap.
"""
import pytest

pytest.importorskip("deepspeed")
from minimegatron.launch import launch  # noqa: E402
from minimegatron.training import TrainConfig, train_on_rank, validate  # noqa: E402

QUICK = dict(model="llama", steps=3, num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=128,
             seq_len=16, micro_batch_size=2, global_batch_size=4, lr=3e-3, warmup_steps=1, clip_grad=0.0,
             progress=False)

pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")


def _losses_and_graphs(compile: bool) -> tuple[list[float], int, bool]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a forked rank inherits the parent's compiled code (and counts): trace anew
    counters.clear()
    seen = {}
    history = train_on_rank(TrainConfig(**QUICK, compile=compile),
                            on_start=lambda engine, model: seen.update(
                                compiled=engine.is_compiled and model._compiled_call_impl is not None))
    return history.loss, counters["stats"]["unique_graphs"], seen["compiled"]


def test_compiled_training_gives_the_eager_losses():
    eager, eager_graphs, eager_compiled = launch(_losses_and_graphs, 1, False)[0]
    compiled, graphs, is_compiled = launch(_losses_and_graphs, 1, True)[0]
    assert not eager_compiled and eager_graphs == 0
    assert is_compiled and graphs >= 1  # the engine's module really went through dynamo
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert eager[-1] < eager[0]  # it trains: the steps are not all the same step


def test_compile_with_a_pipeline_is_refused():
    with pytest.raises(ValueError, match=r"^--compile with --pp 2: .*use --compile with --pp 1"):
        validate(TrainConfig(**{**QUICK, "num_layers": 2}, pp=2, compile=True))
