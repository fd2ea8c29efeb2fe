"""GPTModel against Hugging Face GPT2LMHeadModel at TP = 1 and TP = 2; KV cache, recomputation,
sequence parallelism and clear errors for bad configs and inputs."""
import pytest
import torch

from minimegatron import launch
from minimegatron.gpt import GPTModel, KVCache, count_parameters
from minimegatron.llama import LLaMAModel
from minimegatron.mpu import ParallelState, initialize_model_parallel
from minimegatron.mpu.random import model_parallel_seed
from tests.layers.hf_reference import (VOCAB, full_grads, gpt2_from_hf, hf_gpt2, load_full,
                                       reference_run, tiny_gpt, tiny_llama)

TOL = dict(rtol=1e-5, atol=1e-5)


def _batch(b=2, s=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, s), generator=g), torch.randint(0, VOCAB, (b, s), generator=g)


@pytest.fixture(scope="module")
def reference():
    return reference_run(tiny_gpt(), hf_gpt2, gpt2_from_hf, GPTModel, *_batch())


def test_tp1_matches_hugging_face_gpt2(reference):
    with torch.no_grad():
        torch.testing.assert_close(reference["model"](reference["ids"]), reference["hf_logits"], **TOL)
    # tied: the LM head owns no weight; forward hands it the embedding table, whose gradient collects
    # both uses
    assert reference["model"].lm_head.weight is None
    assert "lm_head.weight" not in reference["model"].state_dict()


def _tp2(config, full, ids, labels, sequence_parallel):
    state = initialize_model_parallel(2, sequence_parallel=sequence_parallel)
    model = GPTModel(config, state)
    load_full(model, full)
    loss = model(ids, labels)
    loss.backward()  # under SP the norms' and row biases' f already summed their gradients over TP
    with torch.no_grad():
        logits = model(ids)
        cache = KVCache(config.num_layers)
        steps = [model(ids[:, :9], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache)
                                                       for t in range(9, ids.size(1))] \
            if not sequence_parallel else [logits]
    return logits, torch.cat(steps, 1), loss.detach(), full_grads(model), model.num_parameters()


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2+sp"])
def test_tp2_matches_hugging_face_tp1_and_kv_cache(reference, sequence_parallel):
    results = launch(_tp2, 2, reference["config"], reference["full"], reference["ids"],
                     reference["labels"], sequence_parallel, timeout=60)
    tp1_loss = reference["model"](reference["ids"], reference["labels"]).detach()
    for logits, decoded, loss, grads, n_params in results:
        torch.testing.assert_close(logits, reference["hf_logits"], **TOL)
        torch.testing.assert_close(decoded, reference["hf_logits"], **TOL)  # prefill 9, then 1 by 1
        torch.testing.assert_close(loss, tp1_loss, **TOL)
        for name, g in reference["grads"].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
        assert n_params == count_parameters(reference["config"]) == reference["model"].num_parameters()


def _recompute(config, mode):
    state = initialize_model_parallel(2)
    model_parallel_seed(1234, state)  # the weights and both dropout streams start alike in every run
    model = (LLaMAModel if config.name == "llama" else GPTModel)(config, state, recompute=mode)
    ids, labels = _batch(s=16)
    loss = model(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("config", [tiny_gpt(dropout=0.1), tiny_llama(dropout=0.1, num_kv_heads=2)],
                         ids=["gpt", "llama-gqa"])
def test_recompute_none_selective_full_give_identical_loss_and_grads(config):
    runs = {mode: launch(_recompute, 2, config, mode) for mode in ("none", "selective", "full")}
    for mode in ("selective", "full"):
        for rank in range(2):
            (loss, grads), (ref_loss, ref_grads) = runs[mode][rank], runs["none"][rank]
            torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)  # same dropout masks
            for name in ref_grads:
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_dropout_changes_the_loss_and_eval_turns_it_off():
    torch.manual_seed(0)
    model = GPTModel(tiny_gpt(dropout=0.2))
    ids, labels = _batch()
    train_loss = model(ids, labels)
    model.eval()
    assert model(ids, labels) != train_loss
    assert model(ids, labels) == model(ids, labels)


# ---- errors ---------------------------------------------------------------------------------------

def test_heads_not_divisible_by_tp_is_rejected_before_any_communication():
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor-parallel size 3"):
        GPTModel(tiny_gpt(), ParallelState(tp=3))


def test_kv_heads_incompatible_with_tp_are_rejected():
    config = tiny_llama(hidden_size=48, num_attention_heads=12, num_kv_heads=3, multiple_of=16)
    with pytest.raises(ValueError, match="num_kv_heads=3 and tensor-parallel size 2"):
        LLaMAModel(config, ParallelState(tp=2))
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_attention_heads=4"):
        tiny_llama(num_kv_heads=3)


def test_token_id_outside_the_vocabulary_raises():
    model = GPTModel(tiny_gpt())
    model.embedding.word_embeddings.check_token_ids = True  # the debugging switch (off: no host sync)
    with pytest.raises(ValueError, match=r"token id 100 is outside the vocabulary \[0, 100\)"):
        model(torch.tensor([[1, 2, 100]]))
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        model(torch.tensor([[1, -1]]))


def test_sequence_longer_than_the_position_table_raises():
    model = GPTModel(tiny_gpt(max_seq_len=16))
    with pytest.raises(ValueError, match=r"sequence length 17 .* max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = KVCache(2)
    model(torch.zeros(1, 15, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match=r"sequence length 17 \(cached 15 \+ new 2\)"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)
    model.embedding.position_embeddings.check_positions = True  # the debugging switch (a host sync)
    with pytest.raises(ValueError, match=r"position 16 is beyond the learned position table"):
        model(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[3, 16]]))
    with pytest.raises(ValueError, match=r"exceeds the model's rope positions, max_seq_len=16"):
        LLaMAModel(tiny_llama(max_seq_len=16))(torch.zeros(1, 17, dtype=torch.long))  # no table, same limit


def test_bad_shapes_and_modes_raise():
    model = GPTModel(tiny_gpt())
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="recompute='some'"):
        model.recompute = "some"
