"""Generation: token-for-token equal to Hugging Face's generate; the KV cache equals full recomputation."""
from __future__ import annotations

import pytest
import torch

from minimegatron.checkpoint import from_hf
from minimegatron.generate import forward_flops, generate, sample_next_token, top_k_filter, top_p_filter
from minimegatron.generate_beam import beam_search
from minimegatron.launch import launch
from minimegatron.layers.attention import KVCache
from minimegatron.mpu.state import initialize_model_parallel
from tests.checkpoint.hf_models import hf_gpt2, hf_llama, token_ids

MODELS = {"gpt2": lambda: hf_gpt2(vocab=50), "llama-gqa": lambda: hf_llama(kv_heads=2, vocab=50)}


@pytest.fixture(scope="module")
def pairs():
    """(HF model, converted minimegatron model) per architecture, built once."""
    out = {}
    for name, make in MODELS.items():
        hf = make()
        out[name] = (hf, from_hf(hf).eval())
    return out


def hf_generate(hf, ids, **kw):
    kw.setdefault("pad_token_id", kw.get("eos_token_id") if kw.get("eos_token_id") is not None else 0)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kw)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_transformers(pairs, name):
    hf, model = pairs[name]
    ids = token_ids(vocab=50, seq=5)
    ours = generate(model, ids, max_new_tokens=12)
    assert ours.shape == (2, 17)
    assert torch.equal(ours, hf_generate(hf, ids, max_new_tokens=12))
    # an EOS that only row 1 produces: row 1 is padded after it, row 0 runs to max_new_tokens
    eos = next(int(t) for t in ours[1, 5:] if t not in ours[0, 5:])
    ours = generate(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert ours.shape == (2, 17) and (ours[1, 5:] == eos).sum() == 1 and ours[1, -1] == 0
    assert torch.equal(ours, hf_generate(hf, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0))


@pytest.mark.parametrize("name", list(MODELS))
def test_beam_search_equals_transformers(pairs, name):
    hf, model = pairs[name]
    ids = token_ids(vocab=50, seq=5)
    greedy = generate(model, ids, max_new_tokens=10)
    results = {}
    for eos in (None, int(greedy[0, 7]), int(greedy[1, 6])):
        for lp in (-2.0, 1.0, 2.0):
            ours = beam_search(model, ids, 10, num_beams=3, length_penalty=lp, eos_token_id=eos)
            ref = hf_generate(hf, ids, max_new_tokens=10, num_beams=3, length_penalty=lp, eos_token_id=eos)
            assert ours.shape == ref.shape and torch.equal(ours, ref), (eos, lp, ours, ref)
            results[eos, lp] = ours
    # the cases really exercise the length penalty: some answer changes with it
    assert any(results[e, -2.0].shape != results[e, 2.0].shape or
               not torch.equal(results[e, -2.0], results[e, 2.0]) for e, _ in results)
    early = generate(model, ids, 10, num_beams=3, eos_token_id=int(greedy[0, 7]), early_stopping=True)
    ref = hf_generate(hf, ids, max_new_tokens=10, num_beams=3, eos_token_id=int(greedy[0, 7]),
                      early_stopping=True)
    assert torch.equal(early, ref)


def test_kv_cache_equals_full_recomputation(pairs):
    _, model = pairs["llama-gqa"]
    ids = token_ids(vocab=50, seq=6)
    cache = KVCache(model.config.num_layers)
    seq = ids
    with torch.no_grad():
        step_logits = model(ids, kv_cache=cache)[:, -1]  # prefill
        for _ in range(5):
            full = model(seq)[:, -1]  # the whole sequence again
            torch.testing.assert_close(step_logits, full, rtol=1e-5, atol=1e-5)
            token = full.argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
            step_logits = model(token, kv_cache=cache)[:, -1]  # one token, the rest from the cache
    assert cache.offset == seq.size(1)
    for name, (_, m) in pairs.items():
        for kw in (dict(), dict(do_sample=True, top_k=10, top_p=0.9, temperature=0.8, seed=3),
                   dict(num_beams=3, length_penalty=1.5, eos_token_id=4)):
            assert torch.equal(generate(m, ids, 8, use_cache=True, **kw),
                               generate(m, ids, 8, use_cache=False, **kw)), (name, kw)


def test_tensor_parallel_generation_matches_single_device():
    hf = hf_llama(kv_heads=2, vocab=50)
    ids = token_ids(vocab=50, seq=5)
    settings = [dict(), dict(do_sample=True, top_k=20, top_p=0.95, temperature=1.3, seed=11),
                dict(num_beams=3, length_penalty=0.5)]
    single = [generate(from_hf(hf).eval(), ids, 8, **kw) for kw in settings]

    def run():
        model = from_hf(hf, state=initialize_model_parallel(2)).eval()
        out = [generate(model, ids, 8, **kw) for kw in settings]
        sequence_parallel = from_hf(hf, state=initialize_model_parallel(2, sequence_parallel=True))
        try:
            generate(sequence_parallel, ids, 2)
        except ValueError as err:
            return out, str(err)
        return out, None

    for rank_out, sp_error in launch(run, 2, timeout=120):
        for got, want, kw in zip(rank_out, single, settings):
            assert torch.equal(got, want), kw
        assert "build the model without sequence_parallel" in sp_error


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 5, 39):
        expected = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(top_k_filter(logits, k), expected)
    for p in (0.05, 0.3, 0.9, 0.999):
        expected = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(top_p_filter(logits, p).isinf(), expected.isinf()), p
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    kept = lambda p: (~top_p_filter(probs.log(), p).isinf()).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(0.4) == [0]  # the top token alone already covers 0.4
    assert kept(0.8) == [0, 2]  # 0.5 + 0.3 >= 0.8
    assert kept(0.81) == [0, 2, 3]
    assert kept(1e-9) == [0]  # the most likely token always survives


def test_sampling_is_seeded_and_degenerates_to_greedy(pairs):
    _, model = pairs["gpt2"]
    ids = token_ids(vocab=50, seq=5)
    a = generate(model, ids, 10, do_sample=True, seed=1)
    assert torch.equal(a, generate(model, ids, 10, do_sample=True, seed=1))
    assert not torch.equal(a, generate(model, ids, 10, do_sample=True, seed=2))
    greedy = generate(model, ids, 10)
    assert torch.equal(generate(model, ids, 10, do_sample=True, top_k=1, seed=5), greedy)
    logits = torch.randn(3, 50)
    assert torch.equal(sample_next_token(logits, True, temperature=1e-4), logits.argmax(-1))


def test_forward_flops_match_torch_flop_counter(pairs):
    """The dense (weight matmul) part of the formula equals what torch counts for a real forward."""
    from torch.utils.flop_counter import FlopCounterMode
    wide = from_hf(hf_llama(kv_heads=2, vocab=50, head_dim=16)).eval()  # heads·head_dim = 64 != h = 32
    for model in [m for _, m in pairs.values()] + [wide]:
        ids = token_ids(vocab=50, seq=7)
        for new, cache in ((7, None), (1, KVCache(model.config.num_layers))):
            if cache is not None:
                with torch.no_grad():
                    model(ids, kv_cache=cache)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(ids[:, :new], kv_cache=cache)
            assert counter.get_total_flops() == forward_flops(model.config, new, 7, batch=2)["dense"]
    cost = forward_flops(pairs["gpt2"][1].config, 1, 100)
    assert cost["attention"] == 2 * 2 * 2 * 100 * 32 and cost["total"] == cost["dense"] + cost["attention"]


def test_bad_arguments_raise_clear_errors(pairs):
    _, model = pairs["gpt2"]
    ids = token_ids(vocab=50, seq=5)
    cases = [
        (dict(input_ids=ids.float()), TypeError, "integer torch.Tensor"),
        (dict(input_ids=ids[:, :0]), ValueError, "seq >= 1"),
        (dict(input_ids=ids + 50), ValueError, r"must lie in \[0, 50\)"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1"),
        (dict(max_new_tokens=64), ValueError, "exceeds max_seq_len=64"),
        (dict(temperature=0.5), ValueError, "pass do_sample=True"),
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(do_sample=True, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_k=-1), ValueError, "top_k must be an int >= 0"),
        (dict(num_beams=3, do_sample=True), ValueError, "num_beams > 1 with do_sample=False"),
        (dict(num_beams=0), ValueError, "num_beams must be an int >= 1"),
        (dict(num_beams=2, logits_processor=lambda z: z), ValueError, "no logits_processor"),
        (dict(eos_token_id=50), ValueError, r"eos_token_id \[50\] outside the vocabulary"),
    ]
    for kw, exc, msg in cases:
        kw = dict(dict(input_ids=ids, max_new_tokens=4), **kw)
        with pytest.raises(exc, match=msg):
            generate(model, **kw)
    one = generate(model, ids[0], 4)  # a single prompt (seq,) comes back as (seq + 4,)
    assert one.shape == (9,) and torch.equal(one, generate(model, ids[:1], 4)[0])
    assert model.training is False
    model.train()
    generate(model, ids, 2)
    assert model.training is True  # mode restored
    model.eval()
