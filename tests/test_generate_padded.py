"""Padded batched generation: prompts of different lengths in one call, left padding + attention mask.

Compared with Hugging Face's ``generate`` on the same padded batch (greedy and beam search), with each
prompt generated alone (no padding at all), and under TP 2 with the single-device result.
"""
from __future__ import annotations

import pytest
import torch

from minimegatron.checkpoint import from_hf
from minimegatron.generate import generate
from minimegatron.launch import launch
from minimegatron.layers.attention import KVCache
from minimegatron.mpu.state import initialize_model_parallel
from tests.checkpoint.hf_models import hf_gpt2, hf_llama, token_ids

MODELS = {"gpt2": lambda: hf_gpt2(vocab=50), "llama-gqa": lambda: hf_llama(kv_heads=2, vocab=50)}
PAD = 0


def padded_batch(seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 4, 7 and 6, left-padded to 7 with PAD; mask 0 on the pads."""
    ids = token_ids(vocab=50, batch=3, seq=seq, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.fixture(scope="module")
def pairs():
    return {name: (hf, from_hf(hf).eval()) for name, hf in ((n, make()) for n, make in MODELS.items())}


def hf_generate(hf, ids, mask, **kw):
    kw.setdefault("pad_token_id", kw.get("eos_token_id") if kw.get("eos_token_id") is not None else PAD)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, **kw)


@pytest.mark.parametrize("name", list(MODELS))
def test_padded_greedy_equals_transformers_and_each_prompt_alone(pairs, name):
    hf, model = pairs[name]
    ids, mask = padded_batch()
    ours = generate(model, ids, 10, attention_mask=mask)
    assert ours.shape == (3, 17)
    assert torch.equal(ours, hf_generate(hf, ids, mask, max_new_tokens=10))
    for row in range(3):  # each prompt alone, no padding: the same continuation
        start = int((mask[row] == 0).sum())
        assert torch.equal(generate(model, ids[row, start:], 10), ours[row, start:]), row
    # the mask matters: the same padded ids unmasked continue differently in the padded rows
    unmasked = generate(model, ids, 10)
    assert torch.equal(unmasked[1], ours[1]) and not torch.equal(unmasked[0], ours[0])
    # an all-ones mask is the unpadded call, and an EOS ends one row early
    assert torch.equal(generate(model, ids, 10, attention_mask=torch.ones_like(ids)), unmasked)
    eos = int(ours[2, 9])
    ours = generate(model, ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD)
    ref = hf_generate(hf, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(ours, ref)
    assert (ours[2, 7:] == eos).sum() == 1 and ours[2, -1] == PAD  # row 2 ended there, then padded


@pytest.mark.parametrize("name", list(MODELS))
def test_padded_beam_search_equals_transformers(pairs, name):
    hf, model = pairs[name]
    ids, mask = padded_batch()
    greedy = generate(model, ids, 10, attention_mask=mask)
    for eos in (None, int(greedy[0, 9]), int(greedy[2, 8])):
        for lp in (-1.0, 1.5):
            ours = generate(model, ids, 10, attention_mask=mask, num_beams=3, length_penalty=lp,
                            eos_token_id=eos)
            ref = hf_generate(hf, ids, mask, max_new_tokens=10, num_beams=3, length_penalty=lp,
                              eos_token_id=eos)
            assert ours.shape == ref.shape and torch.equal(ours, ref), (eos, lp, ours, ref)


def test_padded_cache_equals_full_recomputation(pairs):
    ids, mask = padded_batch()
    for name, (_, model) in pairs.items():
        for kw in (dict(), dict(do_sample=True, top_k=10, temperature=0.8, seed=3),
                   dict(num_beams=3, length_penalty=1.5, eos_token_id=4)):
            cached = generate(model, ids, 8, attention_mask=mask, use_cache=True, **kw)
            assert torch.equal(cached, generate(model, ids, 8, attention_mask=mask, use_cache=False, **kw))


def test_padded_tensor_parallel_equals_single_device(pairs):
    ids, mask = padded_batch()
    hfs = {name: hf for name, (hf, _) in pairs.items()}
    settings = [dict(), dict(do_sample=True, top_k=20, top_p=0.95, seed=11), dict(num_beams=3)]
    single = {name: [generate(m, ids, 8, attention_mask=mask, **kw) for kw in settings]
              for name, (_, m) in pairs.items()}

    def run():
        state = initialize_model_parallel(2)
        return {name: [generate(from_hf(hf, state=state).eval(), ids, 8, attention_mask=mask, **kw)
                       for kw in settings] for name, hf in hfs.items()}

    for rank_out in launch(run, 2, timeout=120):
        for name in hfs:
            for got, want, kw in zip(rank_out[name], single[name], settings):
                assert torch.equal(got, want), (name, kw)


def test_bad_masks_raise_one_clear_line(pairs):
    _, model = pairs["gpt2"]
    ids, mask = padded_batch()
    right = mask.flip(1)  # the pads at the end
    holes = torch.ones_like(mask)
    holes[1, 3] = 0  # a pad between tokens
    empty = mask.clone()
    empty[1] = 0
    cases = [(right, ValueError, "right padding; pad on the left"),
             (holes, ValueError, "a pad after a token: only left padding"),
             (empty, ValueError, r"attention_mask rows \[1\] are all pads"),
             (mask[:, 1:], ValueError, r"attention_mask shape \(3, 6\) != input_ids shape \(3, 7\)"),
             (mask * 2, ValueError, "only 0 \\(pad\\) and 1"),
             (mask.tolist(), TypeError, "attention_mask must be a torch.Tensor")]
    for bad, exc, msg in cases:
        for beams in (1, 2):
            with pytest.raises(exc, match=msg):
                generate(model, ids, 4, attention_mask=bad, num_beams=beams)
    cache = KVCache(model.config.num_layers, key_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_mask shape \(3, 5\) != \(batch, cached \+ new tokens\)"):
        model(ids, kv_cache=cache)
    one = generate(model, ids[0, 3:], 4, attention_mask=mask[0, 3:])  # (seq,) prompt and mask
    assert torch.equal(one, generate(model, ids[:1], 4, attention_mask=mask[:1])[0, 3:])
