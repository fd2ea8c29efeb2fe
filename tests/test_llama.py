"""LLaMAModel against Hugging Face LlamaForCausalLM (MHA and GQA), at TP = 1 and TP = 2, plus the
KV cache and the GPT -> LLaMA switches (the porting points and the study switches) one at a time."""
import dataclasses

import pytest
import torch

from minimegatron import launch
from minimegatron.config import PORTING_POINTS, gpt_config, llama_config
from minimegatron.gpt import GPTModel
from minimegatron.layers import parameter_counts
from minimegatron.llama import KVCache, LLaMAModel, count_parameters
from minimegatron.mpu import initialize_model_parallel
from tests.layers.hf_reference import (VOCAB, full_grads, hf_llama, llama_from_hf, load_full,
                                       reference_run, tiny_llama)

CASES = {"mha": tiny_llama(), "gqa": tiny_llama(num_kv_heads=2, rope_theta=500000.0)}
TOL = dict(rtol=1e-5, atol=1e-5)


def _batch(b=2, s=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    labels[0, :3] = -100  # ignored positions do not count
    return ids, labels


@pytest.fixture(scope="module", params=list(CASES))
def reference(request):
    return reference_run(CASES[request.param], hf_llama, llama_from_hf, LLaMAModel, *_batch())


def test_tp1_logits_and_loss_match_hugging_face(reference):
    model, ids, labels = reference["model"], reference["ids"], reference["labels"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference["hf_logits"], **TOL)
        hf_loss = reference["hf"](ids, labels=labels).loss  # HF shifts the labels by one itself
        ours = model(ids[:, :-1], labels[:, 1:])
    torch.testing.assert_close(ours, hf_loss, **TOL)


def _tp2(config, full, ids, labels, sequence_parallel):
    state = initialize_model_parallel(2, sequence_parallel=sequence_parallel)
    model = LLaMAModel(config, state)
    load_full(model, full)
    loss = model(ids, labels)
    loss.backward()  # under SP the norms' f already summed their gradients over TP
    with torch.no_grad():
        logits = model(ids)
    return logits, loss.detach(), full_grads(model)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2+sp"])
def test_tp2_matches_hugging_face_and_tp1_gradients(reference, sequence_parallel):
    results = launch(_tp2, 2, reference["config"], reference["full"], reference["ids"],
                     reference["labels"], sequence_parallel, timeout=60)
    tp1_loss = reference["model"](reference["ids"], reference["labels"]).detach()
    for logits, loss, grads in results:
        torch.testing.assert_close(logits, reference["hf_logits"], **TOL)
        torch.testing.assert_close(loss, tp1_loss, **TOL)
        for name, g in reference["grads"].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


# heads=8 over tp=4: kv=2 takes the replicated path (two ranks share a kv head), kv=4 the split one
TP4_CASES = {"gqa8-kv2": tiny_llama(num_attention_heads=8, num_kv_heads=2),
             "gqa8-kv4": tiny_llama(num_attention_heads=8, num_kv_heads=4, rope_theta=500000.0)}


def _tp4(cases, ids, labels):
    out, plain = {}, initialize_model_parallel(4)
    for sp in (False, True):
        state = dataclasses.replace(plain, sequence_parallel=sp)
        for name, (config, full) in cases.items():
            model = LLaMAModel(config, state)
            load_full(model, full)
            loss = model(ids, labels)
            loss.backward()
            with torch.no_grad():
                logits = model(ids)
            out[name, sp] = logits, loss.detach(), full_grads(model)
    return out


def test_tp4_matches_hugging_face_and_tp1_gradients_for_split_and_replicated_kv_heads():
    ids, labels = _batch()
    cases, expected = {}, {}
    for name, config in TP4_CASES.items():
        hf = hf_llama(config)
        full = llama_from_hf(hf)
        model = LLaMAModel(config)
        load_full(model, full)
        loss = model(ids, labels)
        loss.backward()
        with torch.no_grad():
            expected[name] = hf(ids).logits, loss.detach(), full_grads(model)
        cases[name] = config, full
    for results in launch(_tp4, 4, cases, ids, labels, timeout=120):  # one launch: both cases, ± SP
        for (name, sp), (logits, loss, grads) in results.items():
            hf_logits, tp1_loss, tp1_grads = expected[name]
            torch.testing.assert_close(logits, hf_logits, **TOL, msg=lambda m: f"{name} sp={sp}: {m}")
            torch.testing.assert_close(loss, tp1_loss, **TOL)
            for key, g in tp1_grads.items():
                torch.testing.assert_close(grads[key], g, rtol=1e-5, atol=1e-6, msg=f"{name} sp={sp} {key}")


def _decode(model, ids, prefill):
    """Prefill ``prefill`` tokens, then feed the rest one at a time; logits of every position."""
    cache = KVCache(model.config.num_layers)
    out = [model(ids[:, :prefill], kv_cache=cache)]
    for t in range(prefill, ids.size(1)):
        out.append(model(ids[:, t:t + 1], kv_cache=cache))
    assert cache.offset == ids.size(1)
    return torch.cat(out, dim=1)


def _kv_cache_tp2(config, full, ids):
    model = LLaMAModel(config, initialize_model_parallel(2))
    load_full(model, full)
    with torch.no_grad():
        return _decode(model, ids, prefill=10), model(ids)


def test_kv_cache_decoding_equals_full_recomputation(reference):
    ids = reference["ids"]
    with torch.no_grad():
        torch.testing.assert_close(_decode(reference["model"], ids, 10), reference["hf_logits"], **TOL)
    for decoded, full_logits in launch(_kv_cache_tp2, 2, reference["config"], reference["full"], ids):
        torch.testing.assert_close(decoded, full_logits, **TOL)
        torch.testing.assert_close(decoded, reference["hf_logits"], **TOL)


# ---- the changes, one at a time ---------------------------------------------------------------------

SIZES = dict(vocab_size=VOCAB, hidden_size=48, num_layers=2, num_attention_heads=4, max_seq_len=32,
             multiple_of=16, make_vocab_size_divisible_by=8)
LLAMA_VALUES = {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope", "bias": False,
                "tie_embeddings": False, "final_norm": False, "ffn_hidden_size": 128,
                "num_kv_heads": 2}


@pytest.mark.parametrize("field", list(LLAMA_VALUES))
def test_each_change_alone_builds_runs_and_is_counted(field):
    base = gpt_config(**SIZES)
    changed = gpt_config(**SIZES, **{field: LLAMA_VALUES[field]})
    assert {k for k in LLAMA_VALUES if getattr(changed, k) != getattr(base, k)} >= {field}
    ids, labels = _batch(s=12)
    losses, counts = [], []
    for config in (base, changed):
        torch.manual_seed(0)
        model = GPTModel(config)
        loss = model(ids, labels)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in model.parameters())
        assert model.num_parameters() == count_parameters(config)
        losses.append(loss.item())
        counts.append(count_parameters(config))
    assert field in model.changes
    # every change alters the output or the parameter count (biases start at zero: only the count)
    assert losses[0] != losses[1] or counts[0] != counts[1], f"switching {field} changed nothing"


def test_parameter_formula_counts_real_tensors_for_both_presets():
    for config in (gpt_config(**SIZES), llama_config(**SIZES), llama_config(**SIZES, num_kv_heads=1),
                   llama_config(**SIZES, num_kv_heads=2, head_dim=32, attention_bias=True)):  # Llama-3 fields
        model = LLaMAModel(config) if config.name == "llama" else GPTModel(config)
        padding = (model.lm_head.padded_vocab_size - VOCAB) * config.hidden_size
        tables = 1 if config.tie_embeddings else 2
        assert sum(p.numel() for p in model.parameters()) == count_parameters(config) + tables * padding
        counts = parameter_counts(config)
        assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_llama_preset_is_the_porting_points():
    gpt, llama = gpt_config(**SIZES), llama_config(**SIZES)
    differ = {f.name for f in dataclasses.fields(gpt) if getattr(gpt, f.name) != getattr(llama, f.name)}
    assert differ == {"name", "norm", "activation", "position_embedding", "bias", "tie_embeddings",
                      "ffn_hidden_size"}  # final_norm: GPT-2 has ln_f too; GQA is opt-in
    assert llama.ffn_hidden_size == 16 * -(-8 * 48 // 3 // 16)  # 8/3·h rounded up to multiple_of
    assert LLaMAModel(llama).changes == {} and GPTModel(gpt).changes == {}


def test_the_class_picks_a_default_not_a_flavour():
    """No guard on ``config.name``: GPTModel(llama_config()) is the LLaMA model, and says so."""
    llama = llama_config(**SIZES)
    as_gpt, as_llama = GPTModel(llama, init_seed=0), LLaMAModel(llama, init_seed=0)
    assert as_gpt.changes.keys() == LLaMAModel(gpt_config(**SIZES)).changes.keys() == set(PORTING_POINTS)
    mine, theirs = as_gpt.state_dict(), as_llama.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("positions", ["learned", "rope", "alibi"])
def test_kv_cache_keeps_positions_right_for_every_position_kind(positions):
    config = tiny_llama(position_embedding=positions, num_kv_heads=2)
    torch.manual_seed(0)
    model = LLaMAModel(config).eval()
    ids, _ = _batch(s=12)
    with torch.no_grad():  # new tokens must sit at positions 5, 6, ... not 0
        torch.testing.assert_close(_decode(model, ids, prefill=5), model(ids), rtol=1e-5, atol=1e-5)
