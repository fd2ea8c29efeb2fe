"""Text generation with a KV cache: greedy, temperature, top-k, top-p and beam search, under TP.

A language model gives ``p(x_t | x_<t)``. Generation appends one token at a time::

    greedy       x_t = argmax_v z_v                               (z = last position's logits)
    temperature  p_v ∝ exp(z_v / T)                                T < 1 sharper, T > 1 flatter
    top-k        keep the k largest z_v, sample among them
    top-p        keep the smallest set of most likely tokens with Σ p ≥ p_top ("nucleus"), sample
    beam search  keep the num_beams best partial sequences by Σ log p; a finished hypothesis is
                 scored Σ log p / (generated length)^length_penalty   (Hugging Face's definition)

KV cache. Step t of naive decoding reruns the whole model on all ``s + t`` tokens. But the keys and
values of earlier tokens never change (causal attention), so each layer caches them
(:class:`~minimegatron.layers.attention.KVCache`): a *prefill* forward on the prompt, then one token
per step. Per step the matmuls shrink from ``s + t`` tokens to 1; attention still reads all
``s + t`` cached keys (:func:`forward_flops` counts both).

Batches: the prompts of one call have equal length (a (b, s) tensor), so no padding or attention mask
is needed; run prompts of different lengths in separate calls. A row that emits EOS is finished: its
later positions hold ``pad_token_id`` (default: the EOS id), as in Hugging Face's ``generate``.

Tensor parallelism: every TP rank runs this same loop on the same prompts. The logits are all-gathered
(identical on every rank); sampling uses a generator seeded alike on all ranks, and the chosen tokens
are additionally broadcast from the first rank of the TP group, so every rank feeds the same token.
Per cached step that is 2 all-reduces of (1, b, h) per layer (forward only: no backward pairs), one
all-gather of the (b, V/tp) logits and one broadcast of b token ids.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.layers.attention import KVCache
from minimegatron.mpu.state import ParallelState

__all__ = ["generate", "beam_search", "top_k_filter", "top_p_filter", "sample_next_token",
           "forward_flops"]

NEG_INF = -1.0e9  # "impossible" score of beam search (finite, so sums stay ordered)


# ---- logits warpers ---------------------------------------------------------------------------------

def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with it are kept). k=0: off."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (b, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= p; others -> -inf.

    Sorted by probability, token j is kept iff the mass of the tokens before it is < p, so the most
    likely token is always kept. p=1: off.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (b, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (b, V)
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """logits (b, V) -> token ids (b,): argmax, or a sample after temperature, top-k, top-p (HF's order)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# ---- helpers ----------------------------------------------------------------------------------------

def _state(model: nn.Module) -> ParallelState:
    state = getattr(model, "state", None) or ParallelState()
    if state.pp > 1:
        raise ValueError("generate() runs a whole model on each TP rank; a pipeline-parallel stage "
                         f"(pp={state.pp}) holds only some layers — generate with pp=1")
    if state.sequence_parallel and state.tp > 1:
        raise ValueError("generate() decodes one token at a time, which cannot be split over the "
                         "sequence: build the model without sequence_parallel (same weights — "
                         "load them with minimegatron.checkpoint.load_full_state_dict)")
    return state


def _same_on_tp_ranks(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Broadcast ``x`` from the first rank of the TP group: every rank continues with its choice."""
    if state.tp > 1:
        dist.broadcast(x, src=state.tp_ranks[0], group=state.tp_group)
    return x


def _eos_tensor(eos_token_id: int | Sequence[int] | None, vocab: int, device) -> torch.Tensor:
    if eos_token_id is None:
        ids = []
    else:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
    if bad:
        raise ValueError(f"eos_token_id {bad} outside the vocabulary [0, {vocab})")
    return torch.tensor(ids, dtype=torch.long, device=device)


def _check(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an integer torch.Tensor of shape (batch, seq) (or (seq,)); "
                        "tokenize the prompt first")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.size(1) == 0 or input_ids.size(0) == 0:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)}: expected (batch, seq) with seq >= 1 "
                         "(start from a BOS token to generate from nothing); prompts of one call have "
                         "equal length — generate prompts of different lengths in separate calls")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"prompt token ids must lie in [0, {vocab}), got range "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    total = input_ids.size(1) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({input_ids.size(1)}) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds max_seq_len={model.config.max_seq_len} (the longest sequence the "
                         "model takes); "
                         "generate fewer tokens or shorten the prompt")
    return input_ids.long()


def _last_logits(model: nn.Module, tokens: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits (b, V) of the last position; with a cache ``tokens`` are only the not-yet-cached ones."""
    return model(tokens, kv_cache=cache)[:, -1, :].float()


# ---- greedy and sampling ------------------------------------------------------------------------------

@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool = False,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int = 0, use_cache: bool = True,
             logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Continue ``input_ids`` (b, s) by up to ``max_new_tokens``; returns (b, s + generated).

    Greedy by default; ``do_sample=True`` samples with ``temperature``/``top_k``/``top_p`` from a
    generator seeded with ``seed`` (the same on all TP ranks); ``num_beams > 1`` runs
    :func:`beam_search`. Stops when every row has produced an EOS or after ``max_new_tokens``.
    ``logits_processor`` maps the last position's logits (b, V) before the choice (your own filter).
    """
    if num_beams != 1:
        if do_sample or logits_processor is not None:
            raise ValueError("beam search here is deterministic and unprocessed: use num_beams > 1 with "
                             "do_sample=False and no logits_processor, or num_beams=1")
        return beam_search(model, input_ids, max_new_tokens, num_beams=num_beams,
                           length_penalty=length_penalty, early_stopping=early_stopping,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=use_cache)
    if not do_sample and (temperature != 1.0 or top_k != 0 or top_p != 1.0):
        raise ValueError("temperature/top_k/top_p shape a distribution to sample from: pass "
                         "do_sample=True (greedy decoding takes the argmax and ignores them)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use do_sample=False for greedy)")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    state = _state(model)
    ids = _check(model, input_ids, max_new_tokens)
    eos = _eos_tensor(eos_token_id, model.config.vocab_size, ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    generator = torch.Generator(device=ids.device).manual_seed(seed) if do_sample else None
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config.num_layers) if use_cache else None
        unfinished = torch.ones(ids.size(0), dtype=torch.bool, device=ids.device)  # (b,)
        feed = ids  # prefill: the whole prompt
        for _ in range(max_new_tokens):
            logits = _last_logits(model, feed, cache)  # (b, V)
            if logits_processor is not None:
                logits = logits_processor(logits)
            token = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator)  # (b,)
            token = _same_on_tp_ranks(token, state)
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            ids = torch.cat([ids, token[:, None]], dim=1)  # (b, s + t + 1)
            unfinished &= ~torch.isin(token, eos)
            if not unfinished.any():
                break
            feed = token[:, None] if use_cache else ids  # (b, 1) with the cache, else everything
    finally:
        model.train(was_training)
    return ids if input_ids.dim() == 2 else ids[0]


# ---- beam search ------------------------------------------------------------------------------------

def _pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (b, n, ...) indexed along dim 1 by index (b, m) -> (b, m, ...)."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)


@torch.no_grad()
def beam_search(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
                num_beams: int = 3, length_penalty: float = 1.0, early_stopping: bool = False,
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
        cache = KVCache(model.config.num_layers) if use_cache else None
        feed = seqs[:, :, :s].reshape(b * K, s)  # (b·K, s)
        for t in range(T):
            cur = s + t  # tokens so far; the new one goes to position cur
            logp = torch.log_softmax(_last_logits(model, feed, cache), dim=-1).view(b, K, V)
            cand = (logp + scores[:, :, None]).view(b, K * V)  # Σ log p of every (beam, token)
            top = _same_on_tp_ranks(torch.topk(cand, keep, dim=-1).indices, state)  # (b, keep)
            top_scores = cand.gather(1, top)  # (b, keep), sorted
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
            if use_cache:
                src = (_pick(beam, nxt) + torch.arange(b, device=dev)[:, None] * K).view(-1)  # (b·K,)
                cache.reorder(src)  # each running beam continues the cache of the beam it extends
                feed = seqs[:, :, cur:cur + 1].reshape(b * K, 1)  # (b·K, 1) the new token
            else:
                feed = seqs[:, :, :cur + 1].reshape(b * K, cur + 1)  # (b·K, cur+1) everything
    finally:
        model.train(was_training)
    out = done_seqs[:, 0, :s + int(done_len[:, 0].max())]  # best hypothesis, cropped to the longest
    return out if input_ids.dim() == 2 else out[0]


# ---- cost of decoding -------------------------------------------------------------------------------

def forward_flops(config, new_tokens: int, context: int, batch: int = 1) -> dict[str, int]:
    """Matmul FLOPs of one forward of ``new_tokens`` attending to ``context`` keys (incl. themselves).

    ``dense``: the weight matmuls, ``2·tokens·(#weights)`` (QKV, dense, MLP, LM head over the padded
    vocab); ``attention``: ``QKᵀ`` and ``probs·V``, ``2·2·new·context·h`` per layer (the causal mask
    is not subtracted). Without a cache step t has new = context = s + t; with it new = 1.
    """
    h, f, L = config.hidden_size, config.ffn_hidden_size, config.num_layers
    kv_out = 2 * config.num_kv_heads * config.head_dim
    up = (2 if config.activation == "swiglu" else 1) * f
    per_token = L * (h * (h + kv_out) + h * h + h * up + f * h) + h * config.padded_vocab_size(1)
    dense = 2 * batch * new_tokens * per_token
    attention = L * 2 * 2 * batch * new_tokens * context * h
    return {"dense": dense, "attention": attention, "total": dense + attention}
