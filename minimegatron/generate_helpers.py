"""What greedy/sampled decoding (``generate.py``) and beam search (``generate_beam.py``) share.

Both loops check the prompt, its attention mask and the model the same way, turn ``eos_token_id`` into
a tensor, and drive the model through a :class:`Decoder`: ``step(new tokens) -> last logits``, then
``share(choice)`` so that every rank feeds the same token. Those helpers live here, below both files,
so that neither imports the other's internals.

Left padding (prompts of different lengths in one (b, s) batch, as Hugging Face's ``generate`` and
Megatron's ``megatron_generate`` take them): ``attention_mask`` (b, s) is 0 on the pads, which come
first in their row, and 1 on the prompt. The decoder keeps the mask of every token so far — the prompt
mask, then a 1 per generated token — and hands it to the KV cache (``KVCache.key_mask``), so every
layer hides the pad keys in the prefill and in each cached step. Positions count the real tokens,
``position_ids = cumsum(mask) - 1`` (pads: 1, unused), as Hugging Face does: a row's first real token
is at position 0 whatever its padding, for RoPE and for learned positions alike.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.layers.attention import KVCache
from minimegatron.mpu.state import ParallelState

__all__: list[str] = []  # internal to generate.py and generate_beam.py


def is_pipeline(model: nn.Module) -> bool:
    """A DeepSpeed ``PipelineModule`` stage (``minimegatron.pipe``), told apart without importing it."""
    return hasattr(model, "forward_funcs") and hasattr(model, "layer_range")


def _state(model: nn.Module) -> ParallelState:
    state = getattr(model, "state", None) or ParallelState()
    if state.pp > 1 and not is_pipeline(model):
        raise ValueError(f"a whole model built on a pipeline-parallel state (pp={state.pp}): generate "
                         "on its pipeline stages (minimegatron.pipe.LanguageModelPipe), or build it with pp=1")
    if state.sequence_parallel:
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
                         "(start from a BOS token to generate from nothing); prompts of different "
                         "lengths: left-pad them and pass attention_mask")
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


def _check_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The prompt's key mask (b, s) bool, or None when there is no padding (the unmasked fast path)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError("attention_mask must be a torch.Tensor of 0/1 (or bool) like input_ids, got "
                        f"{type(attention_mask).__name__}")
    mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}: one 0/1 per prompt token (0 = left pad)")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
    mask = mask.bool()
    if not bool(mask[:, -1].all()):
        raise ValueError(f"attention_mask rows {(~mask.any(1)).nonzero()[:, 0].tolist()} are all pads"
                         if not bool(mask.any(1).all()) else
                         "attention_mask ends in 0: that is right padding; pad on the left (the "
                         "tokenizer's padding_side='left'), so every prompt ends where generation starts")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask has a pad after a token: only left padding is supported "
                         "(0s first, then 1s, in every row)")
    return None if bool(mask.all()) else mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(b, s) positions of a left-padded batch: real tokens count 0, 1, … (pads: 1), as in HF."""
    pos = mask.long().cumsum(-1) - 1  # (b, s)
    return pos.masked_fill(~mask, 1)


class Decoder:
    """This rank's side of a decoding loop on a whole model (pp = 1; ``generate_pipe`` for stages).

    ``step(new)`` feeds the tokens not seen yet — the prompt, then one per row — and returns the last
    position's logits (b, V) (or None on a rank that computes none: a pipeline stage before the last).
    With ``use_cache=False`` it keeps every token and reruns them all (full recomputation).
    ``reorder(rows)`` keeps/reorders batch rows (beam search); ``share(x)`` broadcasts a choice from
    the rank that made it (here: the first of the TP group) to every rank of the model.
    """

    def __init__(self, model: nn.Module, state: ParallelState, prompt_mask: torch.Tensor | None,
                 use_cache: bool) -> None:
        self.model, self.state, self.use_cache = model, state, use_cache
        self.num_layers = model.config.num_layers
        self.mask = prompt_mask  # (b, tokens so far) True = real; None: no padding
        self.cache = KVCache(self.num_layers) if use_cache else None
        self.tokens: torch.Tensor | None = None  # without a cache: every token so far
        self.seen = 0

    def step(self, new: torch.Tensor) -> torch.Tensor | None:
        b, s = new.shape
        if self.mask is not None and self.seen:  # generated tokens are real: mask 1
            self.mask = torch.cat([self.mask, self.mask.new_ones(b, s)], dim=1)  # (b, seen + s)
        self.seen += s
        if self.use_cache:
            tokens, cache = new, self.cache
        else:  # rerun everything; a fresh cache only to carry the mask
            self.tokens = new if self.tokens is None else torch.cat([self.tokens, new], dim=1)
            tokens = self.tokens
            cache = None if self.mask is None else KVCache(self.num_layers)
        positions = None
        if self.mask is not None:
            cache.key_mask = self.mask  # (b, cached + new)
            positions = position_ids_from_mask(self.mask)[:, -tokens.size(1):]  # (b, s_new)
        return self.forward(tokens, positions, cache)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None
                ) -> torch.Tensor | None:
        """Logits (b, V) of the last position; with a cache ``tokens`` are only the not-yet-cached ones."""
        return self.model(tokens, position_ids=positions, kv_cache=cache)[:, -1, :].float()

    def reorder(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(rows)
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, rows)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, rows)

    def share(self, x: torch.Tensor) -> torch.Tensor:
        return _same_on_tp_ranks(x, self.state)


def _decoder(model: nn.Module, state: ParallelState, prompt_mask: torch.Tensor | None,
             use_cache: bool) -> Decoder:
    if is_pipeline(model):
        from minimegatron.generate_pipe import PipelineDecoder  # imports DeepSpeed: only when used
        return PipelineDecoder(model, state, prompt_mask, use_cache)
    return Decoder(model, state, prompt_mask, use_cache)
