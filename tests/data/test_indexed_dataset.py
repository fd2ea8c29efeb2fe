"""The .bin/.idx pair: round trips, the exact Megatron byte layout (read back with struct), bad files."""

import struct

import numpy as np
import pytest

from minimegatron.data.indexed_dataset import (
    IndexedDataset, IndexedDatasetBuilder, best_dtype, data_file_path, index_file_path,
)

# Megatron's dtype codes, written out again here (not imported) so the test is independent.
MEGATRON_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                  np.float64: 6, np.float32: 7, np.uint16: 8}


def _documents(dtype, rng):
    lengths = [5, 0, 1, 17, 0, 0, 9, 3]
    high = 100 if np.dtype(dtype).kind in "iu" else 1
    return [(rng.random(n) * high).astype(dtype) for n in lengths]


def _write(prefix, dtype, docs):
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in docs:
            builder.add_document(doc)


@pytest.mark.parametrize("dtype", list(MEGATRON_CODES))
def test_round_trip_every_dtype_with_empty_documents(tmp_path, dtype):
    docs = _documents(dtype, np.random.default_rng(0))
    _write(tmp_path / "ds", dtype, docs)
    ds = IndexedDataset(tmp_path / "ds")
    assert len(ds) == len(docs) and ds.num_documents == len(docs)
    assert ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(len(d) for d in docs)
    np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
        np.testing.assert_array_equal(ds.document(i), doc)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.get(3, 4, 6), docs[3][4:10])
    np.testing.assert_array_equal(ds.get(3, 10), docs[3][10:])
    with pytest.raises(IndexError):
        ds.get(3, 15, 5)
    with pytest.raises(IndexError):
        ds[len(docs)]


def test_empty_dataset_round_trip(tmp_path):
    _write(tmp_path / "empty", np.uint16, [])
    ds = IndexedDataset(tmp_path / "empty")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_documents_made_of_several_sequences(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "multi", np.int32) as builder:
        builder.add_document(np.arange(10), sequence_lengths=[3, 7])
        builder.add_document(np.arange(10, 14), sequence_lengths=[4])
        builder.add_document(np.arange(14, 20), sequence_lengths=[1, 0, 5])
    ds = IndexedDataset(tmp_path / "multi")
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 3, 6])
    np.testing.assert_array_equal(ds.sequence_lengths, [3, 7, 4, 1, 0, 5])
    np.testing.assert_array_equal(ds.document(2), np.arange(14, 20))
    np.testing.assert_array_equal(ds[1], np.arange(3, 10))


def test_idx_byte_layout_field_by_field(tmp_path):
    """Decode the .idx with struct alone, exactly as Megatron-LM's format describes it."""
    docs = [np.array([7, 8, 9]), np.array([], dtype=np.int64), np.array([1, 2, 3, 4, 5, 6]), np.array([42])]
    _write(tmp_path / "layout", np.uint16, docs)
    raw = index_file_path(tmp_path / "layout").read_bytes()
    assert raw[0:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9) == (1,)
    assert struct.unpack_from("<B", raw, 17) == (8,)  # uint16
    seq_count, doc_count = struct.unpack_from("<QQ", raw, 18)
    assert (seq_count, doc_count) == (4, 5)  # documents + 1 entries in the document index
    offset = 34
    lengths = struct.unpack_from(f"<{seq_count}i", raw, offset)
    offset += 4 * seq_count
    pointers = struct.unpack_from(f"<{seq_count}q", raw, offset)
    offset += 8 * seq_count
    doc_idx = struct.unpack_from(f"<{doc_count}q", raw, offset)
    offset += 8 * doc_count
    assert offset == len(raw)  # nothing after the document index
    assert lengths == (3, 0, 6, 1)
    assert pointers == (0, 6, 6, 18)  # byte offsets: 2 bytes per uint16 token
    assert doc_idx == (0, 1, 2, 3, 4)
    bin_raw = data_file_path(tmp_path / "layout").read_bytes()
    assert struct.unpack(f"<{len(bin_raw) // 2}H", bin_raw) == (7, 8, 9, 1, 2, 3, 4, 5, 6, 42)


@pytest.mark.parametrize("dtype", list(MEGATRON_CODES))
def test_dtype_code_byte(tmp_path, dtype):
    _write(tmp_path / "c", dtype, [np.zeros(2, dtype)])
    assert index_file_path(tmp_path / "c").read_bytes()[17] == MEGATRON_CODES[dtype]


def test_best_dtype():
    assert best_dtype(32000) is np.uint16
    assert best_dtype(65499) is np.uint16
    assert best_dtype(65500) is np.int32
    assert best_dtype(128256) is np.int32
    assert best_dtype(None) is np.int32


def _good(tmp_path):
    prefix = tmp_path / "good"
    _write(prefix, np.uint16, [np.arange(5), np.arange(3)])
    return prefix


def test_wrong_header_names_the_file(tmp_path):
    prefix = _good(tmp_path)
    idx = index_file_path(prefix)
    idx.write_bytes(b"TNTIDX\x00\x00\x00" + idx.read_bytes()[9:])
    with pytest.raises(ValueError, match=r"good\.idx is not a Megatron \.idx"):
        IndexedDataset(prefix)


def test_wrong_version(tmp_path):
    prefix = _good(tmp_path)
    idx = index_file_path(prefix)
    raw = bytearray(idx.read_bytes())
    raw[9:17] = struct.pack("<Q", 2)
    idx.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="version 2"):
        IndexedDataset(prefix)


def test_unknown_dtype_code(tmp_path):
    prefix = _good(tmp_path)
    idx = index_file_path(prefix)
    raw = bytearray(idx.read_bytes())
    raw[17] = 99
    idx.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="dtype code 99"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("keep", [0, 5, 20, 40, -1])
def test_truncated_idx(tmp_path, keep):
    prefix = _good(tmp_path)
    idx = index_file_path(prefix)
    raw = idx.read_bytes()
    idx.write_bytes(raw[:keep])
    with pytest.raises(ValueError, match=r"good\.idx is truncated"):
        IndexedDataset(prefix)


def test_bin_size_mismatch(tmp_path):
    prefix = _good(tmp_path)
    data = data_file_path(prefix)
    data.write_bytes(data.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"good\.bin holds 14 bytes .* 8 uint16 tokens \(16 bytes\)"):
        IndexedDataset(prefix)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.idx does not exist"):
        IndexedDataset(tmp_path / "nothing")


def test_interrupted_write_leaves_nothing(tmp_path):
    prefix = tmp_path / "partial"
    with pytest.raises(RuntimeError, match="stop"):
        with IndexedDatasetBuilder(prefix, np.uint16) as builder:
            builder.add_document(np.arange(100))
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_token_out_of_dtype_range_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(ValueError, match="best_dtype"):
        with IndexedDatasetBuilder(tmp_path / "small", np.uint8) as builder:
            builder.add_document([1, 2, 300])
    assert list(tmp_path.iterdir()) == []


def test_unfinished_builder_has_only_temporary_files(tmp_path):
    builder = IndexedDatasetBuilder(tmp_path / "wip", np.int32)
    builder.add_document([1, 2, 3])
    assert not data_file_path(tmp_path / "wip").exists() and not index_file_path(tmp_path / "wip").exists()
    builder.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wip.bin", "wip.idx"]
    with pytest.raises(RuntimeError, match="already finalized"):
        builder.add_document([4])


def test_rebuild_replaces_old_files(tmp_path):
    _write(tmp_path / "ds", np.int32, [np.arange(10)])
    _write(tmp_path / "ds", np.int32, [np.arange(3), np.arange(2)])
    ds = IndexedDataset(tmp_path / "ds")
    assert len(ds) == 2 and ds.num_tokens == 5


def test_abort_removes_the_directories_the_builder_made(tmp_path):
    with pytest.raises(RuntimeError, match="stop"):
        with IndexedDatasetBuilder(tmp_path / "a" / "b" / "ds", np.uint16) as builder:
            builder.add_document([1, 2, 3])
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_two_builders_on_one_prefix_do_not_share_temporary_files(tmp_path):
    first, second = (IndexedDatasetBuilder(tmp_path / "ds", np.int32) for _ in range(2))
    first.add_document([1, 2, 3])
    second.add_document([4])
    second.abort()
    first.finalize()
    assert IndexedDataset(tmp_path / "ds")[0].tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_a_failed_rename_never_pairs_a_new_bin_with_the_old_idx(tmp_path, monkeypatch):
    import os

    _write(tmp_path / "ds", np.int32, [np.arange(10)])
    old_idx = index_file_path(tmp_path / "ds").read_bytes()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match=r"cannot write the dataset .*ds\.bin/\.idx: No space left"):
        _write(tmp_path / "ds", np.int32, [np.arange(3)])
    monkeypatch.undo()
    assert not data_file_path(tmp_path / "ds").exists()  # a missing .bin is a clear error; a mismatch is not
    assert index_file_path(tmp_path / "ds").read_bytes() == old_idx
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.idx"]


@pytest.mark.parametrize("prefix, message", [
    ("", "is empty"), ("{tmp}/", "is a directory; a prefix names the files"),
    ("{tmp}/file/ds", "is a file, not a directory"),
])
def test_bad_prefix_is_refused_before_anything_is_written(tmp_path, prefix, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises((ValueError, OSError), match=message):
        IndexedDatasetBuilder(prefix.format(tmp=tmp_path), np.int32)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
