"""Text generation with a KV cache: greedy, temperature, top-k, top-p and beam search, under TP and PP.

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

Batches: prompts of different lengths share one call *left-padded* to a (b, s) tensor, with
``attention_mask`` (b, s) 0 on the pads (Hugging Face's ``generate``, Megatron's ``megatron_generate``).
The pads come first, so every row's last prompt token is at column s-1 and all rows generate in step;
the pad keys are masked in the prefill and in every cached step (the KV cache carries the mask), and
positions count only real tokens (``cumsum(mask) - 1``): each row decodes as it would alone. Without a
mask (or with no zero in it) the unmasked path runs, unchanged. A row that emits EOS is finished: its
later positions hold ``pad_token_id`` (default: the EOS id), as in Hugging Face's ``generate``.

Tensor parallelism: every TP rank runs this same loop on the same prompts. The logits are all-gathered
(identical on every rank); sampling uses a generator seeded alike on all ranks, and the chosen tokens
are additionally broadcast from the first rank of the TP group, so every rank feeds the same token.
Per cached step that is 2 all-reduces of (1, b, h) per layer (forward only: no backward pairs), one
all-gather of the (b, V/tp) logits and one broadcast of b token ids.

Pipeline parallelism: ``generate`` on a stage of a ``minimegatron.pipe.LanguageModelPipe`` runs the
same loop on every rank of the TP×PP grid; the forward goes stage to stage and the last stage chooses
(``generate_pipe.py``, with its communication count).

Beam search (``num_beams > 1``) is in ``generate_beam.py``; the checks and helpers both loops share
(the prompt and its mask, the EOS ids, the :class:`~minimegatron.generate_helpers.Decoder` that feeds
the model and broadcasts the choice) are in ``generate_helpers.py``, below both.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from minimegatron.generate_beam import beam_search
from minimegatron.generate_helpers import _check, _check_mask, _decoder, _eos_tensor, _state

__all__ = ["generate", "top_k_filter", "top_p_filter", "sample_next_token", "forward_flops"]


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


# ---- greedy and sampling ------------------------------------------------------------------------------

@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool = False,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int = 0, use_cache: bool = True,
             logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Continue ``input_ids`` (b, s) by up to ``max_new_tokens``; returns (b, s + generated).

    ``attention_mask`` (b, s): 1 on prompt tokens, 0 on the left padding of shorter prompts (right
    padding, an all-pad row or another shape is refused).

    Greedy by default; ``do_sample=True`` samples with ``temperature``/``top_k``/``top_p`` from a
    generator seeded with ``seed`` (the same on all TP ranks); ``num_beams > 1`` runs
    :func:`minimegatron.generate_beam.beam_search`. Stops when every row has produced an EOS or after ``max_new_tokens``.
    ``logits_processor`` maps the last position's logits (b, V) before the choice (your own filter).
    """
    if num_beams != 1:
        if do_sample or logits_processor is not None:
            raise ValueError("beam search here is deterministic and unprocessed: use num_beams > 1 with "
                             "do_sample=False and no logits_processor, or num_beams=1")
        return beam_search(model, input_ids, max_new_tokens, attention_mask=attention_mask,
                           num_beams=num_beams,
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
    prompt_mask = _check_mask(attention_mask, ids)
    eos = _eos_tensor(eos_token_id, model.config.vocab_size, ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    generator = torch.Generator(device=ids.device).manual_seed(seed) if do_sample else None
    was_training = model.training
    model.eval()
    try:
        decoder = _decoder(model, state, prompt_mask, use_cache)
        unfinished = torch.ones(ids.size(0), dtype=torch.bool, device=ids.device)  # (b,)
        feed = ids  # prefill: the whole prompt
        for _ in range(max_new_tokens):
            logits = decoder.step(feed)  # (b, V); None on a pipeline stage before the last
            if logits is None:
                token = torch.empty(ids.size(0), dtype=torch.long, device=ids.device)  # to receive
            else:
                if logits_processor is not None:
                    logits = logits_processor(logits)
                token = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator)  # (b,)
            token = decoder.share(token)  # every rank feeds the same token
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            ids = torch.cat([ids, token[:, None]], dim=1)  # (b, s + t + 1)
            unfinished &= ~torch.isin(token, eos)
            if not unfinished.any():
                break
            feed = token[:, None]  # (b, 1): the decoder caches (or keeps) the rest
    finally:
        model.train(was_training)
    return ids if input_ids.dim() == 2 else ids[0]


# ---- cost of decoding -------------------------------------------------------------------------------

def forward_flops(config, new_tokens: int, context: int, batch: int = 1) -> dict[str, int]:
    """Matmul FLOPs of one forward of ``new_tokens`` attending to ``context`` keys (incl. themselves).

    ``dense``: the weight matmuls, ``2·tokens·(#weights)`` (QKV, dense, MLP, LM head over the padded
    vocab); ``attention``: ``QKᵀ`` and ``probs·V``, ``2·2·new·context·h`` per layer (the causal mask
    is not subtracted; ``h`` there is heads·head_dim, the hidden size unless ``head_dim`` is set).
    Without a cache step t has new = context = s + t; with it new = 1.
    """
    h, f, L, a = config.hidden_size, config.ffn_hidden_size, config.num_layers, config.attention_width
    kv_out = 2 * config.num_kv_heads * config.head_dim
    up = (2 if config.activation == "swiglu" else 1) * f
    per_token = L * (h * (a + kv_out) + a * h + h * up + f * h) + h * config.padded_vocab_size(1)
    dense = 2 * batch * new_tokens * per_token
    attention = L * 2 * 2 * batch * new_tokens * context * a
    return {"dense": dense, "attention": attention, "total": dense + attention}
