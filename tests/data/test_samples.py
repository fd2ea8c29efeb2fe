"""Sample-index arithmetic, checked against the plainly concatenated token stream."""

import numpy as np
import pytest
import torch

from minimegatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from minimegatron.data.samples import (
    GPTDataset, build_datasets, build_sample_index, parse_split, split_documents,
)

LENGTHS = [7, 0, 30, 1, 0, 12, 5, 64, 3, 0, 9, 20, 2, 41, 6, 0, 18, 11, 4, 25]


@pytest.fixture
def indexed(tmp_path):
    """Documents whose tokens are globally unique (token value = its position in the file)."""
    prefix = tmp_path / "ds"
    start = 0
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for n in LENGTHS:
            builder.add_document(np.arange(start, start + n))
            start += n
    return IndexedDataset(prefix)


def _stream(indexed, doc_idx):
    return np.concatenate([np.asarray(indexed[int(d)]) for d in doc_idx])


@pytest.mark.parametrize("seq_len", [1, 3, 8, 50, 278])
def test_sample_index_against_brute_force(seq_len):
    lengths = np.array(LENGTHS)
    index = build_sample_index(lengths, seq_len)
    total = lengths.sum()
    assert index.shape == ((total - 1) // seq_len + 1, 2)
    owner = np.repeat(np.arange(len(lengths)), lengths)  # document of every stream token
    offset = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    for i, (doc, off) in enumerate(index):
        assert (doc, off) == (owner[i * seq_len], offset[i * seq_len])
        assert lengths[doc] > 0  # never points into an empty document


def test_sample_index_edge_cases():
    assert build_sample_index([5], 4).tolist() == [[0, 0], [0, 4]]
    assert build_sample_index([4], 4).shape == (1, 2)  # 4 tokens cannot make 4+1: no sample
    assert build_sample_index([], 4).shape == (1, 2)
    assert build_sample_index([0, 0, 3, 0, 2], 2).tolist() == [[2, 0], [2, 2], [4, 1]]
    assert build_sample_index([10], 3, num_samples=2).shape == (3, 2)
    with pytest.raises(ValueError, match="need 31 tokens, the stream has 10"):
        build_sample_index([10], 3, num_samples=10)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        build_sample_index([10], 0)


@pytest.mark.parametrize("seq_len", [4, 16, 63])
def test_one_epoch_uses_every_token_once_and_samples_are_contiguous(indexed, seq_len):
    ds = GPTDataset(indexed, np.arange(len(LENGTHS)), seq_len, seed=7)
    assert sorted(ds.doc_idx.tolist()) == list(range(len(LENGTHS)))  # one epoch: a permutation of docs
    stream = _stream(indexed, ds.doc_idx)
    total = len(stream)
    assert len(ds) == (total - 1) // seq_len
    labels_seen = []
    for i in range(len(ds)):
        sample = ds.sample(i)
        assert sample.shape == (seq_len + 1,)
        np.testing.assert_array_equal(sample, stream[i * seq_len : i * seq_len + seq_len + 1])
        labels_seen.extend(sample[1:].tolist())
    # every token but the first is a label exactly once, up to the unreached tail (< seq_len tokens)
    assert labels_seen == stream[1 : len(ds) * seq_len + 1].tolist()
    assert total - 1 - len(labels_seen) < seq_len


def test_getitem_is_shuffled_tokens_and_shifted_labels(indexed):
    ds = GPTDataset(indexed, np.arange(len(LENGTHS)), 16, seed=3)
    assert sorted(ds.shuffle_idx.tolist()) == list(range(len(ds)))
    for k in (0, 5, len(ds) - 1, -1):
        item = ds[k]
        raw = ds.sample(int(ds.shuffle_idx[k]))
        assert item["tokens"].dtype == item["labels"].dtype == torch.long
        assert item["tokens"].shape == item["labels"].shape == (16,)
        assert item["tokens"].tolist() == raw[:-1].tolist() and item["labels"].tolist() == raw[1:].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_shuffling_is_reproducible(indexed):
    a = GPTDataset(indexed, np.arange(len(LENGTHS)), 8, seed=11)
    b = GPTDataset(indexed, np.arange(len(LENGTHS)), 8, seed=11)
    c = GPTDataset(indexed, np.arange(len(LENGTHS)), 8, seed=12)
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.shuffle_idx, c.shuffle_idx)
    plain = GPTDataset(indexed, np.arange(len(LENGTHS)), 8, shuffle=False)
    assert plain.doc_idx.tolist() == list(range(len(LENGTHS)))
    assert plain.shuffle_idx.tolist() == list(range(len(plain)))


def test_more_samples_than_an_epoch_adds_reshuffled_epochs(indexed):
    total = sum(LENGTHS)
    ds = GPTDataset(indexed, np.arange(len(LENGTHS)), 10, num_samples=100, seed=5)
    assert len(ds) == 100
    epochs = len(ds.doc_idx) // len(LENGTHS)
    assert epochs == -(-(100 * 10 + 1) // total)
    for epoch in ds.doc_idx.reshape(epochs, len(LENGTHS)):  # each epoch: a permutation of all documents
        assert sorted(epoch.tolist()) == list(range(len(LENGTHS)))
    stream = _stream(indexed, ds.doc_idx)
    for i in (0, 37, 99):
        np.testing.assert_array_equal(ds.sample(i), stream[i * 10 : i * 10 + 11])


def test_split_strings():
    assert parse_split("949,50,1") == pytest.approx((0.949, 0.05, 0.001))
    assert parse_split("98/2") == pytest.approx((0.98, 0.02, 0.0))
    assert parse_split(" 1, 1 ,2 ") == pytest.approx((0.25, 0.25, 0.5))
    for bad, message in [("", "string like"), ("1,2,3,4", "at most 3"), ("90,x,1", "not a number"),
                         ("90,-5,1", "negative"), ("0,0,0", "sum to 0"), ("nan,1", "non-finite")]:
        with pytest.raises(ValueError, match=message):
            parse_split(bad)


@pytest.mark.parametrize("n", [0, 1, 3, 20, 243, 1000])
@pytest.mark.parametrize("split", ["949,50,1", "1,1,1", "100,0,0", "0,0,1"])
def test_split_documents_is_a_partition(n, split):
    ranges = split_documents(n, split)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start <= end for start, end in ranges)
    for (start, end), fraction in zip(ranges, parse_split(split)):
        assert abs((end - start) - fraction * n) <= 1


def test_build_datasets_splits_by_document(indexed):
    train, valid, test = build_datasets(indexed.prefix, 8, "70,20,10", seed=2)
    assert (train.sequences.tolist(), valid.sequences.tolist(), test.sequences.tolist()) == (
        list(range(14)), list(range(14, 18)), list(range(18, 20)))
    for ds in (train, valid, test):
        assert set(ds.doc_idx.tolist()) <= set(ds.sequences.tolist())
        stream = _stream(indexed, ds.doc_idx)
        assert len(ds) == (len(stream) - 1) // 8
    assert not np.array_equal(train.shuffle_idx[:5], valid.shuffle_idx[:5])
    train, valid, test = build_datasets(indexed, 8, "100,0,0", num_samples=(50, None, 0))
    assert (len(train), len(valid), len(test)) == (50, 0, 0)
    with pytest.raises(ValueError, match="too few for any sample"):
        build_datasets(indexed, 8, "100,0,0", num_samples=(None, 5, None))
    with pytest.raises(ValueError, match=r"int or \(train, valid, test\)"):
        build_datasets(indexed, 8, num_samples=(1, 2))
