"""Exercise 12's battery: plausible wrong nucleus filters and greedy decoders, each with the message its
grader must give; 12.1's grader names a wrong filter by comparing it with these mistakes' results
(``TOP_P_MODELS``)."""
from __future__ import annotations

import torch

from minimegatron.generate import generate, top_p_filter
from minimegatron.layers.attention import KVCache


def top_p(logits, p, *, inclusive=False, ascending=False, unscattered=False, on_logits=False, renormalise=False):
    """The nucleus filter with the usual mistakes as switches (the defaults are right)."""
    s, order = torch.sort(logits, dim=-1, descending=not ascending)
    probs = s if on_logits else s.softmax(-1)
    mass = probs.cumsum(-1) if inclusive else probs.cumsum(-1) - probs  # the mass up to / before each token
    drop = mass >= p
    mask = drop if unscattered else drop.scatter(-1, order, drop)
    out = logits.masked_fill(mask, float("-inf"))
    return out.log_softmax(-1) if renormalise else out


def top_p_with(**switches):
    def my_top_p_filter(logits, p):
        return top_p(logits, p, **switches)
    return my_top_p_filter


TOP_P_MODELS = [  # (switches, message)
    (dict(inclusive=True), "the mass INCLUDING each token was compared with p, so the token that crosses p was "
                           "dropped: a token stays iff the mass strictly BEFORE it is < p"),
    (dict(ascending=True), "the least likely tokens were kept: sort in descending order of probability"),
    (dict(unscattered=True), "the drop mask is in sorted order: scatter it back to vocabulary order "
                             "(mask.scatter(-1, order, mask_sorted))"),
    (dict(on_logits=True), "the cumulative sum of the logits was compared with p: softmax first, the nucleus is "
                           "a set of PROBABILITY mass"),
]
TOP_P_BATTERY = [(message.split(":")[0], top_p_with(**switches), message.split(":")[0].replace("(", r"\(")
                  .replace(")", r"\)")) for switches, message in TOP_P_MODELS] + [
    ("renormalised", top_p_with(renormalise=True), r"the kept logits changed"),
    ("a bool mask", lambda logits, p: top_p(logits, p) == float("-inf"), r"got dtype torch.bool"),
]


def greedy(model, ids, n, *, cache=True, prompt=True, fresh_cache=False):
    """Greedy decoding with the usual mistakes as switches (the defaults are right)."""
    out = ids
    with torch.no_grad():
        if not cache:
            for _ in range(n):
                out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], 1)
            return out if prompt else out[:, ids.shape[1]:]
        kv = KVCache(model.config.num_layers)
        token = model(ids, kv_cache=kv)[:, -1].argmax(-1, keepdim=True)
        for step in range(n):
            out = torch.cat([out, token], 1)
            if step + 1 < n:
                token = model(token, kv_cache=KVCache(model.config.num_layers) if fresh_cache else kv)[:, -1] \
                    .argmax(-1, keepdim=True)
    return out if prompt else out[:, ids.shape[1]:]


def greedy_with(**switches):
    def greedy_decode(model, ids, n):
        return greedy(model, ids, n, **switches)
    return greedy_decode


GREEDY_BATTERY = [
    ("no KV cache", greedy_with(cache=False), r"fed \[5, 6, 7, 8, 9, 10, 11, 12\] tokens per forward; with the KV "
                                              r"cache it needs \[5, 1, 1, 1, 1, 1, 1, 1\]"),
    ("the prompt left out", greedy_with(prompt=False), r"return the prompt followed by the new tokens"),
    ("a fresh cache each step", greedy_with(fresh_cache=True), r"a new KVCache at every step"),
    ("sampling, not argmax", lambda model, ids, n: generate(model, ids, n, do_sample=True, seed=0),
     r"the first new token is .* but the most likely token after each prompt is .*: greedy decoding takes "
     r"the argmax"),
    ("one token too many", lambda model, ids, n: generate(model, ids, n + 1), r"wrong shape \(2, 14\)"),
]
