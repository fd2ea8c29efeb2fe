"""Megatron's on-disk token format: a `.bin` of raw tokens and an `.idx` that says where each one starts.

This file is the format itself — the header, the dtype codes, the file names, the header check —
which the writer (:mod:`.indexed_builder`) and the reader (:mod:`.indexed_dataset`) both follow.

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

import numpy as np

__all__ = ["INDEX_HEADER", "INDEX_VERSION", "HEADER_SIZE", "DTYPE_CODES", "best_dtype", "dtype_code",
           "data_file_path", "index_file_path", "read_index_header"]

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


def data_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def index_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def read_index_header(idx_path: Path) -> tuple[np.dtype, int, int]:
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
