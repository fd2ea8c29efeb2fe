"""Megatron's on-disk token format: a `.bin` of raw tokens and an `.idx` that says where each one starts.

Pretraining data is billions of tokens, so Megatron never unpickles a corpus: it writes every token id
once, back to back, into `prefix.bin`, and writes a small table of lengths and byte offsets into
`prefix.idx`. Reading sequence i is then one slice of a `numpy.memmap` — nothing is loaded until a
page is touched, and every data-parallel rank can map the same file. The format here is byte-for-byte
the one Megatron-LM (megatron/core/datasets/indexed_dataset.py) and Megatron-DeepSpeed read and write,
so files made here load there and the other way round.

Vocabulary: a *sequence* is one run of tokens (usually a whole document after tokenization); a
*document* is a range of consecutive sequences (Megatron can store a document as several sentences).
`add_document(tokens)` writes one document made of one sequence.

`.idx` layout (all little-endian, no padding between fields):

    offset  size        field
    0       9           magic  b"MMIDIDX\\x00\\x00"
    9       8  uint64   version = 1
    17      1  uint8    dtype code of the .bin tokens (see DTYPE_CODES)
    18      8  uint64   S = number of sequences
    26      8  uint64   D = number of entries of the document index (documents + 1)
    34      4*S int32   sequence_lengths[S]      tokens per sequence
    34+4S   8*S int64   sequence_pointers[S]     byte offset of each sequence in .bin
    34+12S  8*D int64   document_indices[D]      [0, end_0, end_1, ...]: document k = sequences
                                                 document_indices[k] : document_indices[k+1]

`.bin` = the tokens of all sequences, concatenated, in the dtype named by the code; its size is
sum(sequence_lengths) * itemsize.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from minimegatron.data._files import (check_output_file, create_temporary, make_parents, remove_dirs,
                                      write_error)

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype + 8 sequence count + 8 document count

# Megatron's numeric codes for the token dtype; the code is what lands in byte 17 of the .idx.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def best_dtype(vocab_size: int | None) -> type[np.number]:
    """Smallest token dtype for a vocabulary: uint16 below 65500 ids (Megatron's cut-off), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dtype_code(dtype) -> int:
    """Megatron's code for a numpy dtype (np.uint16 -> 8); ValueError for a dtype the format lacks."""
    try:
        return _CODE_OF[np.dtype(dtype)]
    except (KeyError, TypeError):
        names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
        raise ValueError(f"dtype {dtype!r} cannot be stored in a .bin/.idx; use one of: {names}") from None


def check_output_prefix(prefix: str | os.PathLike, flag: str = "--output-prefix") -> None:
    """Raise ValueError / an OSError subclass, naming the fix, if `prefix` cannot be written as
    prefix.bin + prefix.idx: an empty prefix, one that names a directory (it would write the hidden files
    dir/.bin, dir/.idx), a parent that is a file, a directory we may not write, or a prefix.bin/.idx that
    is a directory. Nothing is created."""
    text = os.fspath(prefix)
    if not text.strip():
        raise ValueError(f"{flag} is empty; pass a path prefix such as data/corpus (writes data/corpus.bin "
                         f"and data/corpus.idx)")
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        name = os.path.join(text, "corpus")
        raise IsADirectoryError(f"{flag} {text} is a directory; a prefix names the files, e.g. {flag} "
                                f"{name} writes {name}.bin and {name}.idx")
    check_output_file(text, flag, "corpus")  # the parent: a directory we may write (or one to create)
    for path in (data_file_path(text), index_file_path(text)):
        if path.is_dir():
            raise IsADirectoryError(f"{flag} {text}: {path} is a directory, so the dataset file cannot be "
                                    f"written there; move it away or choose another prefix")


def data_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def index_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


class IndexedDatasetBuilder:
    """Write `prefix.bin` + `prefix.idx`, atomically.

    Tokens stream into a temporary `prefix.bin.<random>.tmp` as documents arrive; `finalize()` writes
    `prefix.idx.<random>.tmp` and then renames both into place with `os.replace` (atomic on POSIX). Until
    then — and after `abort()`, or an exception inside a `with` block — no new `prefix.bin` / `prefix.idx`
    exists (an old dataset there stays as it was), so a crash never leaves a half-written dataset that a
    later run would mistake for a good one. `abort()` also removes the temporary files and any directory
    the builder created. The prefix is checked first (check_output_prefix): a bad path fails before any
    token is written, with a message that names the fix.

        with IndexedDatasetBuilder("out/stdlib", np.uint16) as builder:
            for ids in token_lists:
                builder.add_document(ids)
        # finalize() ran on a clean exit of the with block
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validate early
        self._bin_path = data_file_path(prefix)
        self._idx_path = index_file_path(prefix)
        self._idx_tmp: Path | None = None
        check_output_prefix(prefix)
        self._created_dirs: list[Path] = []
        try:
            self._created_dirs = make_parents(self._bin_path)
            self._bin_tmp, fd = create_temporary(self._bin_path)
        except OSError as err:
            remove_dirs(self._created_dirs)
            raise self._write_error(err) from None
        self._bin = open(fd, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self._done = False

    def _write_error(self, err: OSError) -> OSError:
        return write_error(err, f"the dataset {self.prefix}.bin/.idx", "an --output-prefix")

    def add_document(self, tokens: Sequence[int] | np.ndarray,
                     sequence_lengths: Sequence[int] | None = None) -> None:
        """Append one document. By default it is a single sequence; pass `sequence_lengths` to store it
        as several sequences (they must sum to len(tokens)). Empty documents are allowed."""
        if self._done:
            raise RuntimeError(f"builder for {self.prefix} is already finalized or aborted")
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document must be a 1-D list of token ids, got shape {array.shape}")
        if array.size and array.dtype.kind in "iu":
            info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
            if info is not None and (array.min() < info.min or array.max() > info.max):
                raise ValueError(
                    f"token ids span [{array.min()}, {array.max()}] but dtype {self.dtype.name} holds "
                    f"[{info.min}, {info.max}]; build with dtype=best_dtype(vocab_size)")
        lengths = [array.size] if sequence_lengths is None else [int(n) for n in sequence_lengths]
        if sum(lengths) != array.size or any(n < 0 for n in lengths):
            raise ValueError(f"sequence_lengths {lengths} do not add up to the {array.size} tokens given")
        try:
            self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        except OSError as err:  # e.g. the disk is full
            self.abort()
            raise self._write_error(err) from None
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self) -> None:
        """Write the .idx and move both files into place (both, or neither)."""
        if self._done:
            raise RuntimeError(f"builder for {self.prefix} is already finalized or aborted")
        try:
            self._bin.close()
            lengths = np.asarray(self.sequence_lengths, dtype=np.int32)  # (S,)
            pointers = np.zeros(len(lengths), dtype=np.int64)  # (S,) byte offsets
            if len(lengths) > 1:
                pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
            documents = np.asarray(self.document_indices, dtype=np.int64)  # (D,) = documents + 1
            self._idx_tmp, fd = create_temporary(self._idx_path)
            with open(fd, "wb") as f:
                f.write(INDEX_HEADER)
                f.write(struct.pack("<Q", INDEX_VERSION))
                f.write(struct.pack("<B", dtype_code(self.dtype)))
                f.write(struct.pack("<Q", len(lengths)))
                f.write(struct.pack("<Q", len(documents)))
                f.write(lengths.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(documents.astype("<i8").tobytes())
            os.replace(self._bin_tmp, self._bin_path)
            try:
                os.replace(self._idx_tmp, self._idx_path)
            except BaseException:  # never leave the new .bin beside an old .idx: a pair that disagrees
                self._bin_path.unlink(missing_ok=True)
                raise
        except OSError as err:
            self.abort()
            raise self._write_error(err) from None
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far; no output file is left behind."""
        self._done = True
        try:
            self._bin.close()
        except OSError:
            pass
        for tmp in (self._bin_tmp, self._idx_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        remove_dirs(self._created_dirs)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        elif not self._done:
            self.abort()


def _read_index_header(idx_path: Path) -> tuple[np.dtype, int, int]:
    """Check the 34-byte header; return (token dtype, sequence count, document-index count)."""
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[:9] != INDEX_HEADER and not (len(head) < 9 and INDEX_HEADER.startswith(head)):
        raise ValueError(f"{idx_path} is not a Megatron .idx file: it starts with {head[:9]!r}, expected "
                         f"{INDEX_HEADER!r}; rebuild it with python -m minimegatron.data.preprocess")
    if len(head) < HEADER_SIZE:
        raise ValueError(f"{idx_path} is truncated: {size} bytes, the header alone needs {HEADER_SIZE}; "
                         f"the write was interrupted; rebuild it with python -m minimegatron.data.preprocess")
    (version,) = struct.unpack_from("<Q", head, 9)
    if version != INDEX_VERSION:
        raise ValueError(f"{idx_path} has index version {version}; only version {INDEX_VERSION} is supported")
    (code,) = struct.unpack_from("<B", head, 17)
    if code not in DTYPE_CODES:
        raise ValueError(f"{idx_path} names dtype code {code}, which is not one of {sorted(DTYPE_CODES)}")
    num_sequences, num_doc_entries = struct.unpack_from("<QQ", head, 18)
    expected = HEADER_SIZE + 12 * num_sequences + 8 * num_doc_entries
    if size < expected:
        raise ValueError(f"{idx_path} is truncated: {size} bytes, but its header promises {num_sequences} "
                         f"sequences and {num_doc_entries} document entries ({expected} bytes); rebuild it")
    return np.dtype(DTYPE_CODES[code]), num_sequences, num_doc_entries


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
        self.dtype, num_sequences, num_doc_entries = _read_index_header(idx_path)
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
