"""Exercises 12.1/12.2: the references pass their graders; stubs and typical mistakes fail precisely."""
import pytest
import torch

from exercises import _ex12_mistakes as M
from exercises import ex12_generation as ex12
from exercises.grading import GradingError
from minimegatron.generate import generate, top_p_filter
from minimegatron.layers.attention import KVCache


def reference_greedy_decode(model, ids, n):
    return generate(model, ids, n)


def test_references_pass():
    assert ex12.grade_top_p_filter(lambda logits, p: top_p_filter(logits, p)).startswith("✓")
    assert ex12.grade_top_p_filter(M.top_p).startswith("✓")
    assert ex12.grade_greedy_decode(reference_greedy_decode).startswith("✓")
    assert ex12.grade_greedy_decode(M.greedy).startswith("✓")
    assert ex12.TIMEOUT <= 15


def test_the_package_itself_is_refused():
    with pytest.raises(GradingError, match="Exercise 12.1: that is the reference itself"):
        ex12.grade_top_p_filter(top_p_filter)
    with pytest.raises(GradingError, match="Exercise 12.2: that is the reference itself"):
        ex12.grade_greedy_decode(generate)


@pytest.mark.parametrize("entry", M.TOP_P_BATTERY, ids=[b[0] for b in M.TOP_P_BATTERY])
def test_every_top_p_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"^Exercise 12.1, case '.*' \(shape .*\): .*{entry[2]}"):
        ex12.grade_top_p_filter(entry[1])


@pytest.mark.parametrize("entry", M.GREEDY_BATTERY, ids=[b[0] for b in M.GREEDY_BATTERY])
def test_every_greedy_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"^Exercise 12.2 \(prompt of 5 tokens, 8 new\).*{entry[2]}"):
        ex12.grade_greedy_decode(entry[1])


def test_untouched_stubs_fail():
    with pytest.raises(GradingError, match="Exercise 12.1 is not implemented"):
        ex12.grade_top_p_filter(ex12.top_p_filter)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 12.2"):
        ex12.grade_greedy_decode(ex12.greedy_decode)


def test_off_by_one_nucleus_is_explained():
    def inclusive(logits, p):  # drops a token once the mass *including* it reaches p: one too few
        s, order = torch.sort(logits, dim=-1, descending=True)
        drop = s.softmax(-1).cumsum(-1) >= p
        return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))

    with pytest.raises(GradingError, match=r"case 'the example from the docstring'.*the mass INCLUDING each "
                                           r"token was compared"):
        ex12.grade_top_p_filter(inclusive)


def test_renormalising_is_named():
    def renormalised(logits, p):
        return top_p_filter(logits, p).log_softmax(-1)

    with pytest.raises(GradingError, match="the kept logits changed"):
        ex12.grade_top_p_filter(renormalised)


def test_recomputing_without_cache_is_caught():
    def no_cache(model, ids, n):
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
        return ids

    with pytest.raises(GradingError, match=r"fed \[5, 6, 7, 8, 9, 10, 11, 12\] tokens per forward; with "
                                           r"the KV cache it needs \[5, 1, 1, 1, 1, 1, 1, 1\]"):
        ex12.grade_greedy_decode(no_cache)


def test_forgetting_the_prompt_is_named():
    def only_new(model, ids, n):
        return generate(model, ids, n)[:, ids.shape[1]:]

    with pytest.raises(GradingError, match="return the prompt followed by the new tokens"):
        ex12.grade_greedy_decode(only_new)


def test_wrong_positions_give_wrong_tokens():
    def fresh_cache_each_step(model, ids, n):  # loses the context: every token starts at position 0
        out = ids
        with torch.no_grad():
            token = model(ids, kv_cache=KVCache(model.config.num_layers))[:, -1].argmax(-1, keepdim=True)
            for _ in range(n):
                out = torch.cat([out, token], 1)
                token = model(token, kv_cache=KVCache(model.config.num_layers))[:, -1].argmax(-1, keepdim=True)
        return out

    with pytest.raises(GradingError, match="a new KVCache at every step"):
        ex12.grade_greedy_decode(fresh_cache_each_step)
