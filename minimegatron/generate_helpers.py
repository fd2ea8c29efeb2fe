"""What greedy/sampled decoding (``generate.py``) and beam search (``generate_beam.py``) share.

Both loops check the prompt and the model the same way, turn ``eos_token_id`` into a tensor, take the
last position's logits, and broadcast each choice from the first TP rank so that every rank feeds the
same token. Those helpers live here, below both files, so that neither imports the other's internals.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.layers.attention import KVCache
from minimegatron.mpu.state import ParallelState

__all__: list[str] = []  # internal to generate.py and generate_beam.py


def _state(model: nn.Module) -> ParallelState:
    state = getattr(model, "state", None) or ParallelState()
    if state.pp > 1:
        raise ValueError("generate() runs a whole model on each TP rank; a pipeline-parallel stage "
                         f"(pp={state.pp}) holds only some layers — generate with pp=1")
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
