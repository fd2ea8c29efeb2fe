"""Beam search with a KV cache: the ``num_beams`` best continuations by Σ log p, under TP.

Each step extends every running beam by every token and keeps the best candidates (Hugging Face's
algorithm and scoring)::

    score(running beam)  = Σ_t log p(x_t | x_<t)
    score(finished hyp.) = Σ_t log p(x_t | x_<t) / (generated length)^length_penalty

``length_penalty > 0`` favours longer hypotheses, ``< 0`` shorter ones. The beams of one prompt are
rows of one batch (b·K, s): the KV cache is reordered after each step so that every surviving beam
continues the cache of the beam it extends (``KVCache.reorder``).

Padded prompts (``attention_mask``, left padding): each prompt's mask is repeated for its K beams and
grows by a 1 per generated token; the cache carries it and reorders it with the beams.

Tensor and pipeline parallelism: as in ``generate.py``, every rank runs this loop; the rank that has
the logits (the first TP rank; under PP, of the last stage) broadcasts the chosen candidates — their
(b, keep) indices and scores — so all ranks keep the same beams and reorder their caches alike.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from minimegatron.generate_helpers import _check, _check_mask, _decoder, _eos_tensor, _state

__all__ = ["beam_search"]

NEG_INF = -1.0e9  # "impossible" score of beam search (finite, so sums stay ordered)


def _pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (b, n, ...) indexed along dim 1 by index (b, m) -> (b, m, ...)."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)


@torch.no_grad()
def beam_search(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
                attention_mask: torch.Tensor | None = None, num_beams: int = 3,
                length_penalty: float = 1.0, early_stopping: bool = False,
                eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                use_cache: bool = True) -> torch.Tensor:
    """The best of ``num_beams`` hypotheses per prompt, Hugging Face's algorithm and scoring.

    Each step extends every running beam by every token, keeps the ``keep = max(2, 1 + #eos)·num_beams``
    best candidates by Σ log p; candidates ending in EOS (or at the length limit) among the top
    ``num_beams`` enter the finished pool with score Σ log p / generated_len^length_penalty, and the
    best ``num_beams`` others run on. Stops when the best running beam cannot beat the worst finished
    one (``early_stopping=False``) or when ``num_beams`` are finished (``True``).
    """
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if early_stopping not in (True, False):
        raise ValueError(f"early_stopping must be True or False, got {early_stopping!r}")
    state = _state(model)
    prompt = _check(model, input_ids, max_new_tokens)
    prompt_mask = _check_mask(attention_mask, prompt)  # (b, s) or None
    b, s = prompt.shape
    K, V, T = num_beams, model.config.vocab_size, max_new_tokens
    eos = _eos_tensor(eos_token_id, V, prompt.device)
    keep = max(2, 1 + len(eos)) * K  # candidates kept per step: enough to survive K EOS endings
    if keep > K * V:
        raise ValueError(f"num_beams={K} needs {keep} candidates per step but the vocabulary has {V}")
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    dev = prompt.device
    seqs = torch.full((b, K, s + T), pad, dtype=torch.long, device=dev)  # running beams
    seqs[:, :, :s] = prompt[:, None]
    scores = torch.zeros(b, K, device=dev)  # Σ log p of each running beam
    scores[:, 1:] = NEG_INF  # all beams start equal: let only beam 0 expand at the first step
    done_seqs, done_scores = seqs.clone(), torch.full((b, K), NEG_INF, device=dev)  # finished pool
    done_len = torch.zeros(b, K, dtype=torch.long, device=dev)
    done = torch.zeros(b, K, dtype=torch.bool, device=dev)
    can_improve = torch.ones(b, dtype=torch.bool, device=dev)
    is_top = torch.arange(keep, device=dev) < K  # (keep,) only these candidates may finish
    was_training = model.training
    model.eval()
    try:
        beam_mask = None if prompt_mask is None else prompt_mask.repeat_interleave(K, dim=0)  # (b·K, s)
        decoder = _decoder(model, state, beam_mask, use_cache)
        feed = seqs[:, :, :s].reshape(b * K, s)  # (b·K, s)
        for t in range(T):
            cur = s + t  # tokens so far; the new one goes to position cur
            logits = decoder.step(feed)  # (b·K, V); None on a pipeline stage before the last
            if logits is None:  # receive the choice
                top_scores = torch.empty(b, keep, device=dev)
                top = torch.empty(b, keep, dtype=torch.long, device=dev)
            else:
                logp = torch.log_softmax(logits, dim=-1).view(b, K, V)
                cand = (logp + scores[:, :, None]).view(b, K * V)  # Σ log p of every (beam, token)
                top_scores, top = torch.topk(cand, keep, dim=-1)  # (b, keep), sorted
            top, top_scores = decoder.share(top), decoder.share(top_scores)  # the same on every rank
            beam, token = top // V, top % V  # which beam each candidate extends, with which token
            cand_seqs = _pick(seqs, beam)  # (b, keep, s + T)
            cand_seqs[:, :, cur] = token
            ends = torch.isin(token, eos) | (t == T - 1)  # (b, keep)
            # finished pool: merge the top-K candidates that just ended, length-penalised
            new = top_scores / float(t + 1) ** length_penalty
            blocked = ~(ends & is_top) | ~can_improve[:, None]
            if early_stopping:
                blocked |= done.all(dim=1, keepdim=True)
            new = new + blocked.float() * NEG_INF
            best = torch.topk(torch.cat([done_scores, new], 1), K, dim=1).indices  # (b, K)
            done_seqs = _pick(torch.cat([done_seqs, cand_seqs], 1), best)
            done_scores = _pick(torch.cat([done_scores, new], 1), best)
            done_len = _pick(torch.cat([done_len, torch.full_like(new, t + 1, dtype=torch.long)], 1), best)
            done = _pick(torch.cat([done, ~blocked], 1), best)
            # running beams: the K best candidates that did not end
            alive = top_scores + ends.float() * NEG_INF
            nxt = torch.topk(alive, K, dim=1).indices  # (b, K)
            seqs, scores = _pick(cand_seqs, nxt), _pick(alive, nxt)
            # can a running beam still beat the worst finished one? (HF's heuristic, current length)
            worst = torch.where(done, done_scores.min(dim=1, keepdim=True).values, NEG_INF)
            can_improve &= (scores[:, :1] / float(t + 1) ** length_penalty > worst).any(dim=1)
            if not can_improve.any() or ends.all() or (early_stopping and done.all()):
                break
            src = (_pick(beam, nxt) + torch.arange(b, device=dev)[:, None] * K).view(-1)  # (b·K,)
            decoder.reorder(src)  # each running beam continues the cache (and mask) of the beam it extends
            feed = seqs[:, :, cur:cur + 1].reshape(b * K, 1)  # (b·K, 1) the new token
    finally:
        model.train(was_training)
    out = done_seqs[:, 0, :s + int(done_len[:, 0].max())]  # best hypothesis, cropped to the longest
    return out if input_ids.dim() == 2 else out[0]
