"""GPTModelPipe / LLaMAModelPipe on real gloo ranks against the unsplit GPTModel / LLaMAModel.

Same weights (drawn in model order, or loaded from the plain model's state_dict), same data, SGD in
DeepSpeed's PipelineEngine: the losses of several steps equal the single-process model's, for
pp = 2 and tp = 2 × pp = 2, with and without sequence parallelism, GPT (tied head) and LLaMA.
"""
import pytest
import torch

from minimegatron.config import gpt_config, llama_config
from minimegatron.gpt import GPTModel
from minimegatron.launch import RankError, launch
from minimegatron.llama import LLaMAModel
from minimegatron.mpu.state import initialize_model_parallel

pytest.importorskip("deepspeed")
from minimegatron.pipe import (GPTModelPipe, LLaMAModelPipe, load_model_state_dict,  # noqa: E402
                               model_state_dict)

STEPS, MB, M, SEQ, LR, SEED = 3, 2, 2, 16, 0.5, 7   # 3 steps of 2 micro-batches of 2 sequences
KINDS = {"gpt": (gpt_config, GPTModel, GPTModelPipe), "llama": (llama_config, LLaMAModel, LLaMAModelPipe)}


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Import DeepSpeed's heavy modules once here, so that every forked rank starts with them."""
    from minimegatron.training.loop import preload
    preload()


def tiny(kind, **kw):
    sizes = dict(vocab_size=100, hidden_size=32, num_layers=4, num_attention_heads=4, max_seq_len=SEQ)
    return KINDS[kind][0](**{**sizes, **kw})


def batch(step, dp=1):
    g = torch.Generator().manual_seed(100 + step)
    n = MB * M * dp
    return torch.randint(0, 100, (n, SEQ), generator=g), torch.randint(0, 100, (n, SEQ), generator=g)


def reference_losses(kind, dp=1, **kw):
    """The unsplit model, one process, plain SGD on the whole global batch."""
    torch.manual_seed(SEED)
    model = KINDS[kind][1](tiny(kind, **kw))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        loss = model(*batch(step, dp))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def pipe_losses(kind, tp, pp, sp=False, load=False, **kw):
    """On each rank: the pipeline model in DeepSpeed's PipelineEngine, SGD, no clipping."""
    import deepspeed

    state = initialize_model_parallel(tp, pp, sequence_parallel=sp)
    config = tiny(kind, **kw)
    if load:  # weights from a plain (TP-sharded) model's state_dict
        torch.manual_seed(SEED)
        plain = KINDS[kind][1](config, state)
        pipe = KINDS[kind][2](config, state)
        load_model_state_dict(pipe, plain.state_dict())
    else:  # weights drawn in model order from the seed
        pipe = KINDS[kind][2](config, state, init_seed=SEED)
    ds = {"train_batch_size": MB * M * state.dp, "train_micro_batch_size_per_gpu": MB,
          "optimizer": {"type": "SGD", "params": {"lr": LR}}, "gradient_clipping": 0.0,
          "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=pipe, config=ds, model_parameters=list(pipe.parameters()))
    losses = []
    for step in range(STEPS):
        tokens, labels = batch(step, state.dp)
        mine = slice(state.dp_rank * MB * M, (state.dp_rank + 1) * MB * M)
        tokens, labels = tokens[mine], labels[mine]
        micro = [(tokens[i:i + MB], labels[i:i + MB]) for i in range(0, MB * M, MB)]
        losses.append(float(engine.train_batch(iter(micro))))
    tied = None
    if config.tie_embeddings and (state.is_first_stage or state.is_last_stage):
        tied = pipe.tied_modules["embed"].word_embeddings.weight.detach().clone()
    return losses, tied


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_pipeline_matches_unsplit_model(kind):
    ref = reference_losses(kind)
    out = launch(pipe_losses, 2, kind, 1, 2, timeout=120)
    for losses, _ in out:
        torch.testing.assert_close(losses, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind,sp", [("gpt", False), ("llama", True)])
def test_tensor_and_pipeline_parallel_match_unsplit_model(kind, sp):
    ref = reference_losses(kind)
    out = launch(pipe_losses, 4, kind, 2, 2, sp, timeout=120)
    for losses, _ in out:
        torch.testing.assert_close(losses, ref, rtol=0, atol=2e-5)
    if kind == "gpt":  # rank 0 (stage 0) and rank 2 (stage 1, same TP rank) kept the tie
        torch.testing.assert_close(out[0][1], out[2][1], rtol=0, atol=0)
        assert not torch.equal(out[0][1], out[1][1])  # different vocab shards on the TP ranks


def test_pipeline_with_data_parallel_and_loaded_weights():
    ref = reference_losses("gpt", dp=2, num_kv_heads=2)
    out = launch(pipe_losses, 4, "gpt", 1, 2, False, True, num_kv_heads=2, timeout=120)
    for losses, _ in out:
        torch.testing.assert_close(losses, ref, rtol=0, atol=2e-5)


def test_weights_equal_the_unsplit_model_and_round_trip():
    def run():
        state = initialize_model_parallel(1, 2)
        torch.manual_seed(SEED)
        plain = LLaMAModel(tiny("llama"), state).state_dict()
        pipe = LLaMAModelPipe(tiny("llama"), state, init_seed=SEED)
        drawn = model_state_dict(pipe)
        other = LLaMAModelPipe(tiny("llama"), state)  # unseeded: different weights
        load_model_state_dict(other, plain)
        return plain, drawn, model_state_dict(other), pipe.layer_range, pipe.describe()

    out = launch(run, 2, timeout=60)
    plain = out[0][0]
    names = sorted(set(out[0][1]) | set(out[1][1]))
    assert names == sorted(plain)  # the two stages together hold every weight, once
    for rank in range(2):
        for key, value in out[rank][1].items():
            torch.testing.assert_close(value, plain[key], rtol=0, atol=0)
            torch.testing.assert_close(out[rank][2][key], plain[key], rtol=0, atol=0)
    assert out[0][3] == (0, 3) and out[1][3] == (3, 7)  # embedding + 2 layers | 2 layers, norm, head
    assert "stage 1: layers [3, 7) TransformerLayerPipe, TransformerLayerPipe, RMSNorm, LMHeadPipe" \
        in out[0][4]


def test_bad_layouts_raise_clear_errors():
    def too_few_layers():
        GPTModelPipe(tiny("gpt", num_layers=1), initialize_model_parallel(1, 2))

    with pytest.raises(RankError, match="num_layers=1 < pipeline stages pp=2"):
        launch(too_few_layers, 2, timeout=60)

    def wrong_shapes():
        state = initialize_model_parallel(2, 1)
        pipe = GPTModelPipe(tiny("gpt"), state)
        load_model_state_dict(pipe, GPTModel(tiny("gpt")).state_dict())  # a TP=1 state_dict

    with pytest.raises(RankError, match="saved with tensor-parallel size 2"):
        launch(wrong_shapes, 2, timeout=60)
