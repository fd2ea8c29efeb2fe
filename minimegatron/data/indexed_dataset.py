"""IndexedDataset: read Megatron's `.bin`/`.idx` token files through numpy.memmap.

Pretraining data is billions of tokens, so Megatron never unpickles a corpus: every token id is written
once, back to back, into `prefix.bin`, with a small table of lengths and byte offsets in `prefix.idx`.
Reading sequence i is then one slice of a `numpy.memmap` — nothing is loaded until a page is touched,
and every data-parallel rank can map the same file. The format (byte-for-byte Megatron-LM's and
Megatron-DeepSpeed's) is :mod:`.indexed_format`; the writer is :mod:`.indexed_builder`. Both are
re-exported here, the one import the rest of the package (and Megatron users) expect::

    from minimegatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype
"""
from __future__ import annotations

import os

import numpy as np

from minimegatron.data.indexed_builder import IndexedDatasetBuilder, check_output_prefix
from minimegatron.data.indexed_format import (DTYPE_CODES, HEADER_SIZE, INDEX_HEADER, INDEX_VERSION,
                                              best_dtype, data_file_path, dtype_code, index_file_path,
                                              read_index_header)

__all__ = ["IndexedDataset", "IndexedDatasetBuilder", "check_output_prefix", "DTYPE_CODES", "HEADER_SIZE",
           "INDEX_HEADER", "INDEX_VERSION", "best_dtype", "data_file_path", "dtype_code", "index_file_path",
           "read_index_header"]


class IndexedDataset:
    """Read a Megatron `prefix.bin` / `prefix.idx` pair through numpy.memmap (nothing is loaded eagerly).

    ds[i]                  -> sequence i as a numpy array (a view into the mapped .bin)
    ds.get(i, offset, n)   -> n tokens of sequence i starting at `offset` (n=None: to the end)
    ds.sequence_lengths    -> int32 (S,)
    ds.sequence_pointers   -> int64 (S,) byte offsets into .bin
    ds.document_indices    -> int64 (documents+1,), document k = sequences [doc_idx[k], doc_idx[k+1])
    ds.num_documents, ds.num_tokens, ds.dtype
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist; a dataset is the pair {self.prefix}.bin + "
                                        f"{self.prefix}.idx made by python -m minimegatron.data.preprocess")
        self.dtype, num_sequences, num_doc_entries = read_index_header(idx_path)
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(index, dtype="<i4", count=num_sequences, offset=offset)
        offset += 4 * num_sequences
        self.sequence_pointers = np.frombuffer(index, dtype="<i8", count=num_sequences, offset=offset)
        offset += 8 * num_sequences
        self.document_indices = np.frombuffer(index, dtype="<i8", count=num_doc_entries, offset=offset)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        expected_bin = self.num_tokens * self.dtype.itemsize
        actual_bin = bin_path.stat().st_size
        if actual_bin != expected_bin:
            raise ValueError(f"{bin_path} holds {actual_bin} bytes but {idx_path} describes "
                             f"{self.num_tokens} {self.dtype.name} tokens ({expected_bin} bytes): the pair "
                             f"does not belong together or one was truncated; rebuild both")
        # np.memmap refuses zero-length files, so an empty dataset gets an empty array instead.
        self._tokens = (np.memmap(bin_path, mode="r", dtype=self.dtype) if actual_bin
                        else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def _start(self, idx: int) -> int:
        return int(self.sequence_pointers[idx]) // self.dtype.itemsize

    def __getitem__(self, idx: int) -> np.ndarray:
        if not isinstance(idx, (int, np.integer)):
            raise TypeError(f"index a dataset with an int, got {type(idx).__name__}")
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {self.prefix} with {len(self)} sequences")
        start = self._start(idx)
        return self._tokens[start : start + int(self.sequence_lengths[idx])]

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """`length` tokens of sequence `idx` from `offset` (to its end when length is None)."""
        sequence_length = int(self.sequence_lengths[idx])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside sequence {idx} "
                             f"of length {sequence_length}")
        start = self._start(idx) + offset
        return self._tokens[start : start + length]

    def document(self, k: int) -> np.ndarray:
        """All tokens of document k (its sequences joined)."""
        first, last = int(self.document_indices[k]), int(self.document_indices[k + 1])
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        start = self._start(first)
        stop = self._start(last - 1) + int(self.sequence_lengths[last - 1])
        return self._tokens[start:stop]

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {self.num_documents} documents, "
                f"{self.num_tokens} {self.dtype.name} tokens)")
