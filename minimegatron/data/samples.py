"""Fixed-length GPT training samples cut from a stream of documents (Megatron's sample index).

A language model trains on windows of `seq_len` tokens, but documents have any length. Megatron does
not pad: it lays the documents of a split end to end into one long stream (each ends with its EOD, so
the model sees where one stops) and cuts the stream into windows that happily straddle documents.

    stream   |doc 7......|doc 2....|doc 9.............|doc 0...|      (an epoch: documents shuffled)
    samples  [ sample 0  ][ sample 1  ][ sample 2  ][ sample 3  ]...  (seq_len + 1 tokens each)
                         ^ the last token of sample i is the first token of sample i+1

Sample i covers stream[i*seq_len : i*seq_len + seq_len + 1]: inputs are its first seq_len tokens, labels
its last seq_len (the inputs shifted by one). Windows overlap by exactly that one token, so every token of
the stream except the first is a label exactly once. A stream of T tokens gives (T - 1) // seq_len
samples; the last (T - 1) % seq_len tokens are not reached. No sample runs past the end.

Three index arrays make this cheap — nothing is copied, a sample is read from the .bin on demand:

    document order (Megatron: doc_idx)     which sequence comes next in the stream; per epoch, a fresh
                                            permutation of the split's sequences (seeded)
    sample index   (Megatron: sample_idx)  (num_samples + 1, 2) rows [position in doc order, offset]:
                                            where sample i starts; sample i ends at row i + 1, inclusive
    shuffle index  (Megatron: shuffle_idx) a seeded permutation: dataset[k] is sample shuffle_idx[k]

Here the sample index is one `searchsorted` over the cumulative document lengths (Megatron builds it
with a C++ loop); asking for more samples than an epoch holds appends more epochs, each freshly shuffled.

Splits are by document, not by token (`split="949,50,1"` -> 94.9% / 5% / 0.1% of the documents, in file
order), so no document leaks from train into valid. `GPTDataset[k]` returns
{"tokens": LongTensor(seq_len), "labels": LongTensor(seq_len)}; `dataset.sample(i)` gives the raw
seq_len + 1 tokens of sample i (unshuffled numbering).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from minimegatron.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> tuple[float, float, float]:
    """'949,50,1' (or '949/50/1', or '98,2') -> fractions (0.949, 0.05, 0.001) of train, valid, test."""
    if not isinstance(split, str) or not split.strip():
        raise ValueError(f"split must be a string like '949,50,1' (train,valid,test weights), got {split!r}")
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    if len(parts) > 3:
        raise ValueError(f"split {split!r} has {len(parts)} parts; give at most 3 weights: train,valid,test")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"split {split!r} has a part that is not a number; "
                         f"use weights like '949,50,1'") from None
    if any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"split {split!r} has a negative or non-finite weight; weights must be >= 0")
    if sum(weights) <= 0:
        raise ValueError(f"split {split!r} weights sum to 0; at least one of train,valid,test must be > 0")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return tuple(w / total for w in weights)  # type: ignore[return-value]


def split_documents(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Document ranges [start, end) of train, valid, test: consecutive, covering 0..num_documents."""
    fractions = parse_split(split)
    bounds = [0] + [int(round(f * num_documents)) for f in np.cumsum(fractions)]
    bounds[-1] = num_documents  # guard against float round-off in the last cumulative sum
    return [(bounds[k], bounds[k + 1]) for k in range(3)]


def build_sample_index(lengths: Sequence[int] | np.ndarray, seq_len: int,
                       num_samples: int | None = None) -> np.ndarray:
    """Where each sample starts, for documents of `lengths` laid end to end (in stream order).

    Returns an int64 array (n + 1, 2): row i = [document position, token offset] of stream token
    i * seq_len. Sample i runs from row i to row i + 1 inclusive (seq_len + 1 tokens). n = num_samples,
    or every whole sample the stream holds, (sum(lengths) - 1) // seq_len, when num_samples is None.
    Empty documents are skipped over (a row never points into one).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    lengths = np.asarray(lengths, dtype=np.int64)
    starts_of_docs = np.concatenate([[0], np.cumsum(lengths)])  # (D + 1,) stream offset of each doc
    total = int(starts_of_docs[-1])
    available = max(total - 1, 0) // seq_len
    n = available if num_samples is None else int(num_samples)
    if n > available:
        raise ValueError(f"{n} samples of {seq_len}+1 tokens need {n * seq_len + 1} tokens, "
                         f"the stream has {total}")
    starts = np.arange(n + 1, dtype=np.int64) * seq_len  # (n + 1,) stream offset of each row
    # the last document whose start is <= the row's offset; side="right" steps over empty documents
    position = np.searchsorted(starts_of_docs, starts, side="right") - 1
    return np.stack([position, starts - starts_of_docs[position]], axis=1)  # (n + 1, 2)


class GPTDataset(torch.utils.data.Dataset):
    """Shuffled fixed-length samples from some sequences of an IndexedDataset.

    dataset[k] -> {"tokens": LongTensor(seq_len), "labels": LongTensor(seq_len)}, labels = tokens shifted.
    num_samples=None: one epoch (every whole sample once); an int: that many, over as many epochs as needed.
    """

    def __init__(self, indexed: IndexedDataset, sequences: Sequence[int] | np.ndarray, seq_len: int,
                 num_samples: int | None = None, seed: int = 1234, shuffle: bool = True,
                 name: str = "train") -> None:
        self.indexed, self.seq_len, self.name = indexed, int(seq_len), name
        self.sequences = np.asarray(sequences, dtype=np.int64)
        tokens_per_epoch = int(indexed.sequence_lengths[self.sequences].sum(dtype=np.int64))
        if num_samples is None:
            num_epochs = 1
        elif num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        elif num_samples == 0:
            num_epochs = 0
        elif tokens_per_epoch < 2:
            raise ValueError(f"the {name} split has {tokens_per_epoch} tokens, too few for any sample; "
                             f"give it more documents (change the split) or use more text")
        else:  # enough epochs that E * T - 1 >= num_samples * seq_len
            num_epochs = -(-(num_samples * self.seq_len + 1) // tokens_per_epoch)
        rng = np.random.default_rng([seed, SPLIT_NAMES.index(name) if name in SPLIT_NAMES else 3])
        epochs = [rng.permutation(self.sequences) if shuffle else self.sequences for _ in range(num_epochs)]
        self.doc_idx = np.concatenate(epochs) if epochs else np.zeros(0, np.int64)  # (E * docs,)
        self.sample_idx = build_sample_index(indexed.sequence_lengths[self.doc_idx], self.seq_len,
                                             num_samples)  # (n + 1, 2)
        n = len(self.sample_idx) - 1
        self.shuffle_idx = rng.permutation(n) if shuffle else np.arange(n)  # (n,)

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def sample(self, i: int) -> np.ndarray:
        """The seq_len + 1 tokens of sample i (stream order, before the shuffle index)."""
        (first, offset), (last, end) = self.sample_idx[i], self.sample_idx[i + 1]
        get = self.indexed.get
        if first == last:
            return np.asarray(get(self.doc_idx[first], offset, end - offset + 1), dtype=np.int64)
        parts = [get(self.doc_idx[first], offset)]
        parts += [self.indexed[int(self.doc_idx[p])] for p in range(first + 1, last)]
        parts.append(get(self.doc_idx[last], 0, end + 1))
        return np.concatenate(parts).astype(np.int64)  # (seq_len + 1,)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= k < len(self):
            raise IndexError(f"sample {k} out of range for the {self.name} split with {len(self)} samples")
        tokens = torch.from_numpy(self.sample(int(self.shuffle_idx[k])))  # (seq_len + 1,)
        return {"tokens": tokens[:-1], "labels": tokens[1:]}  # (seq_len,) each

    def __repr__(self) -> str:
        return (f"GPTDataset({self.name}: {len(self)} samples of {self.seq_len}+1 tokens from "
                f"{len(self.sequences)} sequences of {self.indexed.prefix})")


def build_datasets(prefix: str | os.PathLike | IndexedDataset, seq_len: int, split: str = "949,50,1",
                   seed: int = 1234, num_samples: int | Sequence[int | None] | None = None,
                   shuffle: bool = True) -> tuple[GPTDataset, GPTDataset, GPTDataset]:
    """(train, valid, test) GPTDatasets over `prefix.bin/.idx`, split by documents.

    num_samples: None -> one epoch of each split; an int -> that many train samples (valid and test one
    epoch); a 3-sequence -> per split (None entries mean one epoch). An empty split gives a dataset of
    length 0.
    """
    indexed = prefix if isinstance(prefix, IndexedDataset) else IndexedDataset(prefix)
    if isinstance(num_samples, (int, np.integer)) or num_samples is None:
        counts: list[int | None] = [num_samples, None, None]
    else:
        counts = list(num_samples)
        if len(counts) != 3:
            raise ValueError(f"num_samples must be an int or (train, valid, test), got {num_samples!r}")
    docs = indexed.document_indices
    datasets = []
    for name, (d0, d1), count in zip(SPLIT_NAMES, split_documents(indexed.num_documents, split), counts):
        sequences = np.arange(docs[d0], docs[d1], dtype=np.int64)  # the sequences of documents d0..d1-1
        datasets.append(GPTDataset(indexed, sequences, seq_len, count, seed, shuffle, name))
    return tuple(datasets)  # type: ignore[return-value]
