"""Tokenize a corpus into Megatron's `.bin` / `.idx` pair (Megatron's tools/preprocess_data.py, one process).

    python -m minimegatron.data.preprocess --input stdlib --tokenizer stdlib.model \\
        --output-prefix data/stdlib            # -> data/stdlib.bin, data/stdlib.idx

Every document becomes one sequence: encode(text) (with <s> first for the llama flavour) and, unless
--no-append-eod, the end-of-document id last, so the sample index can pack documents back to back and
the model still sees where each one ends. The token dtype is the smallest that holds the vocabulary
(uint16 below 65500). Output is all-or-nothing: tokens go to temporary files that are renamed into
place only after the last document, so an error or Ctrl-C leaves no half-written dataset behind (and an
older dataset at the prefix stays as it was).

Bad input ends in one line on stderr and exit status 2, never a traceback:
``python -m minimegatron.data.preprocess: error: <what is wrong>; <the fix>``. Everything that can be
checked before the first token is — the flags, the output prefix, the tokenizer model, every corpus file —
so a typo fails in a second, not after an hour of tokenizing.
"""

from __future__ import annotations

import argparse
import os
from typing import Iterable, Sequence

import numpy as np

from minimegatron.data._files import same_files
from minimegatron.data.corpus import DEFAULT_CORPUS, DOCUMENT_UNITS, open_corpus
from minimegatron.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, best_dtype,
                                               check_output_prefix, data_file_path, index_file_path)
from minimegatron.data.tokenizer import SentencePieceTokenizer

PROG = "python -m minimegatron.data.preprocess"


def check_preprocess(documents: Iterable[str], tokenizer: SentencePieceTokenizer,
                     output_prefix: str | os.PathLike, append_eod: bool = True) -> None:
    """What preprocess() checks before writing; ValueError / an OSError subclass that names the fix."""
    check_output_prefix(output_prefix)
    if append_eod and tokenizer.eod < 0:
        raise ValueError(f"the tokenizer {tokenizer.model_file or ''} has no end-of-document (eos) token to "
                         f"append; pass --no-append-eod, or use a model trained with an eos piece")
    outputs = [data_file_path(output_prefix), index_file_path(output_prefix)]
    inputs = list(getattr(documents, "files", ()))
    clash = same_files(outputs, inputs)
    if clash:
        raise ValueError(f"--output-prefix {os.fspath(output_prefix)} would overwrite the corpus file "
                         f"{clash[1]} with tokens; choose another prefix (or narrow the --input glob)")
    if tokenizer.model_file is not None:
        clash = same_files(outputs, [tokenizer.model_file])
        if clash:
            raise ValueError(f"--output-prefix {os.fspath(output_prefix)} would overwrite the tokenizer "
                             f"model {clash[1]}; choose another prefix")


def preprocess(documents: Iterable[str], tokenizer: SentencePieceTokenizer, output_prefix: str | os.PathLike,
               append_eod: bool = True, progress: bool = True, dtype=None) -> IndexedDataset:
    """Encode every document, write output_prefix.bin/.idx atomically, and return the opened dataset.

    The progress bar shows on a terminal only (progress=True), and is cleared if a document fails."""
    from tqdm import tqdm

    check_preprocess(documents, tokenizer, output_prefix, append_eod)
    dtype = np.dtype(dtype or best_dtype(tokenizer.vocab_size))
    with IndexedDatasetBuilder(output_prefix, dtype) as builder:
        total = len(documents) if hasattr(documents, "__len__") else None
        bar = tqdm(total=total, desc=f"tokenizing -> {output_prefix}", unit=" docs",
                   disable=None if progress else True)  # None: only when stderr is a terminal
        try:
            for text in documents:
                builder.add_document(tokenizer.encode(text, eos=append_eod))
                bar.update()
        except BaseException:
            bar.leave = False  # wipe the half-drawn bar: the error line is then the only one
            bar.close()
            raise
        bar.close()
    return IndexedDataset(output_prefix)


def build_parser() -> argparse.ArgumentParser:
    from minimegatron.errors import ArgumentParser

    parser = ArgumentParser(prog=PROG, description="Tokenize text into a Megatron .bin/.idx dataset.")
    parser.add_argument("--input", default=DEFAULT_CORPUS,
                        help=f"a text file, a quoted glob, a .jsonl file, or {DEFAULT_CORPUS!r} (the default "
                             f"corpus: Python's own standard library, no download)")
    parser.add_argument("--tokenizer", required=True, help="a sentencepiece .model file")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text", help="key holding the text in a .jsonl input")
    parser.add_argument("--documents", choices=DOCUMENT_UNITS, default="file",
                        help="text files: a document per file, blank-line-separated paragraph, or line")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the end-of-document token (default: on)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> IndexedDataset:
    from minimegatron.errors import cli_errors, one_line_warnings

    with cli_errors(PROG), one_line_warnings(PROG):
        args = build_parser().parse_args(argv)
        prefix = args.output_prefix
        for suffix in (".bin", ".idx"):
            if prefix.endswith(suffix):
                raise ValueError(f"--output-prefix {prefix} ends in {suffix}, but .bin and .idx are appended "
                                 f"to the prefix (it would write {prefix}.bin); pass --output-prefix "
                                 f"{prefix[:-len(suffix)]}")
        check_output_prefix(prefix)          # cheap checks first: a typo fails before anything is loaded
        tokenizer = SentencePieceTokenizer(args.tokenizer)
        corpus = open_corpus(args.input, json_key=args.json_key, documents=args.documents)
        dataset = preprocess(corpus, tokenizer, prefix, args.append_eod, not args.no_progress)
        print(f"wrote {dataset}")
        if corpus.stats.replaced:
            print(f"note: {len(corpus.stats.replaced)} file(s) were not valid UTF-8; "
                  f"{sum(corpus.stats.replaced.values())} byte sequence(s) became U+FFFD")
        return dataset


if __name__ == "__main__":
    main()
