"""IndexedDatasetBuilder: write a Megatron `prefix.bin` + `prefix.idx` pair (the format:
:mod:`.indexed_format`), atomically; :func:`check_output_prefix` says beforehand whether a prefix can be
written. The reader is :class:`~minimegatron.data.indexed_dataset.IndexedDataset` (which re-exports
both names, so ``from minimegatron.data.indexed_dataset import IndexedDatasetBuilder`` works too).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from minimegatron.processes import sigint_deferred
from minimegatron.data._files import (check_output_file, create_temporary, make_parents, remove_dirs,
                                      write_error)
from minimegatron.data.indexed_format import (INDEX_HEADER, INDEX_VERSION, best_dtype, data_file_path,
                                              dtype_code, index_file_path)

__all__ = ["IndexedDatasetBuilder", "check_output_prefix"]


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
        self._bin_tmp: Path | None = None
        self._bin = None
        self._done = False  # before _open: __del__ cleans up after an interrupted start
        self._open()
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self._done = False

    def _open(self) -> None:
        """Create the .bin's temporary file. Ctrl-C is held until the builder knows the file's name,
        so that abort() can always remove it (a KeyboardInterrupt right after is handled by the caller)."""
        with sigint_deferred():
            try:
                self._created_dirs = make_parents(self._bin_path)
                self._bin_tmp, fd = create_temporary(self._bin_path)
            except OSError as err:
                remove_dirs(self._created_dirs)
                raise self._write_error(err) from None
            self._bin = open(fd, "wb")

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

    def __del__(self) -> None:  # built, then interrupted before the with block took over: clean up
        if not getattr(self, "_done", True) and getattr(self, "_bin_tmp", None) is not None:
            try:
                self.abort()
            except Exception:  # noqa: BLE001 - best effort at interpreter exit
                pass

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        elif not self._done:
            self.abort()
