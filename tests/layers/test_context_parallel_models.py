"""GPT and LLaMA under context parallelism against Hugging Face and the single-rank model.

cp = 2 alone, with TP (and SP) and cp = 4; ring (p2p) and all-to-all (a2a); MHA, GQA, MQA; RoPE and
learned positions. Same weights, same batch: the gathered logits equal HF's, the loss equals the
single-rank loss (the mean over the whole sequences, ignored labels left out), and the gradients,
averaged over CP as the engine does, equal the single-rank gradients.
"""
import pytest
import torch

from minimegatron import launch
from minimegatron.gpt import GPTModel
from minimegatron.llama import LLaMAModel
from minimegatron.mpu import ParallelState
from tests.layers.hf_reference import (VOCAB, context_parallel_run, gpt2_from_hf, hf_gpt2, hf_llama,
                                       llama_from_hf, reference_run, tiny_gpt, tiny_llama)

TOL = dict(rtol=1e-5, atol=1e-5)
CASES = {
    "llama-mha": (tiny_llama(), hf_llama, llama_from_hf, LLaMAModel),
    "llama-gqa": (tiny_llama(num_kv_heads=2), hf_llama, llama_from_hf, LLaMAModel),
    "llama-mqa": (tiny_llama(num_kv_heads=1), hf_llama, llama_from_hf, LLaMAModel),
    "gpt": (tiny_gpt(), hf_gpt2, gpt2_from_hf, GPTModel),
}
# (tp, cp, cp_comm, sequence_parallel)
LAYOUTS = {"cp2-p2p": (1, 2, "p2p", False), "cp2-a2a": (1, 2, "a2a", False),
           "cp2tp2-p2p+sp": (2, 2, "p2p", True), "cp2tp2-a2a": (2, 2, "a2a", False),
           "cp4-p2p": (1, 4, "p2p", False)}


def _batch(b=2, s=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    labels[0, :3] = -100  # ignored labels: all on CP rank 0, so the token counts differ per rank
    return ids, labels


@pytest.fixture(scope="module", params=list(CASES))
def reference(request):
    config, hf_builder, from_hf, cls = CASES[request.param]
    return dict(reference_run(config, hf_builder, from_hf, cls, *_batch()), cls=cls)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_matches_hugging_face_and_one_rank(reference, layout):
    tp, cp, comm, sp = LAYOUTS[layout]
    if comm == "a2a" and (reference["config"].num_attention_heads // tp) % cp:
        pytest.fail("layout/case mismatch in the test table")
    results = launch(context_parallel_run, tp * cp, reference["cls"], reference["config"],
                     reference["full"], reference["ids"], reference["labels"], tp, cp, comm, sp,
                     timeout=120)
    one_rank_loss = reference["model"](reference["ids"], reference["labels"]).detach()
    for logits, loss, grads in results:
        torch.testing.assert_close(logits, reference["hf_logits"], **TOL)
        torch.testing.assert_close(loss, one_rank_loss, **TOL)
        for name, g in reference["grads"].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_context_parallel_setups_are_refused_before_any_communication():
    state = ParallelState(cp=2, cp_comm="a2a")  # no groups: a refusal must come before any comm
    with pytest.raises(ValueError, match="cp dividing num_attention_heads/tp"):
        LLaMAModel(tiny_llama(num_attention_heads=3, hidden_size=48, num_kv_heads=3), state)
    with pytest.raises(ValueError, match="dropout"):
        LLaMAModel(tiny_llama(dropout=0.1), ParallelState(cp=2))
    with pytest.raises(ValueError, match="ALiBi"):
        GPTModel(tiny_gpt(position_embedding="alibi"), ParallelState(cp=2))
    model = LLaMAModel(tiny_llama(), ParallelState(cp=2))
    with pytest.raises(ValueError, match="zig-zag"):
        model(torch.zeros(1, 7, dtype=torch.long))
