"""The language-model loss: the mean cross-entropy over the labels that count, under any layout.

:func:`lm_loss` takes the head's logits shard (unfused); :func:`mean_over_labels` takes the summed
per-token loss, which the fused head (``mpu/fused_cross_entropy.py``) returns without logits — both
end in the same mean, so both paths give the same value and gradients, context parallelism included.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from minimegatron.mpu.state import ParallelState

__all__ = ["lm_loss", "mean_over_labels"]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, state: ParallelState, vocab_size: int,
            ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the labels != ``ignore_index``: logits shard (s, b, V_pad/tp), labels (b, s).

    Under context parallelism each rank has s/cp of the tokens. The *value* is the whole sequences'
    mean on every CP rank (sum and count all-reduced over CP); the *gradient* is this rank's share
    ``cp · Σ_local / N`` (N: the tokens of all CP ranks), because gradients are averaged over the
    dp·cp ranks (``state.dp_cp_group``) — averaged, the shares give ``∇ Σ_all / N`` exactly
    (Megatron scales its CP loss by cp the same way).
    """
    labels = labels.t()  # (s, b), the logits' layout
    losses = vocab_parallel_cross_entropy(logits, labels, state, vocab_size=vocab_size,
                                          ignore_index=ignore_index)  # (s[/cp], b)
    return mean_over_labels(losses.sum(), labels, state, ignore_index)


def mean_over_labels(total: torch.Tensor, labels: torch.Tensor, state: ParallelState,
                     ignore_index: int = -100) -> torch.Tensor:
    """``total`` (Σ of this rank's per-token losses, ()) over the count of labels != ``ignore_index``:
    the mean, and under context parallelism the whole-sequence value with this rank's share as
    gradient (:func:`lm_loss`). The unfused and the fused loss end here alike."""
    count = (labels != ignore_index).sum()
    if state.cp == 1:
        return total / count.clamp(min=1)
    stats = torch.stack([total.detach(), count.to(total.dtype)])
    dist.all_reduce(stats, group=state.cp_group)  # [Σ_all, N] (forward only: no gradient flows here)
    share = total * state.cp / stats[1].clamp(min=1)
    return share + (stats[0] / stats[1].clamp(min=1) - share).detach()  # value: the mean; gradient: share
