"""Llama-3-family configs against Hugging Face at TP 1, 2 and 4: same logits, same greedy generation.

Each case is a tiny random ``LlamaForCausalLM`` built locally (nothing downloaded). The sequences run
past the llama3 case's ``original_max_position_embeddings`` (32), and its 16-dim heads have a kept,
a smoothed and an interpolated frequency band: the scaled models' logits are checked to differ from
the same weights without scaling, so a scaling that did nothing would fail. One launch per TP size
covers every case: each rank converts straight from the HF weights, reloads a TP=1 checkpoint
(the reshape carries the bias tensors and the scaling in config.json) and generates.
"""
from __future__ import annotations

import copy

import pytest
import torch

from minimegatron.checkpoint import (config_from_hf, config_to_hf, from_hf, full_state_dict,
                                     load_model, save_checkpoint, state_dict_from_hf, to_hf)
from minimegatron.generate import generate
from minimegatron.launch import launch
from minimegatron.mpu.state import initialize_model_parallel
from minimegatron.rope_scaling import RopeScaling
from tests.checkpoint.hf_models import hf_llama, token_ids

TOL = dict(rtol=1e-5, atol=1e-5)
L3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=32)
PLAIN = dict(rope_theta=500.0)
CASES = {  # name -> hf_llama kwargs (hidden 32, 4 heads, 2 layers, max_position_embeddings 64)
    "llama3-rope": dict(hidden_size=64, kv_heads=2, rope_theta=10000.0, rope_scaling=L3),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "bias-mha": dict(attention_bias=True),                       # fused qkv bias, stride 3
    "bias-gqa": dict(attention_bias=True, kv_heads=2),           # TP 4: kv (and its bias) replicated
    "head-dim": dict(head_dim=16, kv_heads=2),                   # q/k/v 4·16 = 64 wide, hidden 32
    "tied": dict(tie_word_embeddings=True),
    "llama3.2-like": dict(hidden_size=64, head_dim=32, kv_heads=2, attention_bias=True,
                          tie_word_embeddings=True, rope_theta=10000.0, rope_scaling=L3),
    "rope_type-default": dict(rope_scaling={"rope_type": "default"}),
    "type-default": dict(rope_scaling={"type": "default"}),
    "partial-rotary-1.0": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                "partial_rotary_factor": 1.0}),
}
SCALED = ("llama3-rope", "linear-rope", "llama3.2-like")
SEQ, PROMPT = 40, 6  # logits over 40 tokens; generation 6 -> 40 tokens (beyond the original 32)


def make_hf(name: str, scaled: bool = True):
    kw = copy.deepcopy(CASES[name])  # LlamaConfig writes rope_theta into the dict it is given
    if "rope_parameters" in kw:
        kw.pop("rope_theta", None)
    if not scaled:
        kw.pop("rope_scaling")
    return hf_llama(**{"rope_theta": 500.0, **kw})


def hf_generate(hf, ids):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=SEQ - PROMPT, pad_token_id=0)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per case: the HF model, its logits and greedy continuation, our TP=1 full state dict and a
    TP=1 checkpoint (what the TP 2/4 ranks reload)."""
    root = tmp_path_factory.mktemp("llama3-ckpt")
    ids, out = token_ids(seq=SEQ), {}
    for name in CASES:
        hf = make_hf(name)
        with torch.no_grad():
            logits = hf(ids).logits
        model = from_hf(hf).eval()
        save_checkpoint(model, root / name)
        out[name] = dict(hf=hf, logits=logits, tokens=hf_generate(hf, ids[:, :PROMPT]),
                         full=full_state_dict(model), ckpt=root / name)
    return ids, out


BIASED = ("bias-mha", "bias-gqa", "llama3.2-like")


def ours_on(tp, cases, ids):
    """Logits and greedy tokens of each case converted from HF at TP size ``tp``, the logits of the
    TP=1 checkpoint reloaded there, the gathered full state dict; for the biased cases (tp > 1) also
    the logits under sequence parallelism (the row-parallel bias then added to each s/tp slice)."""
    state = initialize_model_parallel(tp)
    sp_state = initialize_model_parallel(tp, sequence_parallel=True) if tp > 1 else None
    out = {}
    for name, ref in cases.items():
        model = from_hf(ref["hf"], state=state).eval()
        reloaded = load_model(ref["ckpt"], state).eval()
        with torch.no_grad():
            out[name] = dict(logits=model(ids), reloaded=reloaded(ids),
                             tokens=generate(model, ids[:, :PROMPT], SEQ - PROMPT),
                             full=full_state_dict(model))
            if sp_state is not None and name in BIASED:
                out[name]["sequence_parallel"] = from_hf(ref["hf"], state=sp_state).eval()(ids)
    return out


def check(results, refs):
    for name, ref in refs.items():
        got = results[name]
        torch.testing.assert_close(got["logits"], ref["logits"], **TOL, msg=f"{name}: logits")
        torch.testing.assert_close(got["reloaded"], ref["logits"], **TOL, msg=f"{name}: checkpoint")
        assert torch.equal(got["tokens"], ref["tokens"]), f"{name}: greedy generation differs from HF"
        if "sequence_parallel" in got:
            torch.testing.assert_close(got["sequence_parallel"], ref["logits"], **TOL, msg=f"{name}: SP")
        assert got["full"].keys() == ref["full"].keys(), name
        for key, t in ref["full"].items():
            assert torch.equal(got["full"][key], t), f"{name}: {key} gathered from the shards"


def test_tp1_logits_generation_and_round_trip(references):
    ids, refs = references
    check(ours_on(1, refs, ids), refs)
    for name, ref in refs.items():  # and back: to_hf computes the same, its config converts back
        model = from_hf(ref["hf"]).eval()
        exported = to_hf(model)
        with torch.no_grad():
            torch.testing.assert_close(exported(ids).logits, ref["logits"], **TOL, msg=name)
        assert config_from_hf(config_to_hf(model.config)) == model.config.replace(name="llama-from-hf")


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_logits_and_generation_match_hf(references, tp):
    ids, refs = references
    results = launch(lambda: ours_on(tp, refs, ids), tp, timeout=300)
    for rank in (0, tp - 1):
        check(results[rank], refs)
        assert all("sequence_parallel" in results[rank][name] for name in BIASED)


def test_the_new_fields_are_really_exercised(references):
    """A test that could not fail would prove nothing: the scaling changes the logits, the biases
    are there (and non-zero), head_dim widens q/k/v, and the plain-RoPE spellings mean plain RoPE."""
    ids, refs = references
    for name in SCALED:
        with torch.no_grad():
            unscaled = make_hf(name, scaled=False)(ids).logits
        gap = (unscaled - refs[name]["logits"]).abs().amax(dim=-1)  # (b, s)
        assert gap[:, 32:].min() > 1e-3, f"{name}: the scaling must change the logits past position 32"
    full = refs["bias-mha"]["full"]
    assert full["layers.0.attention.query_key_value.bias"].abs().min() > 0
    assert full["layers.1.attention.dense.bias"].shape == (32,)
    gqa = refs["bias-gqa"]["full"]
    assert gqa["layers.0.attention.query.bias"].shape == gqa["layers.0.attention.key_value.bias"].shape == (32,)
    assert refs["head-dim"]["full"]["layers.0.attention.query.weight"].shape == (64, 32)
    assert refs["head-dim"]["full"]["layers.0.attention.dense.weight"].shape == (32, 64)
    for name in ("rope_type-default", "type-default", "partial-rotary-1.0"):
        config = config_from_hf(refs[name]["hf"].config)
        assert config.rope_scaling is None and config.rope_theta == 500.0
    assert config_from_hf(refs["llama3-rope"]["hf"].config).rope_scaling == RopeScaling(**L3)


def _as_4x_config_json(config_json: dict, rope_scaling: dict | None) -> dict:
    """A transformers 4.x config.json: rope_theta beside rope_scaling, no rope_parameters."""
    d = {k: v for k, v in config_json.items() if k != "rope_parameters"}
    theta = (config_json.get("rope_parameters") or {}).get("rope_theta", config_json.get("rope_theta"))
    return dict(d, rope_theta=theta, rope_scaling=rope_scaling)


@pytest.mark.parametrize("name,rope_scaling", [
    ("llama3-rope", L3), ("linear-rope", {"type": "linear", "factor": 4.0}),
    ("type-default", {"type": "default"}), ("tied", None)])
def test_transformers_4_config_json_converts(references, name, rope_scaling):
    """The 4.x spelling (``rope_scaling`` + ``rope_theta``; old ``type`` key) of a config.json, read
    with its weights: the same logits as the HF model."""
    ids, refs = references
    hf = refs[name]["hf"]
    config_json = _as_4x_config_json(hf.config.to_dict(), copy.deepcopy(rope_scaling))
    model = from_hf(hf.state_dict(), config_json).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), refs[name]["logits"], **TOL)


def test_transformers_4_spelling_of_the_way_back(references, monkeypatch):
    """Under a 4.x version number ``config_to_hf`` writes ``rope_theta`` + ``rope_scaling``; the
    installed transformers (5 reads the old spelling too) builds a model with the same logits."""
    import transformers
    ids, refs = references
    model = from_hf(refs["llama3.2-like"]["hf"]).eval()
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    hf_config = config_to_hf(model.config)
    assert hf_config.to_dict().get("rope_scaling", hf_config.rope_scaling)["rope_type"] == "llama3"
    with torch.no_grad():
        torch.testing.assert_close(to_hf(model)(ids).logits, refs["llama3.2-like"]["logits"], **TOL)


def test_state_dict_names_of_the_biases(references):
    """HF's q/k/v biases fuse like their weights, o_proj's maps one to one."""
    hf = references[1]["bias-gqa"]["hf"]
    sd, full = hf.state_dict(), state_dict_from_hf(hf.state_dict(), config_from_hf(hf.config))
    p = "model.layers.0.self_attn."
    assert torch.equal(full["layers.0.attention.query.bias"], sd[p + "q_proj.bias"])
    assert torch.equal(full["layers.0.attention.key_value.bias"],
                       torch.cat([sd[p + "k_proj.bias"], sd[p + "v_proj.bias"]]))
    assert torch.equal(full["layers.0.attention.dense.bias"], sd[p + "o_proj.bias"])
