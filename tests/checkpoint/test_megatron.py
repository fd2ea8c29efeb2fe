"""Megatron-LM layout: any TP×PP round-trips bit for bit, files read by Hugging Face's own converters,
Megatron's QKV/SwiGLU order per rank, loading into TP=2 ranks, one clear line for each bad checkpoint."""
from __future__ import annotations

import argparse
import os
import re
import runpy
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import minimegatron.checkpoint.megatron as meg_io
from minimegatron.checkpoint import CheckpointError, full_state_dict, load_full_state_dict
from minimegatron.checkpoint import load_megatron, save_megatron
from minimegatron.checkpoint.megatron import flatten
from minimegatron.config import gpt_config, llama_config
from minimegatron.gpt import GPTModel
from minimegatron.launch import launch
from minimegatron.llama import LLaMAModel
from minimegatron.mpu.state import initialize_model_parallel

ROOT = Path(__file__).resolve().parents[2]
SIZES = dict(vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4, max_seq_len=32)
CONFIGS = {"gpt": (GPTModel, gpt_config(**SIZES)),
           "llama-gqa": (LLaMAModel, llama_config(num_kv_heads=2, **SIZES)),
           "llama-mha": (LLaMAModel, llama_config(**SIZES))}
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def build(name, state=None, seed=0):
    cls, config = CONFIGS[name]
    torch.manual_seed(seed)
    return cls(config, state).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS)


def read_rank(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def assert_same_state(got, want):
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_any_tp_pp_round_trips_bit_for_bit(tmp_path, name):
    model = build(name)
    want = full_state_dict(model)
    for tp, pp in [(1, 1), (2, 2), (2, 1), (1, 2)]:
        save_megatron(model, tmp_path, tp=tp, pp=pp, iteration=tp * 10 + pp)
        config, full = load_megatron(tmp_path)  # the tracker's iteration: the last saved
        assert config == model.config
        assert_same_state(full, want)


def test_files_names_and_args_on_disk(tmp_path):
    gpt, llama = build("gpt"), build("llama-gqa")
    save_megatron(gpt, tmp_path / "gpt", tp=2, pp=2)
    save_megatron(llama, tmp_path / "llama", tp=2, pp=2, iteration=200)
    assert (tmp_path / "gpt" / "latest_checkpointed_iteration.txt").read_text() == "release\n"
    assert (tmp_path / "llama" / "latest_checkpointed_iteration.txt").read_text() == "200\n"
    files = sorted(str(p.relative_to(tmp_path / "llama")) for p in (tmp_path / "llama").rglob("*.pt"))
    assert files == [f"iter_0000200/mp_rank_{t:02d}_{s:03d}/model_optim_rng.pt"
                     for t in (0, 1) for s in (0, 1)]
    assert not list(tmp_path.rglob(".tmp-*"))  # nothing left over from the atomic write

    first, last = (read_rank(tmp_path / "gpt/release" / d / "model_optim_rng.pt")
                   for d in ("mp_rank_01_000", "mp_rank_01_001"))
    assert first["checkpoint_version"] == 3.0 and isinstance(first["args"], argparse.Namespace)
    a = first["args"]
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.max_position_embeddings, a.ffn_hidden_size,
            a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (2, 32, 4, 32, 128, 2, 2)
    assert a.padded_vocab_size == 256 and a.make_vocab_size_divisible_by == 128  # 100 -> 128·tp
    lm = "language_model."
    enc = lm + "encoder.layers.0."
    assert set(flatten(first["model"])) == {
        lm + "embedding.word_embeddings.weight", lm + "embedding.position_embeddings.weight",
        *(enc + m + "." + p for m in ("input_layernorm", "self_attention.query_key_value",
                                      "self_attention.dense", "post_attention_layernorm",
                                      "mlp.dense_h_to_4h", "mlp.dense_4h_to_h") for p in ("weight", "bias"))}
    flat = flatten(last["model"])  # stage 1: layer 1 numbered 0, final norm, the tied head's copy
    assert {lm + "encoder.final_layernorm.weight", "word_embeddings_for_head.weight"} <= set(flat)
    assert flat["word_embeddings_for_head.weight"].shape == (128, 32)  # V_pad/tp rows
    assert flat[enc + "self_attention.dense.weight"].shape == (32, 16)  # row-parallel: columns split
    assert torch.equal(flat[enc + "input_layernorm.weight"], gpt.state_dict()["layers.1.input_norm.weight"])

    out = flatten(read_rank(tmp_path / "llama/iter_0000200/mp_rank_00_001/model_optim_rng.pt")["model"])
    assert out[lm + "output_layer.weight"].shape == (128, 32)  # LLaMA: untied, on the last stage
    emb = full_state_dict(gpt)["embedding.word_embeddings.weight"]  # (100, h)
    head0 = flatten(read_rank(tmp_path / "gpt/release/mp_rank_00_001/model_optim_rng.pt")["model"])
    assert torch.equal(head0["word_embeddings_for_head.weight"], torch.cat([emb, emb.new_zeros(28, 32)]))
    assert not flat["word_embeddings_for_head.weight"].any()  # rank 1's rows 128…255: all padding


def test_qkv_and_swiglu_follow_megatrons_forward_on_each_rank(tmp_path):
    """Each rank's file, split the way Megatron-LM's ParallelAttention and swiglu split their input
    (view (ng/tp, np/ng + 2, d, h); chunk(2)), gives exactly that rank's heads and ffn units."""
    model = build("llama-gqa")
    sd = model.state_dict()
    heads, groups, d, f = 4, 2, 8, model.config.ffn_hidden_size
    q_full = sd["layers.0.attention.query.weight"].view(heads, d, -1)  # (np, d, h)
    k_full, v_full = sd["layers.0.attention.key_value.weight"].view(2, groups, d, -1)  # (ng, d, h) each
    gate, up = sd["layers.0.mlp.dense_h_to_4h.weight"].split(f)
    tp = 2
    save_megatron(model, tmp_path, tp=tp)
    for r in range(tp):
        flat = flatten(read_rank(tmp_path / f"release/mp_rank_{r:02d}/model_optim_rng.pt")["model"])
        qkv = flat["language_model.encoder.layers.0.self_attention.query_key_value.weight"]
        x = qkv.view(groups // tp, heads // groups + 2, d, -1)  # Megatron's (ng/tp, np/ng + 2, d, h)
        q, k, v = x[:, :-2].reshape(-1, d, 32), x[:, -2], x[:, -1]
        g = slice(r * groups // tp, (r + 1) * groups // tp)
        assert torch.equal(q, q_full[r * heads // tp:(r + 1) * heads // tp])
        assert torch.equal(k, k_full[g]) and torch.equal(v, v_full[g])
        w_gate, w_up = flat["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"].chunk(2)
        n = f // tp
        assert torch.equal(w_gate, gate[r * n:(r + 1) * n]) and torch.equal(w_up, up[r * n:(r + 1) * n])


def _load_and_reexport(src, dst):
    out = {}
    for name in ("gpt", "llama-gqa"):
        model = build(name, initialize_model_parallel(2), seed=123)  # other weights, then loaded over
        config, full = load_megatron(src / name)
        assert config == model.config
        load_full_state_dict(model, full)
        out[name] = logits(model)
        save_megatron(model, dst / name, tp=1, pp=2, iteration=3)  # gathers the TP shards
    return out


def test_load_into_tp2_ranks_and_export_from_them(tmp_path):
    """Exported at tp2·pp2 from one process, loaded into a model on 2 real gloo TP ranks: the logits
    of the TP=1 model; that TP=2 model exported again at pp=2: the original weights bit for bit."""
    models = {name: build(name) for name in ("gpt", "llama-gqa")}
    for name, model in models.items():
        save_megatron(model, tmp_path / "a" / name, tp=2, pp=2)
    got = launch(_load_and_reexport, 2, tmp_path / "a", tmp_path / "b", timeout=120)
    for name, model in models.items():
        for rank in got:
            torch.testing.assert_close(rank[name], logits(model), rtol=1e-5, atol=1e-5)
        assert_same_state(load_megatron(tmp_path / "b" / name)[1], full_state_dict(model))


def test_other_megatron_spellings_and_bf16(tmp_path):
    """Megatron-DeepSpeed's ``transformer`` (for ``encoder``) and newer Megatron-LM's ``input_norm`` /
    ``post_attention_norm`` / ``final_norm`` read the same; ``dtype=bfloat16`` sets args.bf16."""
    model = build("llama-gqa")
    d = save_megatron(model, tmp_path, tp=2, dtype=torch.bfloat16)
    for r in range(2):
        f = d / f"mp_rank_{r:02d}" / "model_optim_rng.pt"
        state = read_rank(f)
        assert state["args"].bf16 and state["args"].params_dtype == torch.bfloat16
        lm = state["model"]["language_model"]
        lm["transformer"] = {re.sub(r"(input|post_attention|final)_layernorm", r"\1_norm", k): v
                             for k, v in lm.pop("encoder").items()}
        torch.save(state, f)
    config, full = load_megatron(tmp_path)
    want = {k: v.to(torch.bfloat16) for k, v in full_state_dict(model).items()}
    assert config == model.config
    assert_same_state(full, want)


# ---- the real client: Hugging Face's own converters, from a pinned transformers 4.x wheel ---------

def hf_script(name):
    """transformers/models/megatron_gpt2/<name>: from the installed transformers if it still ships it
    (4.x), else from the wheel `make install` downloads (HF_MEGATRON_WHEEL in the Makefile)."""
    import transformers
    installed = Path(transformers.__file__).parent / "models" / "megatron_gpt2" / name
    if installed.is_file():
        return installed.read_bytes()
    makefile = (ROOT / "Makefile").read_text()
    version = re.search(r"^HF_MEGATRON_WHEEL_VERSION \?= (\S+)", makefile, re.M).group(1)
    wheel = ROOT / ".cache" / "wheels" / f"transformers-{version}-py3-none-any.whl"
    assert wheel.is_file(), (f"{wheel} is missing: run `make install` (it downloads the pinned wheel that "
                             "holds Hugging Face's Megatron converters; transformers "
                             f"{transformers.__version__} "
                             "no longer ships them)")
    with zipfile.ZipFile(wheel) as z:
        return z.read(f"transformers/models/megatron_gpt2/{name}")


def run_hf(script, tmp_path, monkeypatch, *argv):
    """Run Hugging Face's script as its own ``__main__`` (in this process: transformers is imported once).

    torch >= 2.6 loads with weights_only=True by default, so Megatron's args need argparse.Namespace
    allowed; transformers 5 dropped ``modeling_utils.shard_checkpoint``, which the reshaping script
    imports (and calls only to cut its output into files): stood in for by "one file, everything"."""
    import transformers.modeling_utils as mu
    path = tmp_path / script
    path.write_bytes(hf_script(script))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [str(path), *map(str, argv)])
    if not hasattr(mu, "shard_checkpoint"):
        def shard_checkpoint(sd, max_shard_size=None, weights_name=mu.WEIGHTS_NAME):
            return {weights_name: sd}, None
        monkeypatch.setattr(mu, "shard_checkpoint", shard_checkpoint, raising=False)
    with torch.serialization.safe_globals([argparse.Namespace]):
        runpy.run_path(str(path), run_name="__main__")


def tiny_tokenizer(path):
    """A local tokenizer for the converters to copy (they would fetch gpt2's from the Hub otherwise)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "a": 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)
    return path


def test_hugging_face_converters_read_our_gpt_export(tmp_path, monkeypatch):
    """convert_megatron_gpt2_checkpoint.py (TP=1, PP=1: one model_optim_rng.pt) and
    checkpoint_reshaping_and_interoperability.py (tp2·pp2: it merges the shards itself) each turn our
    export into a GPT2LMHeadModel whose logits are ours."""
    from transformers import GPT2LMHeadModel
    model = build("gpt")
    tok = tiny_tokenizer(tmp_path / "tok")
    d = save_megatron(model, tmp_path / "meg1", tokenizer_type="PretrainedFromHF",
                      tokenizer_name_or_path=str(tok))  # where the script copies the tokenizer from
    pt = tmp_path / "hf1" / "model_optim_rng.pt"  # it writes the HF model next to the file it reads
    pt.parent.mkdir()
    pt.write_bytes((d / "mp_rank_00" / "model_optim_rng.pt").read_bytes())
    run_hf("convert_megatron_gpt2_checkpoint.py", tmp_path, monkeypatch, pt)
    d2 = save_megatron(model, tmp_path / "meg2", tp=2, pp=2)
    run_hf("checkpoint_reshaping_and_interoperability.py", tmp_path, monkeypatch,
           "--convert_checkpoint_from_megatron_to_transformers", "--load_path", d2,
           "--save_path", tmp_path / "hf2", "--tokenizer_name", tok)
    ours = logits(model)
    for out, vocab in (("hf1", 128), ("hf2", 100)):  # the first keeps Megatron's padded vocab
        hf = GPT2LMHeadModel.from_pretrained(tmp_path / out).eval()
        assert hf.config.vocab_size == vocab
        with torch.no_grad():
            theirs = hf(IDS).logits  # (b, s, V[_pad])
        torch.testing.assert_close(theirs[..., :100], ours, rtol=1e-5, atol=1e-5)
        assert not theirs[..., 100:].any()  # Megatron's padded rows (hf1) are zero


# ---- bad input: one clear line ---------------------------------------------------------------------

class _Boom:
    def __reduce__(self):
        return (os.system, ("touch boom",))


def test_bad_checkpoints_each_get_one_clear_line(tmp_path, monkeypatch):
    model = build("gpt")
    d = save_megatron(model, tmp_path / "ok", tp=2)
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        load_megatron(tmp_path / "nothing")
    (tmp_path / "ok" / "latest_checkpointed_iteration.txt").write_text("iter_7")
    with pytest.raises(CheckpointError, match="not 'release' nor an iteration number"):
        load_megatron(tmp_path / "ok")
    with pytest.raises(CheckpointError, match=r"iter_0000007 is missing \(found \['release'\]\)"):
        load_megatron(tmp_path / "ok", iteration=7)

    rank1 = d / "mp_rank_01" / "model_optim_rng.pt"
    blob = rank1.read_bytes()
    rank1.unlink()
    with pytest.raises(CheckpointError, match="mp_rank_01/model_optim_rng.pt is missing"):
        load_megatron(d)
    rank1.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_megatron(d)
    rank1.write_bytes(blob)
    (d / "mp_rank_01").rename(d / "mp_rank_01_000")
    with pytest.raises(CheckpointError, match=r"args say tp=2 × pp=1.*missing \['mp_rank_01'\], "
                                              r"unexpected \['mp_rank_01_000'\]"):
        load_megatron(d)
    (d / "mp_rank_01_000").rename(d / "mp_rank_01")

    state = read_rank(d / "mp_rank_00" / "model_optim_rng.pt")
    torch.save(state | {"checkpoint_version": 1.0}, d / "mp_rank_00" / "model_optim_rng.pt")
    with pytest.raises(CheckpointError, match="checkpoint_version 1.0; only versions >= 2.0"):
        load_megatron(d)
    monkeypatch.chdir(tmp_path)
    torch.save(state | {"rng_state": _Boom()}, d / "mp_rank_00" / "model_optim_rng.pt")
    with pytest.raises(CheckpointError, match="not unpickled"):
        load_megatron(d)
    assert not (tmp_path / "boom").exists()  # refused, never executed

    with pytest.raises(CheckpointError, match="num_kv_heads=2 is not divisible by tp=4"):
        save_megatron(build("llama-gqa"), tmp_path / "x", tp=4)
    with pytest.raises(CheckpointError, match="num_layers=2 does not split evenly over pp=3"):
        save_megatron(model, tmp_path / "x", pp=3)
    with pytest.raises(CheckpointError, match="pass config=ModelConfig"):
        save_megatron(model.state_dict(), tmp_path / "x")


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = build("llama-gqa")
    save_megatron(model, tmp_path, tp=2)
    calls = []

    def dying_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        torch.serialization.save(obj, path)

    monkeypatch.setattr(meg_io.torch, "save", dying_save)
    with torch.no_grad():
        model.final_norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_megatron(model, tmp_path, tp=2)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".tmp-*"))
    with torch.no_grad():
        model.final_norm.weight.sub_(1.0)
    assert_same_state(load_megatron(tmp_path)[1], full_state_dict(model))
