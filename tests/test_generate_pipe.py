"""Generation on the trainer's pipeline stages (LanguageModelPipe) equals the TP=1 PP=1 model.

Weights from a tiny Hugging Face model (whose greedy/beam generation ``test_generate*.py`` compare
with ``transformers``), loaded into the pipeline stages with ``load_model_state_dict``; on real gloo
ranks at pp 2 and tp 2 · pp 2, GPT (tied embedding on the first and the last stage) and LLaMA (GQA);
and the communication of one call (CommCounter) against the count in generate_pipe.py's docstring.
"""
from __future__ import annotations

import pytest
import torch

from minimegatron.checkpoint import from_hf
from minimegatron.config import gpt_config
from minimegatron.generate import generate
from minimegatron.gpt import GPTModel
from minimegatron.launch import launch
from minimegatron.measure.comm import CommCounter
from minimegatron.mpu.state import ParallelState, initialize_model_parallel
from tests.checkpoint.hf_models import hf_gpt2, hf_llama, token_ids
from tests.test_generate_padded import padded_batch

pytest.importorskip("deepspeed")

T = 5  # tokens of the counted call
MODELS = {"gpt2": lambda: hf_gpt2(vocab=50, layers=4),
          "llama-gqa": lambda: hf_llama(kv_heads=2, vocab=50, layers=4)}


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Import DeepSpeed's heavy modules once here, so that every forked rank starts with them."""
    from minimegatron.training.loop import preload
    preload()


def settings():
    ids, mask = padded_batch()
    return ids, [dict(), dict(num_beams=3, length_penalty=0.5),
                 dict(do_sample=True, top_k=10, temperature=0.9, seed=3),
                 dict(attention_mask=mask), dict(attention_mask=mask, num_beams=3, eos_token_id=5),
                 dict(attention_mask=mask, use_cache=False)]


def pipeline_generate(hf, tp: int, pp: int):
    """On each rank: this TP rank's shard of the HF weights, loaded into its pipeline stage."""
    from minimegatron.pipe import LanguageModelPipe, load_model_state_dict
    ids, kws = settings()
    plain = from_hf(hf, state=initialize_model_parallel(tp))  # this TP rank's shards, whole model
    state = initialize_model_parallel(tp, pp)
    stage = LanguageModelPipe(plain.config, state)
    load_model_state_dict(stage, plain.state_dict())
    with CommCounter() as comm:  # one greedy call of T tokens: what goes over the wire
        generate(stage, ids, T)
    counts = {op: (len(comm.select(op)), sum(r.numel for r in comm.select(op)),
                   {r.group_size for r in comm.select(op)}) for op in ("send", "recv", "broadcast")}
    return stage.layer_range, [generate(stage, ids, 8, **kw) for kw in kws], counts


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_pipeline_generation_equals_single_device(name, tp, pp):
    hf = MODELS[name]()
    ids, kws = settings()
    model = from_hf(hf).eval()
    single = [generate(model, ids, 8, **kw) for kw in kws]
    out = launch(pipeline_generate, tp * pp, hf, tp, pp, timeout=120)
    ranges = {rng for rng, _, _ in out}
    assert len(ranges) == pp  # really split: each stage holds its own layers
    for rank, (_, got, _) in enumerate(out):
        for g, want, kw in zip(got, single, kws):
            assert torch.equal(g, want), (rank, kw)
    # the docstring's count, per TP rank: T forwards (the prefill of s tokens, then 1 token each) send
    # (s_new, b, h) from stage 0 to stage 1, and T broadcasts of b ids reach all tp·pp ranks
    (b, s), h = ids.shape, hf.config.hidden_size
    hidden = (s + T - 1) * b * h
    for rank, (_, _, counts) in enumerate(out):
        first = rank < tp
        assert counts["send"][:2] == ((T, hidden) if first else (0, 0)), (rank, counts)
        assert counts["recv"][:2] == ((0, 0) if first else (T, hidden)), (rank, counts)
        assert counts["broadcast"] == (T, T * b, {tp * pp}), (rank, counts)


def test_a_whole_model_on_a_pipeline_state_is_refused():
    model = GPTModel(gpt_config(vocab_size=50, hidden_size=32, num_layers=2, num_attention_heads=4,
                                max_seq_len=32), ParallelState(pp=2))
    with pytest.raises(ValueError, match="generate on its pipeline stages"):
        generate(model, token_ids(vocab=50, seq=4), 2)
