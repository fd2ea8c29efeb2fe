"""Training data: which sequences each rank reads at each step.

Step ``t`` consumes the global batch ``samples[t·G : (t+1)·G]`` (``G = global_batch_size``) of a
dataset whose item ``i`` is ``{"tokens": (s,), "labels": (s,)}``. Data-parallel replica ``d`` takes
the ``d``-th contiguous ``G/dp`` of them, cut into micro-batches of ``micro_batch_size``::

    global batch t   [ replica 0: mb 0 | mb 1 | … ][ replica 1: mb 0 | mb 1 | … ] …

The set of sequences in a step does not depend on the layout, and every sequence has the same number
of tokens, so the step's loss (mean over micro-batches, averaged over replicas) is the mean over the
whole global batch — the same number for dp = 1 and dp = 4. Tensor-parallel ranks of a replica read
the same sequences; only the first and last pipeline stages use them (ids in, labels out).

``--data random`` is :class:`SyntheticDataset`: sequences from a seeded random Markov chain, so a model
has something to learn (the loss falls from ``ln V`` towards ``ln branching``). A string is the
prefix of a Megatron indexed dataset, read through :class:`minimegatron.data.samples.GPTDataset`; from
Python, ``TrainConfig(data=..., valid_data=...)`` also takes any such map-style Dataset.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Dataset

from minimegatron.mpu.context_parallel import context_parallel_index
from minimegatron.training.config import TrainConfig

EVAL_OFFSET = 1 << 40  # synthetic eval samples: indices far from any training index


class SyntheticDataset(Dataset):
    """A random bigram language: token ``v`` is followed by one of ``branching`` fixed tokens.

    The successor table is drawn once from ``seed``; sample ``i`` starts at a random token and walks
    the chain ``seq_len`` steps (its own generator, seeded by ``(seed, i)``), so any rank can produce
    any sample without the others. Best possible loss: ``ln(branching)`` nats per token.
    """

    def __init__(self, vocab_size: int, seq_len: int, num_samples: int, seed: int = 1234,
                 branching: int = 4, offset: int = 0) -> None:
        self.vocab_size, self.seq_len, self.num_samples = vocab_size, seq_len, num_samples
        self.seed, self.offset, self.branching = seed, offset, branching
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab_size, (vocab_size, branching), generator=g).tolist()

    @property
    def entropy(self) -> float:
        """The loss a perfect model reaches (nats/token)."""
        return math.log(self.branching)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + i)
        token = int(torch.randint(0, self.vocab_size, (1,), generator=g))
        choices = torch.randint(0, self.branching, (self.seq_len,), generator=g).tolist()
        seq = [token]
        for c in choices:  # walk the chain
            token = self.successors[token][c]
            seq.append(token)
        t = torch.tensor(seq, dtype=torch.long)  # (s + 1,)
        return {"tokens": t[:-1], "labels": t[1:]}


def build_datasets(cfg: TrainConfig, vocab_size: int) -> tuple[Dataset, Dataset | None]:
    """(train, valid) datasets with enough samples for ``steps`` and every evaluation."""
    n_train = cfg.steps * cfg.global_batch_size
    n_eval = cfg.eval_iters * cfg.global_batch_size if cfg.eval_interval else 0
    if not isinstance(cfg.data, str):  # a Dataset given by the caller (read cyclically)
        return cfg.data, (cfg.valid_data if n_eval else None)
    if cfg.data == "random":
        train = SyntheticDataset(vocab_size, cfg.seq_len, n_train, cfg.seed)
        valid = SyntheticDataset(vocab_size, cfg.seq_len, n_eval, cfg.seed, offset=EVAL_OFFSET)
        return train, (valid if n_eval else None)
    from minimegatron.data.samples import build_datasets as gpt_datasets

    train, valid, _ = gpt_datasets(cfg.data, cfg.seq_len, cfg.split, cfg.seed,
                                   num_samples=(n_train, n_eval or None, None))
    if n_eval and len(valid) == 0:
        raise ValueError(f"the valid split of {cfg.data} is empty (split={cfg.split!r}); give it a share "
                         "(e.g. --split 90,10,0) or set --eval-interval 0")
    return train, (valid if n_eval else None)


def micro_batches(dataset: Dataset, first: int, cfg: TrainConfig, dp_rank: int, cp_rank: int = 0
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This replica's micro-batches of the global batch starting at sample ``first``:
    ``num_micro_batches`` pairs (tokens (b, s), labels (b, s)), b = micro_batch_size.

    Under context parallelism (``cfg.cp > 1``) the tokens of CP rank ``cp_rank`` only: its zig-zag
    piece (b, s/cp) of the same sequences (``mpu.context_parallel.context_parallel_index``)."""
    per_replica = cfg.global_batch_size // cfg.dp
    start = first + dp_rank * per_replica
    out = []
    for m in range(cfg.num_micro_batches):
        items = [dataset[(start + m * cfg.micro_batch_size + j) % len(dataset)]
                 for j in range(cfg.micro_batch_size)]
        tokens, labels = (torch.stack([it[k] for it in items]).long() for k in ("tokens", "labels"))
        if cfg.cp > 1:
            piece = context_parallel_index(tokens.size(1), cp_rank, cfg.cp)
            tokens, labels = tokens[:, piece], labels[:, piece]  # (b, s/cp)
        out.append((tokens, labels))  # (b, s[/cp]) each
    return out


def step_batches(dataset: Dataset, step: int, cfg: TrainConfig, dp_rank: int, cp_rank: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterator over this replica's (this CP rank's) micro-batches for optimizer step ``step``."""
    return iter(micro_batches(dataset, step * cfg.global_batch_size, cfg, dp_rank, cp_rank))
