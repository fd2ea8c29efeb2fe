"""The vocabulary split over tensor-parallel ranks: VocabParallelEmbedding and ParallelLMHead.

Both hold the (padded) table ``E`` of shape (V_pad, h) split by **vocab rows** (Shoeybi et al. 2019,
§3): rank i holds ``E_i = E[start_i : end_i]``, ``V_pad/tp`` rows, with ``V_pad`` the vocab rounded up
to a multiple of ``make_vocab_size_divisible_by · tp`` (Megatron's padding; the padded rows are zero).

* **Embedding** ``x = E[t]``: each rank looks up the tokens it owns, writes zeros for the others, and
  ``g`` (all-reduce) sums the p partial results — exactly one rank contributed each row. Backward:
  identity; each rank's weight gradient lands in its own rows only.
* **LM head** ``z = h·Eᵀ = [h·E_1ᵀ … h·E_pᵀ]``: a column-parallel product whose output stays split
  over the vocab, (…, V_pad/tp), fed straight to ``vocab_parallel_cross_entropy`` (no gather).
  Forward ``f`` (identity; under SP the all-gather of the (s/tp, b, h) shard), backward all-reduce
  (reduce-scatter under SP) of ∂L/∂h, which sums the contributions of the vocab slices.

Token ids out of range. A lookup of an id ``≥ V`` is silently wrong under TP (a zero padding row, or
no owner at all), so the ids must be checked — but checking them means reading them on the host
(``.min()``/``.max()`` → a device sync every forward), against the static-shape, no-``.item()`` rule
of the hot path (``device.py``). So the check is :func:`validate_token_ids`, run where user input
enters: the data side (``training.args.check_token_range`` on the token file, before ranks start),
``generate()`` on its prompt, or a layer built with ``check_token_ids=True`` (a debugging switch,
off by default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimegatron.mpu.fused_cross_entropy import fused_vocab_parallel_cross_entropy
from minimegatron.mpu.layers import (InitMethod, _check_split, _parallel_param, init_normal,
                                     linear_with_sequence_parallel_gather)
from minimegatron.mpu.mappings import (copy_to_tensor_model_parallel_region,
                                       reduce_from_tensor_model_parallel_region)
from minimegatron.mpu.state import ParallelState
from minimegatron.mpu.weight_grad import WeightGradStore, linear
from minimegatron.sizes import pad_vocab_size  # the one vocab padding (re-exported here)

__all__ = ["VocabParallelEmbedding", "ParallelLMHead", "pad_vocab_size", "vocab_range",
           "validate_token_ids"]


def vocab_range(padded_vocab_size: int, tp_rank: int, tp: int) -> tuple[int, int]:
    """[start, end) of the vocab rows rank ``tp_rank`` holds."""
    per = _check_split(padded_vocab_size, tp, "padded vocab size")
    return tp_rank * per, (tp_rank + 1) * per


def validate_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a ValueError naming the first bad id if any id lies outside [0, vocab_size).

    Reads two numbers on the host (a device sync): call it where input enters, not every forward.
    """
    if input_ids.numel() == 0:
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {hi if hi >= vocab_size else lo} is outside the "
                         f"vocabulary [0, {vocab_size}); check that the tokenizer's "
                         f"vocab size matches the model's vocab_size={vocab_size}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocab rows: rank i holds rows [vocab_start_index, vocab_end_index).

    Forward: masked local lookup, then g (all-reduce) of (b, s, h). Backward: identity.
    ``check_token_ids=True`` runs :func:`validate_token_ids` on every forward (a host sync: debugging).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, state: ParallelState,
                 make_vocab_size_divisible_by: int = 128, init_method: InitMethod | None = None,
                 dtype=None, device=None, check_token_ids: bool = False) -> None:
        super().__init__()
        self.state, self.num_embeddings, self.embedding_dim = state, num_embeddings, embedding_dim
        self.check_token_ids = check_token_ids  # True: validate the ids every forward (a host sync)
        self.padded_vocab_size = pad_vocab_size(num_embeddings, make_vocab_size_divisible_by, state.tp)
        self.vocab_start_index, self.vocab_end_index = vocab_range(self.padded_vocab_size,
                                                                   state.tp_rank, state.tp)
        self.weight = _parallel_param((num_embeddings, embedding_dim), 0, state,
                                      init_method or init_normal(), dtype, device,
                                      pad_dim0_to=self.padded_vocab_size)  # (V_pad/tp, h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.check_token_ids:  # before any collective: a bad id fails on every rank alike
            validate_token_ids(input_ids, self.num_embeddings)
        if self.state.tp == 1:  # one rank holds the whole table: a plain lookup
            return F.embedding(input_ids, self.weight)  # (b, s, h)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)  # (b, s)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)  # (b, s)
        out = F.embedding(local_ids, self.weight)  # (b, s, h): rows of this rank's slice
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # tokens owned by other ranks -> 0
        return reduce_from_tensor_model_parallel_region(out, self.state)  # (b, s, h)

    def extra_repr(self) -> str:
        return (f"vocab={self.num_embeddings} (padded {self.padded_vocab_size}), h={self.embedding_dim}, "
                f"rows [{self.vocab_start_index}, {self.vocab_end_index})")


class ParallelLMHead(nn.Module):
    """Vocab-parallel output projection: logits shard ``h·W_iᵀ`` of shape (…, V_pad/tp), no gather.

    Same padding and row split as :class:`VocabParallelEmbedding`. **Untied** (LLaMA): the head owns
    its (V_pad/tp, h) ``weight``. **Tied** (GPT, ``tied=True``): it owns nothing — ``self.weight is
    None``, no ``lm_head.weight`` in the state_dict — and is called with the table it multiplies by,
    ``head(hidden, weight=embedding.weight)`` (Megatron's ``output_layer(hidden, weight=...)``): one
    Parameter, used twice, whose gradient collects both uses. Feed the shard straight to
    ``vocab_parallel_cross_entropy``. The input goes through f (or the SP all-gather, keeping only the
    (s/tp, b, h) shard for backward), whose backward sums ∂L/∂h over the vocab slices.

    **Fused loss** (``head(hidden, weight, labels=target)``, target (s, b)): no logits at all — the
    summed cross-entropy ``Σ ℓ`` over the tokens, ``loss_chunk`` tokens' logits at a time, with ∂h and
    ∂W made in the same pass (``mpu/fused_cross_entropy.py``). It runs inside this module's forward,
    so hooks on the head (ZeRO-3 gathering its weight) fire as for the logits.
    """
    weight_grad_store: WeightGradStore | None = None  # set to defer ∂L/∂W (mpu/weight_grad.py)

    def __init__(self, vocab_size: int, hidden_size: int, *, state: ParallelState,
                 make_vocab_size_divisible_by: int = 128, tied: bool = False,
                 sequence_parallel: bool = False, init_method: InitMethod | None = None,
                 dtype=None, device=None, loss_chunk: int | None = None) -> None:
        super().__init__()
        self.state, self.vocab_size, self.hidden_size = state, vocab_size, hidden_size
        self.loss_chunk = loss_chunk  # tokens per chunk of the fused loss (None: by the vocab)
        self.sequence_parallel, self.tied = sequence_parallel, tied
        self.padded_vocab_size = pad_vocab_size(vocab_size, make_vocab_size_divisible_by, state.tp)
        self.vocab_start_index, self.vocab_end_index = vocab_range(self.padded_vocab_size,
                                                                   state.tp_rank, state.tp)
        if tied:
            self.weight = None  # no weight of its own: the caller's table, passed at call time
        else:
            self.weight = _parallel_param((vocab_size, hidden_size), 0, state, init_method or init_normal(),
                                          dtype, device, pad_dim0_to=self.padded_vocab_size)  # (V_pad/tp, h)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """(…, h) -> (…, V_pad/tp); a tied head takes ``weight``, the embedding's (V_pad/tp, h) table.

        ``labels`` (s, b) given: the fused loss ``Σ ℓ`` () over the labels != ``ignore_index`` instead.
        """
        if self.tied:
            weight = self._check_tied_weight(weight)
        elif weight is not None:
            raise ValueError("this LM head is untied and multiplies by its own weight: call head(hidden) "
                             "(build it with tied=True to multiply by the word embeddings' table)")
        else:
            weight = self.weight
        if labels is not None:  # (s[/tp], b, h) -> Σ ℓ (), chunk by chunk
            return fused_vocab_parallel_cross_entropy(
                hidden, weight, labels, self.state, self.vocab_size, ignore_index, self.loss_chunk,
                self.sequence_parallel, self.weight_grad_store)
        if self.sequence_parallel:  # (s/tp, b, h) -> (s, b, V_pad/tp), keeps the shard only
            return linear_with_sequence_parallel_gather(hidden, weight, None, self.state, self.weight_grad_store)
        hidden = copy_to_tensor_model_parallel_region(hidden, self.state)  # (…, h), f
        return linear(hidden, weight, None, self.weight_grad_store)  # (…, V_pad/tp)

    def _check_tied_weight(self, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is None:
            raise ValueError("this LM head is tied (tied=True) and owns no weight: call it as "
                             "head(hidden, weight=embedding.weight), with the word embeddings' table")
        expected = (self.padded_vocab_size // self.state.tp, self.hidden_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"tied weight has shape {tuple(weight.shape)}, expected {expected} "
                             "(V_pad/tp, h): pass the table of a VocabParallelEmbedding with the same "
                             "vocab, hidden size, make_vocab_size_divisible_by and state")
        return weight

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab_size} (padded {self.padded_vocab_size}), h={self.hidden_size}, "
                f"rows [{self.vocab_start_index}, {self.vocab_end_index}), tied={self.tied}, "
                f"loss_chunk={self.loss_chunk}")
