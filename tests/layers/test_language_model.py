"""LanguageModel (the body of GPTModel and LLaMAModel): the tied head after load_state_dict(assign=True),
and the input checks of forward (dtype, position_ids shape, max_seq_len for every position kind)."""
import re

import pytest
import torch

from minimegatron.config import gpt_config, llama_config
from minimegatron.gpt import GPTModel
from minimegatron.layers.language_model import LanguageModel
from minimegatron.llama import KVCache, LLaMAModel

SMALL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, max_seq_len=16,
             make_vocab_size_divisible_by=8)


def _hidden_before_head(model, ids):
    """The final-norm output (b, s, h), captured by a hook on the head's input."""
    seen = {}
    handle = model.lm_head.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0]))
    model(ids)
    handle.remove()
    return seen["h"].transpose(0, 1)  # (s, b, h) -> (b, s, h)


def test_tied_head_follows_the_embedding_after_load_state_dict_with_assign():
    torch.manual_seed(0)
    model = GPTModel(gpt_config(**SMALL)).eval()
    torch.manual_seed(1)
    other = GPTModel(gpt_config(**SMALL))
    sd = {k: v.clone() for k, v in other.state_dict().items()}
    assert "lm_head.weight" not in sd  # tied: one table
    model.load_state_dict(sd, assign=True)  # replaces the embedding's Parameter object
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids)
        table = model.embedding.word_embeddings.weight[:64]  # (V, h), the LOADED table
        expected = _hidden_before_head(model, ids) @ table.T  # logits = h·Eᵀ with the loaded E
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, other.eval()(ids), rtol=1e-5, atol=1e-5)
    assert not list(model.lm_head.parameters())  # the tied head owns no weight: one table, not two copies
    model.zero_grad()
    model(ids, ids).backward()  # both uses of the table reach the one parameter
    assert model.embedding.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("make", [lambda: GPTModel(gpt_config(**SMALL)),
                                  lambda: LLaMAModel(llama_config(**SMALL))], ids=["gpt", "llama"])
def test_float_token_ids_raise_a_type_error_naming_the_fix(make):
    with pytest.raises(TypeError, match=r"integer token ids.*torch.float32.*input_ids.long\(\)"):
        make()(torch.tensor([[1.0, 2.0]]))


def test_position_ids_must_be_batch_by_seq_or_one_by_seq():
    torch.manual_seed(0)
    model = LLaMAModel(llama_config(**SMALL)).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        default = model(ids)
        torch.testing.assert_close(model(ids, position_ids=torch.arange(6)[None]), default)
        torch.testing.assert_close(model(ids, position_ids=torch.arange(6).expand(2, 6)), default)
    for bad in (torch.arange(5)[None], torch.arange(6), torch.arange(6).expand(3, 6)):
        with pytest.raises(ValueError, match=re.escape(f"position_ids shape {tuple(bad.shape)}") + r".*input_ids "
                                             r"shape \(2, 6\)"):
            model(ids, position_ids=bad)


@pytest.mark.parametrize("positions", ["learned", "rope", "alibi"])
def test_every_position_kind_stops_at_max_seq_len(positions):
    model = LLaMAModel(llama_config(**SMALL, position_embedding=positions))
    assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 64)  # exactly max_seq_len: fine
    with pytest.raises(ValueError, match=r"sequence length 17 .* max_seq_len=16: shorten the input"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = KVCache(model.config.num_layers)
    with torch.no_grad():
        model(torch.zeros(1, 12, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match=r"sequence length 17 \(cached 12 \+ new 5\)"):
            model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_gpt_and_llama_are_one_language_model_with_two_configs():
    """The porting story: the two classes add no layers of their own, only their flavour's config."""
    gpt, llama = GPTModel(gpt_config(**SMALL)), LLaMAModel(llama_config(**SMALL))
    assert type(gpt).__mro__[1] is LanguageModel and type(llama).__mro__[1] is LanguageModel
    as_base = LanguageModel(llama.config)
    assert as_base.state_dict().keys() == llama.state_dict().keys()


def test_weights_are_drawn_per_layer_index():
    """Layer i's weights depend on (seed, i) only: torch.manual_seed(s) first or init_seed=s build the
    same model, and the bare stack (ParallelTransformer) holds the same layers; unseeded models differ."""
    from minimegatron.layers.transformer import ParallelTransformer

    config = gpt_config(**SMALL)
    torch.manual_seed(5)
    seeded_first, second = GPTModel(config).state_dict(), GPTModel(config).state_dict()
    by_seed = GPTModel(config, init_seed=5).state_dict()
    assert all(torch.equal(seeded_first[k], by_seed[k]) for k in by_seed)
    assert not torch.equal(second["layers.0.mlp.dense_h_to_4h.weight"],
                           by_seed["layers.0.mlp.dense_h_to_4h.weight"])  # the next draw: a new model
    stack = ParallelTransformer(config, init_seed=5).state_dict()
    assert all(torch.equal(v, by_seed[k]) for k, v in stack.items())  # layers.* and final_norm.*
