"""Where the text comes from: an iterator of documents (str), with nothing to download.

The default corpus is the Python standard library's own source code. Every machine that runs this
course has it (`sysconfig.get_paths()["stdlib"]`), it is a few MB of real, varied, mostly-English text
with a lot of structure (indentation, identifiers, numbers, docstrings), and no step needs the network.
The selection is deterministic: all `.py` files under the stdlib directory, minus tests, site-packages,
caches and the machine-specific `_sysconfigdata*`, minus files over `max_file_bytes`, sorted by relative
path, then every k-th of them until `max_bytes`. Each file is one document. (Different Python versions ship
different stdlibs, so the default corpus is fixed per interpreter, not across them.)

Your own text works the same way:

    open_corpus("books/*.txt")                      # a glob: every matching file, sorted
    open_corpus("notes.txt", documents="paragraph") # one file, a document per blank-line-separated block
    open_corpus("web.jsonl", json_key="text")       # JSON lines: one document per record's "text"

Stray non-UTF-8 bytes never stop a run: files are decoded with `errors="replace"` (each undecodable
byte sequence becomes U+FFFD), a `CorpusDecodeWarning` names the file and the count, and
`corpus.stats.replaced` keeps {path: count}. What is not text at all stops it with an error that names
the file and the fix: a binary file (NUL bytes) or UTF-16 text. So do a missing, unreadable or
non-regular path, a glob matching nothing, a bad JSON line (file:line) or a corpus with no text; the
errors are ValueError or an OSError subclass, and the checks that need no reading (every file exists,
is a regular file and opens) run when the Corpus is made, before any work.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from minimegatron.data._files import check_readable_file, explained

DEFAULT_CORPUS = "stdlib"
DOCUMENT_UNITS = ("file", "paragraph", "line")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_REPLACEMENT = "\ufffd"


class CorpusDecodeWarning(UserWarning):
    """A corpus file had bytes that are not UTF-8; they were replaced by U+FFFD (errors="replace")."""


@dataclass
class CorpusStats:
    """Counts from the latest pass over a corpus."""

    files: int = 0
    documents: int = 0
    characters: int = 0
    skipped_empty: int = 0
    replaced: dict[str, int] = field(default_factory=dict)  # path -> undecodable sequences replaced


def decode_utf8(data: bytes, source: str, stats: CorpusStats | None = None) -> str:
    """Decode UTF-8; invalid bytes become U+FFFD, with a CorpusDecodeWarning and a count in stats."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
    # U+FFFD may also be honestly present in the file; count only the ones decoding introduced.
    count = text.count(_REPLACEMENT) - data.count(_REPLACEMENT.encode("utf-8"))
    if stats is not None:
        stats.replaced[source] = stats.replaced.get(source, 0) + count
    warnings.warn(f"{source} is not valid UTF-8: {count} undecodable byte sequence(s) were replaced by "
                  f"U+FFFD (decoded with errors='replace'); re-encode the file as UTF-8 to keep them",
                  CorpusDecodeWarning, stacklevel=3)
    return text


class Corpus:
    """An iterable of documents over a fixed list of files. Iterate it as often as you like.

    fmt        "text" (the file is text) or "jsonl" (one JSON object per line, text under `json_key`)
    documents  for text files: "file" (a file is a document), "paragraph" (blank-line separated
               blocks), or "line"; JSON lines are always one document per record
    """

    def __init__(self, files: Sequence[str | os.PathLike], fmt: str = "text", json_key: str = "text",
                 documents: str = "file", name: str | None = None) -> None:
        if fmt not in ("text", "jsonl"):
            raise ValueError(f"fmt must be 'text' or 'jsonl', got {fmt!r}")
        if documents not in DOCUMENT_UNITS:
            raise ValueError(f"documents must be one of {DOCUMENT_UNITS}, got {documents!r}")
        self.files = [Path(f) for f in files]
        self.fmt, self.json_key, self.documents = fmt, json_key, documents
        self.name = name or (str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} files")
        if not self.files:
            raise ValueError(f"corpus {self.name!r} has no files; point --input at a text file, a glob, "
                             f"or a .jsonl file, or use the default corpus ({DEFAULT_CORPUS!r})")
        for path in self.files:  # before any work: every file exists, is a regular file and opens
            check_readable_file(path, "corpus file", f"check the path, or use the default corpus "
                                                     f"({DEFAULT_CORPUS!r}) which needs no download",
                                f"pass a quoted glob such as '{os.path.join(path, '**', '*.txt')}'")
        if all(path.stat().st_size == 0 for path in self.files):
            raise ValueError(f"corpus {self.name} is empty (every file has 0 bytes); point at files with "
                             f"text, or use the default corpus ({DEFAULT_CORPUS!r})")
        self.stats = CorpusStats()

    def __iter__(self) -> Iterator[str]:
        self.stats = stats = CorpusStats()
        for path in self.files:
            stats.files += 1
            text = decode_utf8(_read_text_bytes(path), str(path), stats)
            if self.fmt == "jsonl" and text.startswith("\ufeff"):
                text = text[1:]  # a UTF-8 byte-order mark (Windows editors write one): not part of line 1
            for document in self._documents(text, path):
                if not document.strip():
                    stats.skipped_empty += 1
                    continue
                stats.documents += 1
                stats.characters += len(document)
                yield document
        if stats.documents == 0:
            where = f"key {self.json_key!r} of " if self.fmt == "jsonl" else ""
            raise ValueError(f"corpus {self.name} contains no text: every document in {where}"
                             f"{', '.join(map(str, self.files[:3]))} is empty or whitespace; "
                             f"point at files with text (or fix --json-key)")

    def _documents(self, text: str, path: Path) -> Iterator[str]:
        if self.fmt == "jsonl":
            yield from _jsonl_documents(text, path, self.json_key)
        elif self.documents == "file":
            yield text
        elif self.documents == "paragraph":
            yield from _paragraphs(text)
        else:
            yield from text.splitlines()

    def __repr__(self) -> str:
        return f"Corpus({self.name}, fmt={self.fmt!r}, documents={self.documents!r})"


def _read_text_bytes(path: Path) -> bytes:
    """The bytes of a corpus file; a clear error for a file that cannot be read or is not text."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise explained(err, f"cannot read corpus file {path} ({err.strerror or err}); make it readable "
                        f"(chmod u+r) or leave it out of --input") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"corpus file {path} is UTF-16 text, not UTF-8; convert it (iconv -f UTF-16 -t "
                         f"UTF-8 FILE > FILE.utf8) and point --input at the result")
    if b"\x00" in data:
        raise ValueError(f"corpus file {path} looks binary, not text: it contains NUL bytes (an "
                         f"executable, archive, image, .bin dataset, or text in UTF-16); point --input at "
                         f"UTF-8 text files (narrow the glob if it matched this file)")
    return data


def _paragraphs(text: str) -> Iterator[str]:
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


_ONE_DOCUMENT = ("it looks like one JSON document, not JSON lines: write one object per line "
                 "(e.g. jq -c '.[]' FILE > FILE.jsonl)")


def _jsonl_documents(text: str, path: Path, key: str) -> Iterator[str]:
    # Records end at "\n" only: str.splitlines() would also cut at U+2028, \x0c, ... which JSON strings may
    # hold unescaped, and would number lines differently from an editor.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            whole = line.strip() in ("[", "{") or (number == 1 and line.lstrip().startswith("["))
            hint = _ONE_DOCUMENT if whole else "a JSON-lines corpus needs one JSON object per line"
            raise ValueError(f"{path}:{number} is not valid JSON ({err.msg} at column {err.colno}); {hint}"
                             ) from None
        if isinstance(record, list):
            raise ValueError(f"{path}:{number} is a JSON list, not an object; {_ONE_DOCUMENT}")
        if not isinstance(record, dict) or key not in record:
            found = sorted(record)[:10] if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            raise ValueError(f"{path}:{number} has no key {key!r} (found {found}); pass the right "
                             f"--json-key / json_key")
        value = record[key]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{number}: {key!r} holds a {type(value).__name__}, not a string; every "
                             f"record's {key!r} must be the document's text")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{path}:{number}: {key!r} holds an unpaired surrogate escape "
                             f"({value[err.start]!r}) that is not text; fix or drop that record") from None
        yield value


def stdlib_files(max_bytes: int = 4_000_000, max_file_bytes: int = 200_000) -> list[Path]:
    """The default corpus's files: stdlib .py sources sorted by relative path, every k-th one (k chosen so
    the picks spread over the whole library: asyncio to zipfile, not just the first letters) until
    max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library directory {root} is missing, so there is no "
                                f"default corpus; pass --input with your own text")
    candidates: list[tuple[str, int]] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]  # prune: never walk site-packages
        for name in names:
            path = os.path.join(directory, name)
            if not name.endswith(".py") or name.startswith("_sysconfigdata") or not os.path.isfile(path):
                continue
            size = os.path.getsize(path)
            if 0 < size <= max_file_bytes:
                candidates.append((Path(path).relative_to(root).as_posix(), size))
    candidates.sort()
    stride = max(1, sum(size for _, size in candidates) // max(max_bytes, 1))
    chosen, total = set(), 0
    for relative, size in candidates[::stride] + candidates:  # spread first, then top up in order
        if total >= max_bytes:
            break
        if relative not in chosen:
            chosen.add(relative)
            total += size
    return [root / relative for relative in sorted(chosen)]


def default_corpus(max_bytes: int = 4_000_000) -> Corpus:
    """The embedded corpus: a few MB of the Python standard library's source, one file per document."""
    return Corpus(stdlib_files(max_bytes), fmt="text", documents="file", name="python-stdlib")


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def open_corpus(source: str | os.PathLike | Sequence[str | os.PathLike] | Corpus | None = None, *,
                json_key: str = "text", documents: str = "file", fmt: str = "auto",
                max_bytes: int = 4_000_000) -> Corpus:
    """Resolve what the user pointed at into a Corpus.

    None or "stdlib" -> default_corpus(max_bytes); a Corpus -> itself; a glob -> every matching file;
    a path or a list of paths -> those files. fmt="auto" reads .jsonl/.json/.ndjson files as JSON lines.
    """
    if isinstance(source, Corpus):
        return source
    if source is None or (isinstance(source, str) and source == DEFAULT_CORPUS):
        return default_corpus(max_bytes)
    if isinstance(source, (str, os.PathLike)):
        pattern = os.fspath(source)
        if not pattern.strip():
            raise ValueError(f"the corpus path is empty; pass --input a text file, a quoted glob, a .jsonl "
                             f"file, or {DEFAULT_CORPUS!r}")
        if pattern == "-":
            raise ValueError("reading the corpus from stdin ('-') is not supported; save the text to a file "
                             "and pass --input FILE")
        if _is_glob(pattern):
            files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
            if not files:
                raise FileNotFoundError(f"no file matches the glob {pattern!r}; check the pattern (quote it "
                                        f"so the shell does not expand it) or use {DEFAULT_CORPUS!r}")
        else:
            if os.path.isdir(pattern):
                raise IsADirectoryError(f"{pattern} is a directory; pass a glob such as "
                                        f"'{os.path.join(pattern, '**', '*.txt')}' to read the files in it")
            files = [pattern]
        name = pattern
    else:
        files = [os.fspath(f) for f in source]
        name = None
    if fmt == "auto":
        fmt = "jsonl" if files and all(str(f).lower().endswith(JSONL_SUFFIXES) for f in files) else "text"
    return Corpus(files, fmt=fmt, json_key=json_key, documents=documents, name=name)
