"""Exercise 12: generation.

12.1  top_p_filter — nucleus sampling's filter.

Given logits (..., V) and 0 < p <= 1, keep the smallest set of most likely tokens whose probabilities
sum to at least p and set every other logit to -inf; leave the kept logits unchanged (the softmax
renormalises them). Sorted by probability, token j is kept iff the mass of the tokens *before* it is
< p — so the most likely token is always kept. Example: probs [0.5, 0.05, 0.3, 0.15], p = 0.8 keeps
tokens 0 and 2 (0.5 + 0.3 >= 0.8).

12.2  greedy_decode — greedy decoding with a KV cache.

Return input_ids (b, s) followed by max_new_tokens greedy tokens: (b, s + max_new_tokens). Make one
KVCache(model.config.num_layers), run the whole prompt once (prefill: model(input_ids, kv_cache=cache)
gives logits (b, s, V)), take the argmax of the last position, and from then on feed only the new
token (b, 1): the cache holds the keys and values of everything before it. No EOS handling.

Grade them with:  grade_top_p_filter(top_p_filter)
                  grade_greedy_decode(greedy_decode)
The references are minimegatron.generate.top_p_filter and minimegatron.generate.generate; the
graders run your code on 2 real tensor-parallel ranks too (every rank must pick the same tokens).
"""
from __future__ import annotations

from typing import Callable

import torch

from exercises import _ex12_mistakes as M
from exercises.battery import refuse_reference
from exercises.grading import (GradingError, assert_close, call_candidate, grader, kind_of, passed, run_graded,
                               run_isolated)

TIMEOUT = 15.0  # s (per part): a 2-layer LLaMA of width 32 on 2 ranks, a dozen tokens
from minimegatron.generate import generate
from minimegatron.generate import top_p_filter as reference_top_p_filter


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Your code: logits with every token outside the top-p nucleus set to -inf (same shape)."""
    # Hint: torch.sort(logits, dim=-1, descending=True) gives the sorted logits and their token ids;
    # softmax + cumsum gives the mass up to and including each token; subtract the token's own
    # probability for the mass *before* it. Scatter the drop mask back to vocab order
    # (mask.scatter(-1, order, mask_sorted)) and use masked_fill(mask, float("-inf")).
    raise NotImplementedError("Exercise 12.1: implement top_p_filter — sort, cumulative softmax mass, "
                              "drop tokens whose preceding mass is already >= p")


def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Your code: (b, s + max_new_tokens) = prompt + greedy tokens, one forward per token with a KV cache."""
    # Hint: from minimegatron.layers.attention import KVCache; cache = KVCache(model.config.num_layers).
    # Inside torch.no_grad(): logits = model(tokens, kv_cache=cache)[:, -1]; next = logits.argmax(-1).
    raise NotImplementedError("Exercise 12.2: implement greedy_decode — prefill the prompt once, then "
                              "feed one token per step with the KV cache")


# --- grading -----------------------------------------------------------------------------------------

def _top_p_cases() -> list[tuple[str, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(12)
    peaked = torch.randn(4, 50, generator=g) * 4
    topk = torch.randn(3, 30, generator=g) * 2
    topk[topk < topk.topk(8, dim=-1).values[:, -1:]] = float("-inf")  # already top-k filtered
    return [
        ("the example from the docstring", torch.tensor([[0.5, 0.05, 0.3, 0.15]]).log(), 0.8),
        ("random logits, p=0.9", torch.randn(5, 40, generator=g), 0.9),
        ("random logits, p=0.5", torch.randn(5, 40, generator=g), 0.5),
        ("peaked logits, p=0.95", peaked, 0.95),
        ("tiny p keeps only the top token", torch.randn(4, 40, generator=g), 1e-6),
        ("p=1 keeps everything", torch.randn(2, 10, generator=g), 1.0),
        ("logits already top-k filtered (-inf present)", topk, 0.7),
        ("3-D logits (b, s, V)", torch.randn(2, 3, 25, generator=g), 0.6),
    ]


@grader
def grade_top_p_filter(candidate: Callable[[torch.Tensor, float], torch.Tensor],
                       timeout: float = TIMEOUT) -> str:
    """Compare with the reference on several cases, then sample with it on 2 TP ranks.

    Returns "✓ ..." (and prints it); raises GradingError naming the case, the row and the difference.
    Both parts run in separate processes, each within ``timeout`` s: an exception or an endless loop
    in ``candidate`` is reported as a GradingError too."""
    refuse_reference("Exercise 12.1", candidate, reference_top_p_filter)
    run_isolated(_check_top_p_cases, candidate, timeout=timeout, role="top_p_filter")
    results = run_graded(_sample_on_ranks, 2, candidate, timeout=timeout)
    for rank, (got, expected) in enumerate(results):
        assert_close(f"Exercise 12.1: tokens sampled with your filter (top_p=0.7) on TP rank {rank}",
                     got, expected)
    return passed("Exercise 12.1: top_p_filter matches the reference on 8 cases and samples the same "
                  "tokens on 2 tensor-parallel ranks")


def _check_top_p_cases(candidate: Callable) -> None:
    for name, logits, p in _top_p_cases():
        where = f"Exercise 12.1, case '{name}' (shape {tuple(logits.shape)}, p={p})"
        expected = reference_top_p_filter(logits, p)
        got = call_candidate(where, candidate, logits.clone(), p, exercise="Exercise 12.1")
        if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else kind_of(got)
            raise GradingError(f"{where}: got {shape}, expected a tensor of shape {tuple(logits.shape)}")
        if got.dtype != logits.dtype:
            raise GradingError(f"{where}: got dtype {got.dtype}, expected the logits' {logits.dtype}")
        kept, want = ~torch.isneginf(got), ~torch.isneginf(expected)
        if not torch.equal(kept, want):
            for switches, message in M.TOP_P_MODELS:  # the mistake that explains every case
                if all(_same_nucleus(candidate, M.top_p_with(**switches), z, q) for _, z, q in _top_p_cases()):
                    raise GradingError(f"{where}: {message}")
            row = tuple(int(i) for i in torch.nonzero((kept != want).any(-1))[0])
            probs = logits.softmax(-1)[row]
            raise GradingError(
                f"{where}: row {row} keeps {int(kept[row].sum())} tokens (probability mass "
                f"{probs[kept[row]].sum():.4f}), expected {int(want[row].sum())} (mass "
                f"{probs[want[row]].sum():.4f}): keep the smallest set of most likely tokens whose mass "
                f"reaches p — a token stays iff the mass strictly before it is < p")
        if not torch.equal(got[kept], logits[kept]):
            raise GradingError(f"{where}: the kept logits changed; leave them as they are (set only the "
                               "dropped ones to -inf — the softmax renormalises)")


def _same_nucleus(candidate: Callable, model: Callable, logits: torch.Tensor, p: float) -> bool:
    got = call_candidate("Exercise 12.1", candidate, logits.clone(), p, exercise="Exercise 12.1")
    return isinstance(got, torch.Tensor) and got.shape == logits.shape and \
        torch.equal(~torch.isneginf(got), ~torch.isneginf(model(logits.clone(), p)))


def _tiny_model(state):
    from minimegatron.config import llama_config
    from minimegatron.llama import LLaMAModel
    torch.manual_seed(0)
    config = llama_config(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                          num_kv_heads=2, max_seq_len=64, init_std=0.3)
    return LLaMAModel(config, state).eval()


def _sample_on_ranks(candidate):
    from minimegatron.mpu.state import initialize_model_parallel
    model = _tiny_model(initialize_model_parallel(2))
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    got = generate(model, ids, 12, do_sample=True, seed=4, logits_processor=lambda z: candidate(z, 0.7))
    return got, generate(model, ids, 12, do_sample=True, seed=4, top_p=0.7)


def _decode_on_ranks(candidate, prompt_len: int, new: int):
    from minimegatron.mpu.state import initialize_model_parallel
    model = _tiny_model(initialize_model_parallel(2))
    ids = torch.randint(0, 64, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    fed: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(args[0].shape[1]),
                                           with_kwargs=True)
    got = candidate(model, ids.clone(), new)
    hook.remove()
    if isinstance(got, torch.Tensor):
        got = got.detach()
    with torch.no_grad():
        first = model(ids)[:, -1].argmax(-1)  # (b,) the most likely token after the prompt
    return got, generate(model, ids, new), fed, _fresh_cache_each_step(model, ids, new), first


def _fresh_cache_each_step(model, ids, n):
    """What greedy decoding gives when every step starts a new cache (the context and positions lost)."""
    from minimegatron.layers.attention import KVCache
    out = ids
    with torch.no_grad():
        token = model(ids, kv_cache=KVCache(model.config.num_layers))[:, -1].argmax(-1, keepdim=True)
        for step in range(n):
            out = torch.cat([out, token], 1)
            if step + 1 < n:
                token = model(token, kv_cache=KVCache(model.config.num_layers))[:, -1].argmax(-1, keepdim=True)
    return out


@grader
def grade_greedy_decode(candidate: Callable[..., torch.Tensor], timeout: float = TIMEOUT) -> str:
    """Run ``candidate(model, ids, n)`` on 2 TP ranks of a tiny LLaMA; compare with generate() and check
    that it feeds the prompt once and then one token per step (the KV cache at work)."""
    refuse_reference("Exercise 12.2", candidate, generate)
    for prompt_len, new in ((5, 8), (1, 4)):
        where = f"Exercise 12.2 (prompt of {prompt_len} tokens, {new} new)"
        for rank, (got, expected, fed, fresh, first) in enumerate(run_graded(_decode_on_ranks, 2, candidate,
                                                                             prompt_len, new, timeout=timeout)):
            if isinstance(got, torch.Tensor) and got.shape == expected.shape[:1] + (new,):
                raise GradingError(f"{where}: got shape {tuple(got.shape)} — return the prompt followed by "
                                   f"the new tokens, shape {tuple(expected.shape)}")
            want = [prompt_len] + [1] * (new - 1)
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and \
                    not torch.equal(got, expected) and torch.equal(got, fresh):
                raise GradingError(f"{where}: a new KVCache at every step: the cache must carry the keys and "
                                   "values of every earlier token (and their positions) — make ONE cache and "
                                   "pass it to every forward")
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and \
                    not torch.equal(got[:, prompt_len], first):
                # the first new token follows the prompt alone: no cache or position bug can change it yet
                raise GradingError(f"{where}: the first new token is {got[:, prompt_len].tolist()}, but the "
                                   f"most likely token after each prompt is {first.tolist()}: greedy decoding "
                                   "takes the argmax of the last position's logits (no sampling, temperature "
                                   "or top-k)")
            assert_close(f"{where}, TP rank {rank}: generated ids", got, expected)
            if fed != want:
                raise GradingError(f"{where}: the model was fed {fed} tokens per forward; with the KV cache "
                                   f"it needs {want}: the prompt once, then only the newest token")
    return passed("Exercise 12.2: greedy_decode equals generate() on 2 tensor-parallel ranks, feeding "
                  "the prompt once and then one token per step")
